"""The pipeline's stages (stages/README.md). Importing the package first drops the third-party
warnings nobody can act on (stages.core.log.NOISE_*), before any of those libraries is imported."""
from stages.core import log as _log

_log.quiet()
