"""The ``folder`` source: a user's directory of images (``data.path``), searched recursively.

Files with a common image extension are candidates (the bytes decide whether they really are
images: a ``.jpg`` holding text is rejected as ``not_image``). Other files are listed in the
report as ignored, never silently dropped.

**Contained reads.** Nothing outside ``data.path`` is ever opened. A symlink is followed only when
its resolved target stays inside the folder (a link to a sibling image is read as that image);
a link that leads outside, a ``metadata.csv`` row naming ``../x`` or an absolute path, is a
``outside_folder`` reject, never read. Symlinked *folders* are not descended into (an inside one
is listed as ignored: its files are read where they really are). Only regular files are opened: a
FIFO, device or socket is a ``special_file`` reject, a symlink loop or a dangling link an
``unreadable`` one, a file over ``data.max_bytes`` a ``too_large`` one (not read).

Optional sidecar metadata, in any folder of the tree: ``metadata.csv`` or ``metadata.jsonl`` (the
Hugging Face imagefolder convention) with a ``file_name`` column (relative to that sidecar's
folder) and any of ``title``, ``artist``, ``style``, ``genre``, ``date``, ``description``,
``caption``, ``license``, ``provenance``. Unknown columns are ignored; a sidecar row naming a
missing file is reported. A sidecar that is not UTF-8 is read as cp1252 (else Latin-1) with a
warning naming it; a malformed CSV or a JSON line that does not parse is reported by file and line
(the other rows are kept).

Trainer conventions (ai-toolkit, SimpleTuner, kohya), set in ``data.folder``:

- **Caption files.** ``0001.png`` + ``0001.txt`` (or ``.caption``: ``data.folder.caption_extensions``,
  the first one found wins; the others are listed as ignored) in the same folder: the file's text
  becomes the image's ``caption``, and wins over a sidecar's ``caption`` column. The caption stage
  keeps such captions (adding the trigger where it is missing) unless ``caption.keep_existing`` is
  false, when templates win. A caption file that is empty, not UTF-8, not a regular file or larger
  than ``data.folder.caption_max_bytes`` rejects its image with reason ``bad_caption`` and the
  cause (data/raw/rejects.parquet): training on a template instead of what the user wrote would be
  a silent loss; one that links outside the folder rejects it as ``outside_folder``. A caption file
  without an image is listed as ignored.
- **Repeats.** kohya's ``N_name`` folders (``10_monet/``) mean "each image N times per epoch": the
  nearest such folder above an image sets its ``repeats`` column, which the training sampler honours
  (stages/models/cache.py). ``data.folder.repeats: false`` reads ``10_monet`` as a plain name.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

from stages.core.files import Refused, read_regular

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pbm", ".tga", ".ico", ".jfif"}
SIDECARS = ("metadata.csv", "metadata.jsonl")
REPEATS_FOLDER = re.compile(r"^([1-9][0-9]{0,5})_(.+)$")
FIELDS = ("title", "artist", "style", "genre", "date", "description", "caption", "license", "provenance")
SPECIAL = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
           stat.S_IFSOCK: "a socket"}


@dataclass
class Entry:
    """One name in the tree: ``real`` (resolved, inside the root) to read, or ``reject`` = (reason, detail)."""
    rel: str
    real: Optional[str] = None
    reject: Optional[tuple[str, str]] = None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _classify(full: str, rel: str, root: str) -> Entry:
    """Resolve one file name; never touches what lies outside ``root``."""
    real = os.path.realpath(full)
    if not _inside(real, root):
        return Entry(rel, reject=("outside_folder", "a symlink that leads outside data.path: not read"))
    try:
        st = os.stat(real)
    except OSError as exc:
        why = {errno.ELOOP: "a symlink loop", errno.ENOENT: "a dangling symlink"}.get(exc.errno, exc.strerror)
        return Entry(rel, reject=("unreadable", str(why)))
    if not stat.S_ISREG(st.st_mode):
        kind = SPECIAL.get(stat.S_IFMT(st.st_mode), "not a regular file")
        return Entry(rel, reject=("special_file", f"{kind}: never opened"))
    return Entry(rel, real=real)


def walk(root: Path) -> tuple[dict[str, Entry], list[str], list[str]]:
    """Every file name under ``root`` (resolved) -> :class:`Entry` by posix path relative to
    ``root``; ignored folder links and walk problems."""
    root_s = str(root)
    entries, ignored, problems = {}, [], []
    for dirpath, dirnames, filenames in os.walk(root_s, followlinks=False,
                                                onerror=lambda e: problems.append(f"{e.filename}: {e.strerror}")):
        for name in sorted(dirnames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full):  # not descended into: its files are read where they are (or not at all)
                rel = Path(full).relative_to(root).as_posix()
                if _inside(os.path.realpath(full), root_s):
                    ignored.append(f"{rel} (symlink to a folder inside data.path: not followed)")
                else:
                    entries[rel] = Entry(rel, reject=("outside_folder", "a symlink to a folder outside data.path: "
                                                                        "not read"))
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = Path(full).relative_to(root).as_posix()
            entries[rel] = _classify(full, rel, root_s)
    return dict(sorted(entries.items())), ignored, problems


def decode_text(data: bytes, name: str) -> tuple[str, Optional[str]]:
    """UTF-8 (a BOM is fine); else cp1252, else Latin-1, with a warning naming ``name``."""
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        for enc in ("cp1252", "latin-1"):
            try:
                return data.decode(enc), f"{name}: not UTF-8 (byte {exc.start}), read as {enc}"
            except UnicodeDecodeError:
                continue
    raise AssertionError("latin-1 decodes any bytes")


def _read_sidecar(entry: Entry, max_bytes: int) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line, row) pairs of one sidecar and its problems (file and line named); never raises."""
    try:
        text, warning = decode_text(read_regular(entry.real, max_bytes), entry.rel)
    except Refused as rej:
        return [], [f"{entry.rel}: {rej.detail}"]
    problems = [warning] if warning else []
    rows = []
    if entry.rel.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            for row in reader:
                rows.append((reader.line_num, row))
        except csv.Error as exc:
            problems.append(f"{entry.rel}:{reader.line_num}: not valid CSV ({exc}); the rows after it are skipped")
        return rows, problems
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, a 5000-digit number, deep nesting
            why = getattr(exc, "msg", None) or (str(exc)[:100] if isinstance(exc, ValueError) else "too deeply nested")
            problems.append(f"{entry.rel}:{n}: not valid JSON ({why})")
            continue
        if isinstance(row, dict):
            rows.append((n, row))
        else:
            problems.append(f"{entry.rel}:{n}: not a JSON object")
    return rows, problems


