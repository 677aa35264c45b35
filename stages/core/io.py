"""Atomic output helpers: every stage writes through these, so a killed stage leaves nothing
half-written (a temp file or folder is renamed over the target only once it is complete)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_bytes(path: os.PathLike | str, data: bytes) -> Path:
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: os.PathLike | str, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: os.PathLike | str, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(o: Any):
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_file(path: os.PathLike | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it over ``path`` when the block succeeds.
    ``suffix`` keeps an extension for libraries that infer the format from the name."""
    path = Path(path)
    tmp = _tmp_sibling(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: os.PathLike | str) -> Iterator[Path]:
    """Yield an empty temp folder next to ``path``; it replaces ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: os.PathLike | str) -> Any:
    with open(path) as fh:
        return json.load(fh)
