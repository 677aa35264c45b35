"""Reading files we did not write (a user's folder, sidecars, caption files): regular files only,
bounded in size, links not followed.

:func:`read_regular` opens non-blocking (a FIFO named ``*.jpg`` cannot hang the stage), checks the
opened file with ``fstat`` (no race between a check and the read), refuses FIFOs, devices,
sockets and folders, and reads at most ``max_bytes`` (a link to ``/dev/zero`` cannot fill memory;
it is not followed anyway: callers resolve and contain links first).
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Optional


class Refused(Exception):
    """A file not read: ``reason`` is ``unreadable``, ``special_file`` or ``too_large``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def read_regular(path: str | Path, max_bytes: Optional[int] = None, what: str = "data.max_bytes") -> bytes:
    """The bytes of the regular file ``path`` (not a symlink), at most ``max_bytes`` (``what`` names
    the limit in the message); else :class:`Refused`."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        why = "a symlink: not followed here" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
        raise Refused("unreadable", f"{type(exc).__name__}: {why}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise Refused("unreadable", "IsADirectoryError: a directory")
        if not stat.S_ISREG(st.st_mode):
            raise Refused("special_file", "not a regular file (FIFO, device or socket): never read")
        if max_bytes is not None and st.st_size > max_bytes:
            raise Refused("too_large", f"{st.st_size} bytes > {what} = {max_bytes}")
        limit = st.st_size if max_bytes is None else max_bytes
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise Refused("too_large", f"more than {limit} bytes (the file grew while it was read)")
        return b"".join(chunks)
    except OSError as exc:
        raise Refused("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
