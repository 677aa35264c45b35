"""Clean stops of a stage process.

- :func:`die_with_parent`: a stage that DVC runs (``DVC_STAGE`` is set) gets SIGTERM as soon as the
  DVC process is gone (Linux: ``PR_SET_PDEATHSIG``; a watch thread as well, which also covers a shell
  between DVC and the stage and other systems). A killed ``dvc repro`` thus leaves no orphan that goes
  on writing outputs or registers a model version after DVC has stopped. Called by
  stages.core.log.setup, i.e. at the start of every stage's main(). (stages.core.pool does the same
  for pool workers.)
- :class:`StopSignals`: within ``with StopSignals("train") as stop:``, SIGTERM and SIGINT only set
  ``stop.signal``; a long loop (train) checks it at a safe point, saves, and calls ``stop.exit``: one
  line on stderr and exit status 128 + the signal number. A second signal ends the process at once
  (the default action), unless the first came from DVC's death: the kernel and the watch thread may
  both signal it, and it is one request (the checkpoint is still saved). Without a stop point (other
  stages) a signal ends the process as usual.
- :func:`call`: a stage that relaunches itself (train with ``accelerate launch``) passes SIGTERM/SIGINT
  on to the launched processes, which die with it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Optional

PR_SET_PDEATHSIG = 1
SHELLS = {"sh", "bash", "dash", "zsh", "fish", "ksh"}


def _proc(pid: int) -> Optional[tuple[str, int]]:
    """(state, parent pid) of ``pid`` from /proc; None when it is gone (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    info = _proc(pid)
    if info is not None:
        return info[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _watched(parent: int) -> list[int]:
    """The parent, and DVC above it when the parent is a shell running the stage's command."""
    try:
        with open(f"/proc/{parent}/comm") as fh:
            is_shell = fh.read().strip() in SHELLS
    except OSError:
        return [parent]
    info = _proc(parent)
    return [parent, info[1]] if is_shell and info and info[1] > 1 else [parent]


def _watch(parent: int, watched: list[int], sig: int, every: float, kernel_signals: bool) -> None:
    """Send ``sig`` once when a watched process is gone, unless the kernel already sent it: the
    stop is one request, and a second signal would end the stage at once, in the middle of the
    checkpoint that the first one asked for (see StopSignals)."""
    while True:
        time.sleep(every)
        if os.getppid() != parent:  # the parent itself died (reparenting and PDEATHSIG are one event)
            if not kernel_signals:
                os.kill(os.getpid(), sig)
            return
        if not all(alive(p) for p in watched):  # DVC above a shell that still runs
            os.kill(os.getpid(), sig)
            return


_armed: Optional[tuple[int, list[int]]] = None  # (parent, watched) once die_with_parent is armed


def parent_gone() -> bool:
    """Whether die_with_parent is armed and what it watches is gone (the stop is DVC's death)."""
    if _armed is None:
        return False
    parent, watched = _armed
    return os.getppid() != parent or not all(alive(p) for p in watched)


def die_with_parent(sig: int = signal.SIGTERM, every: float = 0.5) -> bool:
    """When DVC runs this process: ``sig`` to it once DVC is gone. Returns whether it is armed."""
    global _armed
    if not os.environ.get("DVC_STAGE"):
        return False  # run by hand (maybe under nohup): a closed terminal must not stop it
    parent = os.getppid()
    kernel_signals = False
    if sys.platform.startswith("linux"):
        try:
            kernel_signals = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig)) == 0
        except (OSError, AttributeError):
            pass
    watched = _watched(parent)
    _armed = (parent, watched)
    if os.getppid() != parent or not all(alive(p) for p in watched):  # gone before the line above
        os.kill(os.getpid(), sig)  # (no stop point is armed yet: a second signal changes nothing)
        return True
    threading.Thread(target=_watch, args=(parent, watched, int(sig), every, kernel_signals), daemon=True,
                     name="parent-watch").start()
    return True


def _pdeathsig() -> None:  # in a child, before exec: SIGTERM when its parent (this stage) dies
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass


def call(cmd: list[str], env: dict) -> int:
    """``subprocess.call`` for a stage that relaunches itself (train under ``accelerate launch``):
    SIGTERM/SIGINT are passed on to the child (which stops cleanly), and the child gets SIGTERM if
    this process dies."""
    import subprocess

    linux = sys.platform.startswith("linux")
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_pdeathsig if linux else None)  # noqa: PLW1509
    old = {s: signal.signal(s, lambda signum, frame: proc.send_signal(signum)) for s in StopSignals.SIGNALS}
    try:
        return proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class StopSignals:
    """SIGTERM/SIGINT ask the stage to stop at its next safe point (see the module docstring)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, stage: str):
        self.stage = stage
        self.signal: Optional[int] = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            return  # DVC's death signalled twice (a shell between: the watch thread, then the kernel)
        self.signal = signum
        if parent_gone():
            return  # DVC is gone: later signals are the same request; the stop point still saves
        for s in self.SIGNALS:  # a second signal: the default action (ends the process at once)
            signal.signal(s, self._old.get(s, signal.SIG_DFL))

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "no signal"

    def exit(self, detail: str) -> SystemExit:
        """Print ``<stage>: stopped by SIGTERM <detail>`` and return the SystemExit to raise."""
        print(f"{self.stage}: stopped by {self.name} {detail}", file=sys.stderr, flush=True)
        return SystemExit(128 + (self.signal or 0))
