"""The pipeline's stages (stages/README.md). Importing the package first pins the CPU arithmetic, so the
CPU pipeline writes the same bits on every x86-64 machine (stages/core/numerics.py), then drops the
third-party warnings nobody can act on (stages.core.log.NOISE_*), before any of those libraries is
imported, and makes torchvision importable on CPU-only torch the first time anything imports it
(stages/core/compat.py)."""
from stages.core import numerics as _numerics

_numerics.pin()

from stages.core import compat as _compat  # noqa: E402
from stages.core import log as _log  # noqa: E402

_log.quiet()
_compat.install()
