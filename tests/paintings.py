"""Constructed test paintings shared by the dedupe and filter tests."""
import numpy as np
from PIL import Image, ImageDraw


def painting(composition: int, strokes: int, size=(128, 96)) -> Image.Image:
    """A composition (big shapes, seeded by ``composition``) under a texture of short strokes
    (seeded by ``strokes``): equal composition + other strokes = a 'series' painting, not a copy."""
    rng = np.random.default_rng(composition)
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(60, 200, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(5):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        r = rng.integers(10, 40)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    srng = np.random.default_rng(10_000 + strokes)
    for _ in range(900):
        x, y = srng.integers(0, size[0]), srng.integers(0, size[1])
        base = np.array(img.getpixel((int(x), int(y))))
        col = tuple(int(c) for c in np.clip(base + srng.integers(-45, 46, 3), 0, 255))
        draw.line((x, y, x + srng.integers(-5, 6), y + srng.integers(-3, 4)), fill=col, width=2)
    return img
