"""safetensors files whose bytes depend only on their content (DVC hashes them).

safetensors 0.8 writes the ``__metadata__`` map in a different key order on every save: the same
tensors and the same metadata give new bytes and a new DVC hash, and every later stage reruns. With
at most one metadata key the header has one order, so every file that is a DVC output is written
through :func:`save` (one key: put several values into one JSON string), and files written by a
library (diffusers' LoRA file) are cut down to their one meaningful key by :func:`keep_one_key`.
safetensors creates its files 0600 whatever the umask: :func:`save` gives them the umask's mode
(``stages.core.io.umask_mode``), so a team on a shared server can read the cache and adapters.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

from stages.core.io import umask_mode


def _check(metadata: Optional[Mapping[str, str]]) -> Optional[dict]:
    if metadata and len(metadata) > 1:
        raise ValueError(f"metadata keys {sorted(metadata)}: safetensors writes several keys in a random "
                         "order; store one key (e.g. one JSON string)")
    return dict(metadata) if metadata else None


def save(tensors: dict, path: os.PathLike | str, metadata: Optional[Mapping[str, str]] = None) -> Path:
    """``safetensors.torch.save_file`` (torch tensors) or ``safetensors.numpy.save_file`` (arrays)
    with at most one metadata key."""
    import numpy as np

    meta = _check(metadata)
    if all(isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.numpy import save_file
    else:
        from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=meta)
    return umask_mode(path)


def metadata(path: os.PathLike | str) -> dict:
    """The file's ``__metadata__`` map ({} when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        return fh.metadata() or {}


def keep_one_key(path: os.PathLike | str, key: str) -> None:
    """Rewrite a safetensors file a library wrote so that its metadata holds ``key`` alone
    (tensors unchanged)."""
    from safetensors.torch import load_file

    meta = metadata(path)
    if set(meta) <= {key}:
        return
    tensors = load_file(str(path))
    save(tensors, path, {key: meta[key]} if key in meta else None)
