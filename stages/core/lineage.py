"""Lineage: where a run comes from, in plain values (no MLflow here).

- :func:`repo_root`: the main repo's root, also from DVC's temp copies (``DVC_ROOT``);
- :func:`git_state`: (commit, dirty) of a checkout; :func:`dir_md5`: DVC's md5 of a folder, computed
  from the files a stage reads (the value dvc.lock records for the same bytes); :func:`adapter_hash`:
  the sha256 of a LoRA adapter's weights (which MLflow run and registered version it belongs to);
  :func:`dataset_hash`: what dvc.lock claims for the curated dataset (a published commit's card);
- ``scrub``, ``masked``, ``secret_values``: the secret scrubber of stages.core.secrets, re-exported;
- :func:`flatten`: ``{"lora": {"rank": 4}} -> {"lora.rank": 4}`` for params.

Used by stages.core.tracking (the MLflow run), the model card and the sweep summary.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from stages.core import paths
from stages.core.io import file_digest
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


def dir_md5(path: os.PathLike | str = CURATED) -> str | None:
    """DVC's hash of the folder ``path`` as it is on disk (None when it is missing): the md5 of the
    sorted ``[{"md5": <file md5>, "relpath": <posix path>}]`` JSON, plus ``.dir``. It is what dvc.lock
    records for the same files, but computed from the bytes a stage reads, so a run on other data (a
    plain ``python -m stages.<x>``, a changed workspace) is tagged with that data. One pass of md5 over
    the files (parquet shards: ~1 s per 500 MB)."""
    root = Path(path)
    if not root.is_dir():
        return None
    entries = sorted(({"md5": file_digest(f, "md5"), "relpath": f.relative_to(root).as_posix()}
                      for f in root.rglob("*") if f.is_file()), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"


def adapter_hash(lora_dir: os.PathLike | str) -> str | None:
    """sha256 of the adapter's weights file (``<lora_dir>/pytorch_lora_weights.safetensors``), None
    when there is none: the key that ties an adapter on disk to the MLflow run that trained it."""
    f = Path(lora_dir) / ADAPTER_WEIGHTS
    if not f.is_file():
        return None
    return file_digest(f)


def dataset_hash(lock: os.PathLike | str = "dvc.lock", path: str = CURATED) -> str | None:
    """The md5 DVC recorded for ``path`` (an output of some stage) in dvc.lock, if any: what a commit
    claims (the model card of a published commit). A stage's own lineage uses :func:`dir_md5`."""
    try:
        stages = (yaml.safe_load(Path(lock).read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return None
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path", "").rstrip("/") == path:
                return out.get("md5")
    return None
