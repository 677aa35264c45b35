"""The ``folder`` source: a user's directory of images (``data.path``), searched recursively.

Files with a common image extension are candidates (the bytes decide whether they really are
images: a ``.jpg`` holding text is rejected as ``not_image``). Other files are listed in the
report as ignored, never silently dropped.

Optional sidecar metadata, in any folder of the tree: ``metadata.csv`` or ``metadata.jsonl`` (the
Hugging Face imagefolder convention) with a ``file_name`` column (relative to that sidecar's
folder) and any of ``title``, ``artist``, ``style``, ``genre``, ``date``, ``description``,
``caption``, ``license``, ``provenance``. Unknown columns are ignored; a sidecar row naming a
missing file is reported.

Trainer conventions (ai-toolkit, SimpleTuner, kohya), set in ``data.folder``:

- **Caption files.** ``0001.png`` + ``0001.txt`` (or ``.caption``: ``data.folder.caption_extensions``,
  the first one found wins) in the same folder: the file's text becomes the image's ``caption``, and
  wins over a sidecar's ``caption`` column. The caption stage keeps such captions (adding the trigger
  where it is missing) unless ``caption.keep_existing`` is false, when templates win. A caption file
  that is empty, not UTF-8 or larger than ``data.folder.caption_max_bytes`` rejects its image with
  reason ``bad_caption`` and the cause (data/raw/rejects.parquet): training on a template instead of
  what the user wrote would be a silent loss. A caption file without an image is listed as ignored.
- **Repeats.** kohya's ``N_name`` folders (``10_monet/``) mean "each image N times per epoch": the
  nearest such folder above an image sets its ``repeats`` column, which the training sampler honours
  (stages/models/cache.py). ``data.folder.repeats: false`` reads ``10_monet`` as a plain name.
"""
from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pbm", ".tga", ".ico", ".jfif"}
SIDECARS = ("metadata.csv", "metadata.jsonl")
REPEATS_FOLDER = re.compile(r"^([1-9][0-9]{0,5})_(.+)$")
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


def read_caption(path: Path, max_bytes: int) -> tuple[str | None, str | None]:
    """``(caption, None)``, or ``(None, why)`` for an empty, non-UTF-8 or oversized caption file."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return None, f"{path.name}: {size} bytes > data.folder.caption_max_bytes = {max_bytes}"
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, f"{path.name}: not UTF-8 (byte {exc.start}: {exc.reason})"
    except OSError as exc:
        return None, f"{path.name}: unreadable ({exc.strerror or exc})"
    text = " ".join(text.replace("\x00", " ").split())
    if not text:
        return None, f"{path.name}: empty"
    return text, None


def repeats_of(rel: Path) -> int | None:
    """N of the nearest kohya ``N_name`` folder above ``rel`` (a path relative to the root), else None."""
    for part in reversed(rel.parent.parts):
        m = REPEATS_FOLDER.match(part)
        if m:
            return int(m.group(1))
    return None


def _caption_file(image: Path, extensions: list[str]) -> Path | None:
    for ext in extensions:
        candidate = image.with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


def _candidate(p: Path, root: Path, fields: dict, opts) -> dict:
    """One image file as a candidate: sidecar fields, then its caption file and repeats."""
    rel = p.relative_to(root)
    cand = {"path": rel.as_posix(), "file": str(p), "source": "folder", **fields,
            "provenance": fields.get("provenance") or f"folder:{rel}"}
    cap_file = _caption_file(p, opts.caption_extensions)
    if cap_file is not None:
        cand["_caption_file"] = cap_file
        text, why = read_caption(cap_file, opts.caption_max_bytes)
        if why:
            cand["reject"] = ("bad_caption", why)
        else:
            cand["caption"] = text  # the caption file wins over a sidecar's caption
    if opts.repeats and (n := repeats_of(rel)) is not None:
        cand["repeats"] = n
    return cand


def scan(root: str | Path, opts=None) -> tuple[list[dict], dict]:
    """Candidates sorted by path (``path`` relative to ``root``, as recorded; ``file`` to read;
    sidecar metadata; ``caption`` from a caption file; ``repeats``; ``reject`` = (reason, detail)
    for a bad caption file), and a summary for the report. ``opts``: ``data.folder`` params."""
    from stages.core.params import FolderSource

    opts = opts or FolderSource()
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"data.path = {str(root)!r} is not a directory (data.source=folder needs one)")
    meta, problems = load_metadata(root)
    files = sorted(p for p in root.rglob("*") if p.name not in SIDECARS and (p.is_symlink() or not p.is_dir()))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    candidates = [_candidate(p, root, meta.get(str(p.resolve()), {}), opts) for p in images]
    used = {c.pop("_caption_file") for c in candidates if c.get("_caption_file")}
    exts = {e.lower() for e in opts.caption_extensions}
    ignored = [str(p.relative_to(root)) + (" (caption file without an image)" if p.suffix.lower() in exts else "")
               for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS and p not in used]
    for msg in problems:
        log.warning("sidecar: %s", msg)
    described = sum(1 for c in candidates if any(meta.get(str(Path(c["file"]).resolve()), {}).get(k)
                                                  for k in ("title", "artist", "caption")))
    repeated = [c["repeats"] for c in candidates if c.get("repeats")]
    return candidates, {"ignored_files": len(ignored), "ignored_examples": ignored[:10],
                        "sidecar_problems": problems[:20], "with_sidecar_metadata": described,
                        "caption_files": len(used),
                        "bad_caption_files": sum(1 for c in candidates if "reject" in c),
                        "repeat_folders": {"images": len(repeated), "max_repeats": max(repeated, default=0)}}
