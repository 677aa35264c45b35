"""Image building blocks shared by stages: decode (the one place stored image bytes become
pictures), encode, thumbnails, contact sheets. Bytes from outside the project are first vetted by
stages/data/normalize.py (formats, decompression bombs, truncation) when they are downloaded."""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from stages.core import pool


def decode(data: bytes, min_side: Optional[int] = None, with_size: bool = False):
    """Bytes (as stored in shards) -> RGB PIL image, EXIF orientation applied.

    ``min_side`` (for measuring): a JPEG is decoded at a reduced DCT scale, both sides still >=
    ``min_side`` px, several times faster on big files. ``with_size``: return ``(image, (width,
    height))`` with the full size, EXIF rotation applied."""
    img = Image.open(io.BytesIO(data))
    size = img.size
    if with_size and img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that swap sides
        size = size[::-1]
    if min_side and img.format == "JPEG":
        img.draft("RGB", (min_side, min_side))
    img = ImageOps.exif_transpose(img)
    img = img.convert("RGB") if img.mode != "RGB" else img
    return (img, size) if with_size else img


def load(path: os.PathLike | str) -> Image.Image:
    """An image file (a rendered sample, say) -> RGB PIL image, as :func:`decode`."""
    with open(path, "rb") as fh:
        return decode(fh.read())


def load_many(paths: Sequence[os.PathLike | str]) -> list[Image.Image]:
    """:func:`load` of each file, decoded on threads (stages.core.pool.threads), in order."""
    with pool.threads("load") as ex:
        return list(ex.map(load, paths))


def to_array(img: Image.Image) -> np.ndarray:
    """RGB PIL -> float32 array in [0, 1], shape (H, W, 3)."""
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def encode_png(img: Image.Image, compress_level: int = 6) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=compress_level)
    return buf.getvalue()


def png_pool() -> ThreadPoolExecutor:
    """Threads that encode PNGs (``pool.submit(encode_png, img)``) while the caller goes on decoding
    the next batch on the GPU. Pillow's zlib encoder releases the GIL, so N threads encode about N
    images at once (a 1024² PNG takes 0.2-0.5 s on one core: 160 of them were a minute of a sample
    stage); the bytes are those of :func:`encode_png` one by one."""
    return pool.threads("png")


def encode_pngs(images: Sequence[Image.Image]) -> list[bytes]:
    """:func:`encode_png` of each image, on :func:`png_pool`'s threads, in order."""
    with png_pool() as pool:
        return list(pool.map(encode_png, images))


def encode_jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def contact_sheet(images: Sequence[Image.Image], labels: Optional[Sequence[str]] = None,
                  cols: int = 8, cell: int = 128, title: Optional[str] = None) -> Image.Image:
    """Thumbnails side by side in a grid, each with an optional label under it."""
    n = max(len(images), 1)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    label_h = 14 if labels else 0
    top = 18 if title else 0
    sheet = Image.new("RGB", (cols * cell, top + rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 2), title, fill="black")
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        thumb = img.copy()
        thumb.thumbnail((cell, cell))
        x = c * cell + (cell - thumb.width) // 2
        y = top + r * (cell + label_h) + (cell - thumb.height) // 2
        sheet.paste(thumb, (x, y))
        if labels:
            draw.text((c * cell + 2, top + r * (cell + label_h) + cell), str(labels[i])[: cell // 6],
                      fill="black")
    return sheet
