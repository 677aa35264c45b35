"""The ``folder`` source: a user's directory of images (``data.path``), searched recursively.

Files with a common image extension are candidates (the bytes decide whether they really are
images: a ``.jpg`` holding text is rejected as ``not_image``). Other files are listed in the
report as ignored, never silently dropped.

Optional sidecar metadata, in any folder of the tree: ``metadata.csv`` or ``metadata.jsonl`` (the
Hugging Face imagefolder convention) with a ``file_name`` column (relative to that sidecar's
folder) and any of ``title``, ``artist``, ``style``, ``genre``, ``date``, ``description``,
``caption``, ``license``, ``provenance``. Unknown columns are ignored; a sidecar row naming a
missing file is reported.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pbm", ".tga", ".ico", ".jfif"}
SIDECARS = ("metadata.csv", "metadata.jsonl")
FIELDS = ("title", "artist", "style", "genre", "date", "description", "caption", "license", "provenance")


def _read_sidecar(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return list(csv.DictReader(fh))
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    return rows


def load_metadata(root: Path) -> tuple[dict[str, dict], list[str]]:
    """Sidecar metadata of every folder under ``root``: resolved file path -> fields, and problems."""
    meta, problems = {}, []
    for sidecar in sorted(p for name in SIDECARS for p in root.rglob(name)):
        for row in _read_sidecar(sidecar):
            name = row.get("file_name") or row.get("file") or row.get("path")
            if not name:
                problems.append(f"{sidecar}: a row without file_name")
                continue
            target = (sidecar.parent / name).resolve()
            if not target.exists():
                problems.append(f"{sidecar}: {name} does not exist")
            fields = {k: (str(v) if v not in (None, "") else None) for k, v in row.items() if k in FIELDS}
            meta[str(target)] = fields
    return meta, problems


def scan(root: str | Path) -> tuple[list[dict], dict]:
    """Candidates sorted by path (``path`` relative to ``root``, as recorded; ``file`` to read;
    sidecar metadata), and a summary for the report."""
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"data.path = {str(root)!r} is not a directory (data.source=folder needs one)")
    meta, problems = load_metadata(root)
    candidates, ignored = [], []
    for p in sorted(root.rglob("*")):
        if p.name in SIDECARS or p.is_dir() and not p.is_symlink():
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            fields = meta.get(str(p.resolve()), {})
            candidates.append({"path": p.relative_to(root).as_posix(), "file": str(p), "source": "folder", **fields,
                               "provenance": fields.get("provenance") or f"folder:{p.relative_to(root)}"})
        else:
            ignored.append(str(p.relative_to(root)))
    for msg in problems:
        log.warning("sidecar: %s", msg)
    described = sum(1 for c in candidates if c.get("title") or c.get("artist") or c.get("caption"))
    return candidates, {"ignored_files": len(ignored), "ignored_examples": ignored[:10],
                        "sidecar_problems": problems[:20], "with_sidecar_metadata": described}
