"""A content-addressed cache on disk for stage results that do not depend on the experiment.

Some results are the same in every experiment of one base model: the sample stage's base images
(LoRA scale 0; stages.models.base_cache) and evaluate's measurements of the held-out paintings
(stages.metrics.refcache). They are kept here, one entry per key: the sha256 of the JSON of
everything the result is a function of (:func:`digest`), so another input gives another key and a
stale entry is never read.

An entry of ``kind`` is ``<root>/<kind>/<key[:2]>/<key>.bin`` (the payload) and ``<key>.json`` (the
key's fields, the payload's size and sha256), each written atomically, the JSON last. :func:`get`
checks that the JSON parses, names this key and matches the payload's size and sha256; anything
else (a partial or truncated entry, a missing file, flipped bits) is logged and counts as a miss,
and the caller's fresh result overwrites it. A failed write (full or read-only disk) logs a
warning: the cache only saves time.

Root: ``$FLUXIMP_STAGE_CACHE``, else ``$FLUXIMP_CACHE/stage-cache``, else
``~/.cache/flux-impressionism/stage-cache`` (next to the quantize-once cache): outside the
working copy, so ``dvc exp run --temp`` and queued experiments, which run in a copy under
``.dvc/tmp/exps/``, share it. A relative value is taken from the main repo's root
(stages.core.lineage.repo_root), never from such a copy. Not a DVC output, never committed;
delete the folder (or one kind's subfolder) to clear it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

from stages.core import lineage
from stages.core.io import atomic_file

log = logging.getLogger(__name__)
HASH_FILES_BELOW = 64 * 2**20  # folder_identity: smaller files are identified by their content
CODE_ROOT = Path(__file__).resolve().parents[2]


def root() -> Path:
    for var, sub in (("FLUXIMP_STAGE_CACHE", None), ("FLUXIMP_CACHE", "stage-cache")):
        if os.environ.get(var):
            path = Path(os.environ[var]).expanduser()
            if not path.is_absolute():  # from the main repo, also in a temp experiment's copy
                path = lineage.repo_root() / path
            return path / sub if sub else path
    return Path.home() / ".cache" / "flux-impressionism" / "stage-cache"


def digest(fields: dict) -> str:
    """The key of ``fields``: sha256 of their canonical JSON."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_identity(path: Path) -> str:
    """What a model file's bytes are, cheaply: a Hugging Face cache blob is named by its content
    hash; a file below HASH_FILES_BELOW is hashed; a larger one is known by size and mtime."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and real != Path(path).absolute():
        return f"blob:{real.name}"
    st = real.stat()
    if st.st_size < HASH_FILES_BELOW:
        return "sha256:" + hashlib.sha256(real.read_bytes()).hexdigest()
    return f"size:{st.st_size}:mtime:{st.st_mtime_ns}"


def folder_identity(folder: Path) -> dict[str, str]:
    """``{file name: file_identity}`` of a model folder's weights and configs (no paths: the same
    model copied elsewhere, e.g. rebuilt in a temp experiment's copy, has the same identity)."""
    return {f.name: file_identity(f) for f in sorted(Path(folder).iterdir())
            if f.suffix in (".safetensors", ".json", ".bin")}


def device_class(device) -> str:
    """``cpu``, or ``cuda:<card name>``: results from different GPU models differ in the last bits."""
    import torch

    device = torch.device(device)
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def code_identity(*sources: str) -> dict[str, str]:
    """``{path: sha256}`` of source files (paths from the repo root): the code that computes a
    cached result is part of its key, so an edit there computes it again."""
    return {src: hashlib.sha256((CODE_ROOT / src).read_bytes()).hexdigest() for src in sources}


def _files(kind: str, key: str) -> tuple[Path, Path]:
    folder = root() / kind / key[:2]
    return folder / f"{key}.bin", folder / f"{key}.json"


def get(kind: str, key: str) -> Optional[bytes]:
    """The payload stored under ``key``, or None (no entry, or a damaged one: logged)."""
    data, meta = _files(kind, key)
    if not data.exists() and not meta.exists():
        return None
    try:
        info = json.loads(meta.read_text())
        payload = data.read_bytes()
        if info.get("key") != key or info.get("size") != len(payload) or \
                info.get("sha256") != hashlib.sha256(payload).hexdigest():
            raise ValueError("size or sha256 does not match the entry's JSON")
        return payload
    except (OSError, ValueError, AttributeError) as err:
        log.warning("damaged %s cache entry %s (%s): computing it again", kind, data.with_suffix(""), err)
        return None


def put(kind: str, key: str, fields: dict, payload: bytes) -> None:
    """Store ``payload`` under ``key`` (atomically, the JSON last); a failure only logs."""
    data, meta = _files(kind, key)
    try:
        data.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(data, suffix=".bin") as tmp:
            Path(tmp).write_bytes(payload)
        with atomic_file(meta, suffix=".json") as tmp:
            Path(tmp).write_text(json.dumps({"key": key, "size": len(payload),
                                             "sha256": hashlib.sha256(payload).hexdigest(),
                                             "fields": fields}, sort_keys=True, indent=1, default=str))
    except OSError as err:
        log.warning("could not write the %s cache entry %s: %s", kind, data, err)
