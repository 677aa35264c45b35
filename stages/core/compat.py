"""Make torchvision importable on CPU-only torch.

PyPI's torchvision 0.28.0 is a CUDA build. On a CPU-only torch its compiled ops do not
register, and ``import torchvision`` dies with ``operator torchvision::nms does not exist``
(its ``_meta_registrations`` refer to the op). transformers' image utilities import
torchvision, so open_clip, peft and ``from diffusers import FluxPipeline`` break with it.

Defining the two op *schemas* before torchvision is imported is enough for the pure-Python
parts (transforms, models) that we use. This is applied only when the ops are missing: on a
machine where torchvision's extension loads (any CUDA box) it does nothing.

It is applied once, in one place: importing the ``stages`` package calls :func:`install`, which
runs :func:`ensure_torchvision` the first time anything (diffusers, open_clip, peft, torchmetrics,
transformers' image utilities) imports torchvision. No other module needs to think about it, and a
stage that never touches torchvision never pays for importing it. Code outside the package (the
app on a Space) calls :func:`ensure_torchvision` itself.
"""
from __future__ import annotations

import importlib.abc
import logging
import sys

log = logging.getLogger(__name__)

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB = None  # keep the Library object alive: dropping it unregisters the schemas
_applied = False


def _has_op(name: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


class _OnFirstImport(importlib.abc.MetaPathFinder):
    """An import hook that finds nothing: it only applies the shim just before torchvision loads."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            ensure_torchvision()  # removes this hook first, then imports torchvision itself
        return None


def install() -> None:
    """Run :func:`ensure_torchvision` when torchvision is first imported (once per process)."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _OnFirstImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnFirstImport())


def ensure_torchvision() -> bool:
    """Define missing ``torchvision::nms``/``qnms`` schemas. Returns True if it patched."""
    global _LIB, _applied
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _OnFirstImport)]
    if _applied:
        return True
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return False
    if "torchvision" not in sys.modules:
        # Let torchvision try to load its own extension first (it succeeds on CUDA machines).
        try:
            import torchvision  # noqa: F401

            return False
        except RuntimeError as err:
            if "does not exist" not in str(err):
                raise
            for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[mod]
    missing = [name for name in _SCHEMAS if not _has_op(name)]
    if not missing:
        return False
    import torch

    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _LIB.define(_SCHEMAS[name])
    _applied = True
    log.debug("defined torchvision op schemas %s for CPU-only torch", missing)
    return True