def _target(sidecar: Entry, name: str, entries: dict[str, Entry], root: Path) -> tuple[Optional[str], bool]:
    """(rel path of the entry a sidecar row names, or None; whether the name leads outside)."""
    if "\x00" in name or PurePosixPath(name).is_absolute() or re.match(r"^[A-Za-z]:[\\/]", name):
        return None, True
    rel = posixpath.normpath(posixpath.join(posixpath.dirname(sidecar.rel), name))
    if rel == ".." or rel.startswith("../"):
        return None, True
    if rel in entries:
        return rel, False
    real = os.path.realpath(root / rel)  # through a symlinked folder?
    if not _inside(real, str(root)):
        return None, True
    rel = Path(real).relative_to(root).as_posix() if real != str(root) else "."
    return (rel if rel in entries else None), False


def load_metadata(root: Path, entries: dict[str, Entry], max_bytes: int) -> tuple[dict, list[dict], list[str]]:
    """Sidecar metadata of every folder under ``root``: rel path -> fields, rejects (escaping
    sidecars and rows), and problems."""
    meta, rejects, problems = {}, [], []
    for entry in (e for e in entries.values() if posixpath.basename(e.rel) in SIDECARS):
        if entry.reject:
            rejects.append({"path": entry.rel, "source": "folder", "reject": entry.reject})
            continue
        rows, probs = _read_sidecar(entry, max_bytes)
        problems += probs
        for line, row in rows:
            name = row.get("file_name") or row.get("file") or row.get("path")
            if not isinstance(name, str) or not name:
                problems.append(f"{entry.rel}:{line}: a row without a file_name")
                continue
            rel, outside = _target(entry, name, entries, root)
            if outside:
                rejects.append({"path": f"{entry.rel}:{line}", "source": "folder",
                                "reject": ("outside_folder", f"file_name {name[:200]!r} is outside data.path: "
                                                             "not read")})
                continue
            if rel is None:
                problems.append(f"{entry.rel}:{line}: {name} does not exist")
                continue
            meta[rel] = {k: (str(v) if v not in (None, "") else None) for k, v in row.items() if k in FIELDS}
    return meta, rejects, problems


def read_caption(path: str | Path, max_bytes: int) -> tuple[str | None, str | None]:
    """``(caption, None)``, or ``(None, why)`` for an empty, non-UTF-8, oversized or non-regular caption file."""
    name = Path(path).name
    try:
        text = read_regular(path, max_bytes, what="data.folder.caption_max_bytes").decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, f"{name}: not UTF-8 (byte {exc.start}: {exc.reason})"
    except Refused as rej:
        return None, f"{name}: {rej.detail}"
    text = " ".join(text.replace("\x00", " ").split())
    if not text:
        return None, f"{name}: empty"
    return text, None


def repeats_of(rel: Path) -> int | None:
    """N of the nearest kohya ``N_name`` folder above ``rel`` (a path relative to the root), else None."""
    for part in reversed(rel.parent.parts):
        m = REPEATS_FOLDER.match(part)
        if m:
            return int(m.group(1))
    return None


