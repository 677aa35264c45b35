"""The pipeline's stages (stages/README.md). Importing the package first drops the third-party
warnings nobody can act on (stages.core.log.NOISE_*), before any of those libraries is imported,
and makes torchvision importable on CPU-only torch the first time anything imports it
(stages/core/compat.py)."""
from stages.core import compat as _compat
from stages.core import log as _log

_log.quiet()
_compat.install()
