"""One experiment per GPU: a stage claims a free card before CUDA starts.

``make sweep SWEEP_JOBS=4`` runs four queued experiments at once; without claims all four would take
``cuda:0``. Each GPU stage (encode, train, operating_point, sample, evaluate) calls :func:`claim` first
thing in ``main()``:

- the pool is ``CUDA_VISIBLE_DEVICES`` when set (the user's choice), else every GPU ``nvidia-smi -L``
  lists; no pool (a CPU machine) = nothing to claim;
- a claim is an exclusive ``fcntl.flock`` on ``<main repo>/.cache/gpu-claims/gpu-<id>.lock`` (the main
  repo even in a queued experiment's copy: ``DVC_ROOT``), held by the open file until the process ends;
  the kernel drops it when the process exits or is killed (SIGKILL included), so a crash frees its card;
- the claimed card becomes the stage's ``CUDA_VISIBLE_DEVICES`` (set before torch initialises CUDA), and
  ``FLUXIMP_GPU_CLAIMED`` tells child processes (``accelerate launch`` for ``train.num_processes``) that
  their parent holds the claim;
- when every card is taken, the stage waits (logging once) until one is free;
- ``FLUXIMP_GPU_SHARE=1`` shares: no lock, the whole pool visible (several experiments per card);
- every claim is appended to ``claims.jsonl`` in the same folder (device, stage, DVC experiment, pid,
  time): the sweep summary reads it to say which GPU ran what.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

CLAIMED = "FLUXIMP_GPU_CLAIMED"
SHARE = "FLUXIMP_GPU_SHARE"
LOG_FILE = "claims.jsonl"
_held: list = []  # the open lock files: a claim lasts as long as the process


def claims_dir() -> Path:
    if os.environ.get("FLUXIMP_GPU_CLAIMS"):
        return Path(os.environ["FLUXIMP_GPU_CLAIMS"])
    from stages.core.lineage import repo_root

    return repo_root() / ".cache" / "gpu-claims"


def pool() -> list[str]:
    """The devices this process may use: ``CUDA_VISIBLE_DEVICES`` entries when set, else the GPUs
    nvidia-smi lists (no CUDA initialised), else none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        devices = []
        for d in (x.strip() for x in env.split(",")):
            if not d or d.startswith("-"):  # CUDA stops at the first invalid entry ("-1" hides all)
                break
            devices.append(d)
        return devices
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i in range(sum(1 for ln in out.splitlines() if ln.startswith("GPU ")))]


def shared() -> bool:
    return os.environ.get(SHARE, "0") not in ("", "0", "false", "False")


def _lock_path(device: str) -> Path:
    return claims_dir() / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.lock"


def _try(devices: list[str], n: int) -> list[tuple[str, object]]:
    got = []
    for d in devices:
        fh = open(_lock_path(d), "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            continue
        got.append((d, fh))
        if len(got) == n:
            return got
    for _, fh in got:  # not enough free cards: give back what we took
        fh.close()
    return []


def _record(stage: str, devices: list[str]) -> None:
    entry = {"devices": devices, "stage": stage, "experiment": os.environ.get("DVC_EXP_NAME"),
             "pid": os.getpid(), "host": socket.gethostname(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        with open(claims_dir() / LOG_FILE, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
    except OSError as err:  # the log is a convenience; the claim holds without it
        log.warning("could not record the GPU claim: %s", err)


def claim(stage: str, n: int = 1, wait: bool = True, poll: float = 2.0) -> list[str]:
    """Claim ``n`` free devices of the pool for this process and make them its CUDA_VISIBLE_DEVICES;
    the claimed ids (empty on a CPU machine). ``wait=False`` raises SystemExit when none is free."""
    if os.environ.get(CLAIMED) is not None:  # a child of a claiming process (accelerate launch)
        return [d for d in os.environ[CLAIMED].split(",") if d]
    devices = pool()
    if not devices:
        return []
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.warning("claiming a GPU after CUDA started: CUDA_VISIBLE_DEVICES cannot change any more")
    if shared():
        os.environ[CLAIMED] = ",".join(devices)
        _record(stage, devices)
        return devices
    if n > len(devices):
        raise SystemExit(f"{stage}: needs {n} GPUs, the pool has {len(devices)} ({','.join(devices)}): "
                         "set CUDA_VISIBLE_DEVICES or lower train.num_processes")
    claims_dir().mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        got = _try(devices, n)
        if got:
            break
        if not wait:
            raise SystemExit(f"{stage}: every GPU of {','.join(devices)} is claimed by another experiment "
                             f"(locks in {claims_dir()}; {SHARE}=1 shares cards)")
        if not waited:
            log.info("%s: every GPU of %s is claimed; waiting for one to be free", stage, ",".join(devices))
            waited = True
        time.sleep(poll)
    ids = [d for d, _ in got]
    for _, fh in got:
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "stage": stage}) + "\n")
        fh.flush()
        _held.append(fh)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    os.environ[CLAIMED] = ",".join(ids)
    _record(stage, ids)
    log.info("%s: claimed GPU %s", stage, ",".join(ids))
    return ids


def release() -> None:
    """Give back this process's claims (tests; a stage simply exits)."""
    while _held:
        _held.pop().close()
    os.environ.pop(CLAIMED, None)


def history(root: Path | None = None) -> list[dict]:
    """Every recorded claim (``claims.jsonl``), oldest first; unreadable lines are skipped."""
    path = (root or claims_dir()) / LOG_FILE
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