def _caption_file(rel: str, entries: dict[str, Entry], extensions: list[str]) -> Entry | None:
    """The image's caption file: the first of ``extensions`` that exists."""
    stem = posixpath.splitext(rel)[0]
    return next((entries[stem + ext] for ext in extensions if stem + ext in entries), None)


def _candidate(entry: Entry, fields: dict, cap: Entry | None, opts) -> dict:
    """One image file as a candidate: sidecar fields, then its caption file and repeats."""
    cand = {"path": entry.rel, "source": "folder", **fields,
            "provenance": fields.get("provenance") or f"folder:{entry.rel}"}
    if entry.reject:
        cand["reject"] = entry.reject
        return cand
    cand["file"] = entry.real
    if cap is not None:
        name = posixpath.basename(cap.rel)
        if cap.reject and cap.reject[0] == "outside_folder":
            cand["reject"] = ("outside_folder", f"caption file {name}: {cap.reject[1]}")
        elif cap.reject:
            cand["reject"] = ("bad_caption", f"{name}: {cap.reject[1]}")
        else:
            text, why = read_caption(cap.real, opts.caption_max_bytes)
            if why:
                cand["reject"] = ("bad_caption", why)
            else:
                cand["caption"] = text  # the caption file wins over a sidecar's caption
    if opts.repeats and (n := repeats_of(Path(entry.rel))) is not None:
        cand["repeats"] = n
    return cand


def scan(root: str | Path, opts=None, max_bytes: int = 512 * 2 ** 20) -> tuple[list[dict], dict]:
    """Candidates sorted by path (``path`` relative to ``root``, as recorded; ``file`` to read, the
    resolved path inside ``root``; sidecar metadata; ``caption`` from a caption file; ``repeats``;
    ``reject`` = (reason, detail) for an entry refused unread), and a summary for the report.
    ``opts``: ``data.folder`` params; ``max_bytes``: ``data.max_bytes`` (bounds sidecars too)."""
    from stages.core.params import FolderSource

    opts = opts or FolderSource()
    if not Path(root).is_dir():
        raise SystemExit(f"data.path = {str(root)!r} is not a directory (data.source=folder needs one)")
    root = Path(os.path.realpath(root))
    entries, ignored, problems = walk(root)
    meta, rejects, sidecar_problems = load_metadata(root, entries, max_bytes)
    problems += sidecar_problems
    images = [e for rel, e in entries.items() if posixpath.splitext(rel)[1].lower() in IMAGE_EXTENSIONS]
    exts = list(opts.caption_extensions)
    captions = {rel: _caption_file(rel, entries, exts) for rel in (e.rel for e in images)}
    fields = {e.rel: meta.get(e.rel) or meta.get(_real_rel(e, root)) or {} for e in images}
    candidates = [_candidate(e, fields[e.rel], captions[e.rel], opts) for e in images]
    used = {c.rel for c in captions.values() if c is not None}
    stems = {posixpath.splitext(e.rel)[0] for e in images}
    lower_exts = {e.lower() for e in exts}
    for rel, e in entries.items():
        ext = posixpath.splitext(rel)[1].lower()
        if ext in IMAGE_EXTENSIONS or rel in used or posixpath.basename(rel) in SIDECARS:
            continue
        if e.reject:  # an escaping or special entry is a recorded reject whatever its name
            rejects.append({"path": rel, "source": "folder", "reject": e.reject})
        elif ext in lower_exts and posixpath.splitext(rel)[0] in stems:
            ignored.append(f"{rel} (caption file not used: an earlier data.folder.caption_extensions entry won)")
        else:
            ignored.append(rel + (" (caption file without an image)" if ext in lower_exts else ""))
    for msg in problems[:20]:
        log.warning("folder: %s", msg)
    if len(problems) > 20:
        log.warning("folder: ... and %d more sidecar problems", len(problems) - 20)
    described = sum(1 for f in fields.values() if any(f.get(k) for k in ("title", "artist", "caption")))
    repeated = [c["repeats"] for c in candidates if c.get("repeats")]
    candidates = sorted(candidates + rejects, key=lambda c: c["path"])
    return candidates, {"ignored_files": len(ignored), "ignored_examples": ignored[:10],
                        "sidecar_problems": problems[:20], "with_sidecar_metadata": described,
                        "caption_files": len(used),
                        "bad_caption_files": sum(1 for c in candidates if c.get("reject", ("",))[0] == "bad_caption"),
                        "repeat_folders": {"images": len(repeated), "max_repeats": max(repeated, default=0)}}


def _real_rel(entry: Entry, root: Path) -> str | None:
    return Path(entry.real).relative_to(root).as_posix() if entry.real else None
