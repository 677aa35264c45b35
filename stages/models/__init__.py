"""Model building blocks (Flux loading, quantization, LoRA, CLIP).

Importing this package makes torchvision importable on CPU-only torch first (see
stages/core/compat.py), so any module here may import diffusers, transformers or open_clip."""
from stages.core import compat as _compat

_compat.ensure_torchvision()
