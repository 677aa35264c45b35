"""Every candidate image is either normalised to 8-bit sRGB RGB or rejected with a reason code.

Storage rule (documented in the README): a file that is already JPEG, PNG or WebP, 8-bit RGB,
single-frame, upright (no EXIF rotation) and sRGB (no ICC profile, or an sRGB one) is stored
**as its original bytes**. Anything else (CMYK, 16-bit, grayscale, palette, alpha, EXIF-rotated,
a non-sRGB ICC profile, an animation, a TIFF/BMP/GIF) is converted and re-encoded as **PNG**:
lossless with respect to the decoded, converted pixels, one rule for all. Alpha is composited
onto white; only the first frame of an animation is kept.

Reject reasons (the ``reason`` column of ``data/raw/rejects.parquet``):
"""
from __future__ import annotations

import contextlib
import io
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from stages.core import files
from stages.core.images import encode_png
from stages.core.shards import content_id

REASONS = {
    "unreadable": "the path could not be read (permissions, vanished, a directory, a symlink loop, a dangling link)",
    "outside_folder": "a symlink or sidecar row (data.source=folder) leading outside data.path: never read",
    "special_file": "a FIFO, device or socket under an image name: never opened",
    "too_large": "a file over data.max_bytes: not read",
    "empty": "zero-byte file",
    "not_image": "content is not an image Pillow can identify (whatever the extension says)",
    "decompression_bomb": "more pixels than data.max_pixels",
    "truncated": "the header parsed but the pixel data is truncated or corrupt",
    "decode_error": "any other failure while opening or converting",
    "too_small": "shorter side under data.min_side (after EXIF rotation)",
    "duplicate_bytes": "byte-identical to an image already stored (same id): stored once",
    "bad_caption": "its caption file (data.source=folder) is empty, not UTF-8, not a regular file or over "
                   "data.folder.caption_max_bytes",
}
__doc__ += "\n".join(f"- ``{k}``: {v}" for k, v in REASONS.items()) + "\n"

KEEP_FORMATS = {"JPEG", "PNG", "WEBP"}
EXIF_ORIENTATION = 0x0112


class Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Normalized:
    data: bytes          # bytes to store (original or PNG re-encode)
    format: str          # JPEG / PNG / WEBP
    width: int
    height: int
    reencoded: bool
    note: str = ""       # why it was re-encoded


def _is_srgb(icc: Optional[bytes]) -> bool:
    if not icc:
        return True
    try:
        desc = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc)))
    except Exception:  # an unreadable profile: treat as sRGB rather than guess a conversion
        return True
    return "srgb" in desc.lower().replace(" ", "")


def _to_srgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc and not _is_srgb(icc) and img.mode in ("RGB", "CMYK"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:
            pass  # fall back to Pillow's plain conversion below
    return img


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: 16-bit and float scaled (not clipped), alpha onto white."""
    img = _to_srgb(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" and arr.max() <= 1.0 else (65535.0 if arr.max() > 255 else 255.0)
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def _png_bit_depth(data: bytes) -> int:
    return data[24] if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 else 8


_pixels_lock = threading.Lock()


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``, process-wide) at
    ``max_pixels`` for this block only; the caller's value is restored after. Threads of one
    process normalise one at a time (the download stage uses processes)."""
    with _pixels_lock:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own guard fires at 2x; ours at 1x
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def normalize(data: bytes, min_side: int, max_pixels: int) -> Normalized:
    """Decode ``data``; return what to store, or raise :class:`Reject`."""
    if not data:
        raise Reject("empty", "zero-byte file")
    with pixel_limit(max_pixels):
        return _normalize(data, min_side, max_pixels)


def _normalize(data: bytes, min_side: int, max_pixels: int) -> Normalized:
    try:
        with warnings.catch_warnings():  # over the limit is rejected below, not warned about
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # no bytes of the file in the detail: rejects.parquet is tracked and shared
        raise Reject("not_image", f"not a recognised image format ({len(data)} bytes)") from None
    except Image.DecompressionBombError as exc:
        raise Reject("decompression_bomb", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any parser error is a reject, never a crash
        raise Reject("decode_error", f"{type(exc).__name__}: {exc}") from None
    fmt, (w, h) = img.format, img.size
    if w * h > max_pixels:
        raise Reject("decompression_bomb", f"{w}x{h} = {w * h} px > data.max_pixels = {max_pixels}")
    frames = getattr(img, "n_frames", 1)
    try:
        img.seek(0)
        img.load()
    except Image.DecompressionBombError as exc:
        raise Reject("decompression_bomb", str(exc)) from None
    except Exception as exc:  # noqa: BLE001
        raise Reject("truncated", f"{type(exc).__name__}: {exc}") from None
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
        why = []
        if fmt not in KEEP_FORMATS:
            why.append(f"format {fmt}")
        if img.mode != "RGB" or _png_bit_depth(data) != 8:
            why.append(f"mode {img.mode}" + (f"/{_png_bit_depth(data)}-bit" if fmt == "PNG" else ""))
        if frames > 1:
            why.append(f"{frames} frames")
        if orientation not in (0, 1):
            why.append(f"EXIF orientation {orientation}")
        if not _is_srgb(img.info.get("icc_profile")):
            why.append("non-sRGB ICC profile")
        out = to_rgb8(ImageOps.exif_transpose(img)) if why else img
    except Exception as exc:  # noqa: BLE001
        raise Reject("decode_error", f"{type(exc).__name__}: {exc}") from None
    if min(out.size) < min_side:
        raise Reject("too_small", f"{out.width}x{out.height} < data.min_side = {min_side}")
    if not why:
        return Normalized(data, fmt, w, h, False)
    out.info = {}  # converted pixels are sRGB now: drop the old ICC profile, EXIF and the rest
    return Normalized(encode_png(out), "PNG", out.width, out.height, True, ", ".join(why))


def read_bytes(path: str | Path, max_bytes: Optional[int] = None) -> bytes:
    """A regular file's bytes, bounded (stages.core.files.read_regular), or a :class:`Reject`."""
    try:
        return files.read_regular(path, max_bytes)
    except files.Refused as exc:
        raise Reject(exc.reason, exc.detail) from None


def process(candidate: dict, min_side: int, max_pixels: int, max_bytes: Optional[int] = None) -> dict:
    """One candidate (``path`` and ``data`` bytes, or ``file`` to read) -> an image row
    (``ok`` True, IMAGE_SCHEMA fields + the candidate's metadata) or a reject row (``ok`` False)."""
    data = candidate.get("data")
    path = str(candidate.get("path"))
    try:
        if candidate.get("reject"):  # the source already found a reason (e.g. a bad caption file)
            raise Reject(*candidate["reject"])
        if data is None:
            data = read_bytes(candidate.get("file") or path, max_bytes)
        norm = normalize(data, min_side, max_pixels)
    except Reject as rej:
        return {"ok": False, "path": path, "id": content_id(data) if data else None,
                "reason": rej.reason, "detail": rej.detail[:500]}
    row = {k: v for k, v in candidate.items() if k not in ("data", "file", "reject")}
    row.update(ok=True, id=content_id(norm.data), image=norm.data, format=norm.format,
               width=norm.width, height=norm.height, path=path, reencoded=norm.reencoded, note=norm.note)
    return row
