"""Atomic output helpers: every stage writes through these, so a killed stage leaves nothing
half-written (a temp file or folder is renamed over the target only once it is complete).

- Temp siblings are named ``.<name>.<pid>-<random>[suffix].tmp``; the next write of the same
  target removes those of processes that are gone (a stage killed with -9 leaves no litter).
- Files and folders get the mode the umask gives (``tempfile`` alone would make them 0600/0700,
  unreadable to the rest of a team on a shared server); :func:`umask_mode` fixes a file a library
  wrote 0600 (safetensors: stages/core/tensorfiles.py applies it to every safetensors we write).
- :func:`no_space_errors` turns a full disk (``ENOSPC``, or torch's ``unexpected pos`` error
  that hides it) into "no space left on <path>".
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

LOW_SPACE = 64 * 2 ** 20  # a write error with less than this free on the disk is a full disk
_umask_lock = threading.Lock()


class NoSpaceError(SystemExit):
    """The disk under an output is full (a clean exit naming the path)."""


def umask() -> int:
    with _umask_lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale(path: Path) -> list[Path]:
    """Remove temp siblings of ``path`` left by processes that no longer run (and ``.<name>.old``
    of an interrupted swap when ``path`` itself is in place); returns what was removed."""
    gone = []
    if not path.parent.is_dir():
        return gone
    # ours: .<name>.<pid>-<8 random>[.ext].tmp ; older versions: .<name>.<8 random>[.ext].tmp
    pat = re.compile(rf"^\.{re.escape(path.name)}\.(?:(\d+)-)?[a-z0-9_]{{8}}(?:\.[A-Za-z0-9]+)?\.tmp$")
    for sib in path.parent.iterdir():
        m = pat.match(sib.name)
        stale = m and (m[1] is None or (int(m[1]) != os.getpid() and not pid_alive(int(m[1]))))
        if sib.name == f".{path.name}.old" and path.exists():
            stale = True
        if stale:
            shutil.rmtree(sib, ignore_errors=True) if sib.is_dir() else sib.unlink(missing_ok=True)
            gone.append(sib)
    return gone


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())
    return Path(tmp)


@contextlib.contextmanager
def no_space_errors(where: os.PathLike | str) -> Iterator[None]:
    """Re-raise a write error caused by a full disk as ``NoSpaceError("no space left on <where>")``."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        where = Path(where)
        probe = next((p for p in [where, *where.parents] if p.exists()), Path("."))
        free = shutil.disk_usage(probe).free
        if getattr(exc, "errno", None) == errno.ENOSPC or free < LOW_SPACE:
            raise NoSpaceError(f"no space left on {where} ({free / 2 ** 20:.0f} MiB free on its disk): "
                               f"free some space and rerun ({type(exc).__name__}: {exc})") from exc
        raise


def umask_mode(path: os.PathLike | str) -> Path:
    """Give a file a library created with its own mode (safetensors writes 0600) the mode the umask
    gives, like every other output."""
    os.chmod(path, 0o666 & ~umask())
    return Path(path)


def _fsync(path: Path) -> None:
    """Flush a finished temp file to the disk before it is renamed over its target (else a power
    cut right after the rename can leave an empty file under the target's name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: os.PathLike | str, data: bytes) -> Path:
    """The one atomic file write: ``data`` into a temp sibling (the umask's mode), fsync, rename
    over ``path``. On any failure ``path`` keeps its old bytes and the temp file goes."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with no_space_errors(path):
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
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
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: os.PathLike | str) -> Iterator[Path]:
    """Yield an empty temp folder next to ``path``; it replaces ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())
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


def file_digest(path: os.PathLike | str, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in 1 MiB blocks (checkpoints, adapters, DVC-style md5s)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: os.PathLike | str) -> Any:
    with open(path) as fh:
        return json.load(fh)
