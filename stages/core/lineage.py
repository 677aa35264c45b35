"""Lineage: where a run comes from, in plain values (no MLflow here).

- :func:`repo_root`: the main repo's root, also from DVC's temp copies (``DVC_ROOT``);
- :func:`git_state`: (commit, dirty) of a checkout; :func:`dataset_hash`: the md5 DVC recorded
  for the curated dataset in dvc.lock;
- ``scrub``, ``masked``, ``secret_values``: the secret scrubber of stages.core.secrets, re-exported;
- :func:`flatten`: ``{"lora": {"rank": 4}} -> {"lora.rank": 4}`` for params.

Used by stages.core.tracking (the MLflow run), the model card and the sweep summary.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from stages.core import paths
from stages.core.secrets import MASK, SECRET_NAME, masked, scrub, scrub_file, secret_values  # noqa: F401

CURATED = str(paths.Caption().curated)
def repo_root() -> Path:
    """The main repo's root: ``DVC_ROOT`` (set by DVC, the parent repo even for temp/queued
    experiments), else the git top level of the working directory, else the working directory."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 3):  # <root>/.dvc/tmp/exps/... without DVC_ROOT: still the parent
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    top = _git("rev-parse", "--show-toplevel", cwd=cwd)
    return Path(top).resolve() if top else cwd


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"lora": {"rank": 4}} -> {"lora.rank": 4}``; lists stay whole (as their repr)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _git(*args: str, cwd=None) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
        return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(cwd=None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout at ``cwd``; (None, None) outside git. Untracked files don't count."""
    try:
        r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                           text=True, timeout=20)
        dirty = bool(r.stdout.strip()) if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return _git("rev-parse", "HEAD", cwd=cwd), dirty


def dataset_hash(lock: os.PathLike | str = "dvc.lock", path: str = CURATED) -> str | None:
    """The md5 DVC recorded for ``path`` (an output of some stage) in dvc.lock, if any."""
    try:
        stages = (yaml.safe_load(Path(lock).read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return None
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path", "").rstrip("/") == path:
                return out.get("md5")
    return None
