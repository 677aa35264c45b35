"""Render a :class:`~stages.data.scenes.Scene` as an Impressionist painting (or a smooth photo).

Two steps:

1. :func:`layout` draws the scene's flat plan (regions of colour, a region map telling each
   pixel what it belongs to: sky, water, ground, foliage, object). Shadows in the plan are
   *coloured* (blue-violet), never black or grey: the Impressionists' rule.
2. :func:`paint` lays short visible strokes over a light ground. Each stroke takes the plan's
   colour at its position and replaces it with one of the few *pure pigments* nearest to it
   (tinted with white to match its value, no earth colours, no black), so neighbouring strokes
   are unmixed colours side by side that mix only in the eye. Stroke direction follows the
   region (flat on water, free in foliage). The key is high: the ground is lifted toward white
   and nothing reaches pure white or black, so a good painting has no clipped pixels.

:func:`photo` renders the same plan smoothly (blurred, desaturated, grey shadows): the
"photo-like" contrast set for style and trait metrics.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from stages.data.scenes import ARTISTS, Scene

SKY, WATER, GROUND, FOLIAGE, OBJECT, LIGHT = range(6)
# Stroke angle (degrees) centre and spread per region.
ANGLES = {SKY: (15, 35), WATER: (0, 8), GROUND: (10, 30), FOLIAGE: (60, 90), OBJECT: (90, 25), LIGHT: (0, 90)}
_ANGLE_TABLE = np.array([ANGLES[r] for r in range(len(ANGLES))], np.float64)
PIGMENTS = np.array([  # pure, saturated, high-key pigments (RGB 0-1); no earths, no black
    (0.98, 0.92, 0.30),  # lemon yellow
    (0.98, 0.76, 0.16),  # cadmium yellow
    (0.97, 0.55, 0.18),  # cadmium orange
    (0.90, 0.30, 0.20),  # vermilion
    (0.92, 0.48, 0.62),  # rose madder
    (0.58, 0.38, 0.78),  # cobalt violet
    (0.28, 0.32, 0.82),  # ultramarine
    (0.30, 0.52, 0.90),  # cobalt blue
    (0.38, 0.72, 0.90),  # cerulean
    (0.16, 0.60, 0.52),  # viridian
    (0.32, 0.76, 0.36),  # emerald green
    (0.62, 0.82, 0.26),  # yellow green
    (0.97, 0.96, 0.92),  # flake white
])
LUMA = np.array([0.299, 0.587, 0.114])
SHADOW = (0.42, 0.40, 0.78)        # the blue-violet of an Impressionist shadow
PHOTO_SHADOW = (0.22, 0.21, 0.20)  # a photograph's near-black shadow

_SKIES = {"morning": ((0.62, 0.74, 0.92), (0.98, 0.86, 0.76)), "midday": ((0.36, 0.58, 0.92), (0.78, 0.88, 0.98)),
          "afternoon": ((0.48, 0.64, 0.90), (0.98, 0.90, 0.70)), "sunset": ((0.56, 0.46, 0.78), (0.99, 0.62, 0.40))}
_FIELDS = {"spring": ((0.45, 0.78, 0.36), (0.30, 0.62, 0.30)), "summer": ((0.93, 0.80, 0.36), (0.78, 0.62, 0.24)),
           "autumn": ((0.86, 0.60, 0.30), (0.66, 0.44, 0.26)), "winter": ((0.94, 0.95, 0.97), (0.78, 0.82, 0.92))}
_LEAVES = {"spring": (0.40, 0.72, 0.34), "summer": (0.24, 0.56, 0.32), "autumn": (0.88, 0.52, 0.20),
           "winter": (0.60, 0.52, 0.62)}


def _rgb(c) -> tuple[int, int, int]:
    return tuple(int(round(255 * min(max(v, 0.0), 1.0))) for v in c)


def _gradient(h: int, w: int, top, bottom) -> np.ndarray:
    t = np.linspace(0, 1, h)[:, None, None]
    return np.broadcast_to((1 - t) * np.array(top) + t * np.array(bottom), (h, w, 3)).copy()


class _Plan:
    """Drawing surface for the layout: a colour image and a region map, drawn in step."""

    def __init__(self, base: np.ndarray, regions: np.ndarray, shadow):
        self.img = Image.fromarray((base * 255).astype(np.uint8))
        self.reg = Image.fromarray(regions)
        self.d, self.r, self.shadow = ImageDraw.Draw(self.img), ImageDraw.Draw(self.reg), shadow

    def ellipse(self, box, colour, region):
        self.d.ellipse(box, fill=_rgb(colour))
        self.r.ellipse(box, fill=region)

    def polygon(self, pts, colour, region):
        self.d.polygon(pts, fill=_rgb(colour))
        self.r.polygon(pts, fill=region)

    def rect(self, box, colour, region):
        self.d.rectangle(box, fill=_rgb(colour))
        self.r.rectangle(box, fill=region)

    def cast(self, box):  # a shadow on the ground: coloured in paintings, grey in photos
        self.d.ellipse(box, fill=_rgb(self.shadow))


def layout(scene: Scene, w: int, h: int, rng: np.random.Generator, photo: bool = False):
    """The scene's flat plan: float RGB (h, w, 3) in [0, 1] and a uint8 region map."""
    e, hz = scene.elements, int(h * scene.horizon)
    top, low = _SKIES[scene.time]
    base = _gradient(h, w, top, low)
    regions = np.full((h, w), SKY, np.uint8)
    if scene.genre in ("portrait", "still life"):
        wall = (0.86, 0.80, 0.70) if scene.genre == "still life" else _LEAVES[scene.season]
        base = _gradient(h, w, wall, np.array(wall) * 0.85 + 0.1)
        regions[:] = FOLIAGE if scene.genre == "portrait" else OBJECT
    else:
        river = ((0.55, 0.70, 0.86), (0.22, 0.42, 0.66))
        ground = _FIELDS[scene.season] if (e.get("field") or not e.get("water")) else river
        base[hz:] = _gradient(h - hz, w, *ground)
        regions[hz:] = GROUND if ground is _FIELDS[scene.season] else WATER
    p = _Plan(base, regions, PHOTO_SHADOW if photo else SHADOW)
    s = lambda v: v * w  # noqa: E731  (sizes relative to the width)
    if scene.genre not in ("portrait", "still life"):
        for _ in range(int(rng.integers(1, 4))):  # clouds
            cx, cy = rng.uniform(0, w), rng.uniform(0, hz * 0.7)
            p.ellipse((cx - s(0.12), cy - s(0.03), cx + s(0.12), cy + s(0.03)), (0.97, 0.95, 0.93), SKY)
        if e.get("water") and e.get("field"):  # a river band across the field
            y0 = hz + (h - hz) * 0.25
            p.rect((0, y0, w, y0 + (h - hz) * 0.25), (0.45, 0.62, 0.86), WATER)
    if e.get("sun"):
        cy = hz - s(0.06) if scene.time in ("morning", "sunset") else h * 0.15
        cx, r = rng.uniform(0.2, 0.8) * w, s(0.05)
        p.ellipse((cx - 2 * r, cy - 2 * r, cx + 2 * r, cy + 2 * r), (0.99, 0.90, 0.62), LIGHT)
        p.ellipse((cx - r, cy - r, cx + r, cy + r), (0.99, 0.84, 0.30), LIGHT)
        if regions[min(h - 1, hz + 2), 0] == WATER or e.get("water"):
            p.rect((cx - r * 0.6, hz, cx + r * 0.6, h * 0.95), (0.99, 0.80, 0.40), LIGHT)
    if e.get("buildings"):
        x = 0.0
        while x < w:
            bw, bh = s(rng.uniform(0.08, 0.16)), h * rng.uniform(0.15, 0.3)
            wall = [(0.96, 0.86, 0.74), (0.94, 0.74, 0.66), (0.90, 0.84, 0.62)][int(rng.integers(3))]
            p.rect((x, hz - bh, x + bw, hz + 2), wall, OBJECT)
            p.rect((x + bw * 0.7, hz - bh, x + bw, hz + 2), p.shadow, OBJECT)  # shaded side
            p.polygon([(x, hz - bh), (x + bw / 2, hz - bh - s(0.04)), (x + bw, hz - bh)], (0.40, 0.44, 0.70), OBJECT)
            x += bw
    if e.get("bridge"):
        y = hz + (h - hz) * 0.15
        p.rect((0, y, w, y + s(0.05)), (0.90, 0.74, 0.62), OBJECT)
        for i in range(4):
            ax = (i + 0.5) * w / 4
            p.ellipse((ax - s(0.08), y + s(0.02), ax + s(0.08), y + s(0.14)), (0.40, 0.55, 0.84), WATER)
    if e.get("trees"):
        leaves = _LEAVES[scene.season]
        for i in range(int(rng.integers(3, 7))):
            tx, th = rng.uniform(0, w), h * rng.uniform(0.25, 0.45)
            p.rect((tx - s(0.008), hz - th * 0.3, tx + s(0.008), hz + 2), (0.55, 0.40, 0.50), OBJECT)
            p.ellipse((tx - s(0.05), hz - th, tx + s(0.05), hz - th * 0.2), leaves, FOLIAGE)
            p.ellipse((tx, hz - th * 0.8, tx + s(0.05), hz - th * 0.25), p.shadow, FOLIAGE)
            p.cast((tx - s(0.02), hz - s(0.005), tx + s(0.09), hz + s(0.02)))
    if e.get("poppies"):
        for _ in range(int(w * h / 300)):
            x, y = rng.uniform(0, w), rng.uniform(hz + (h - hz) * 0.4, h)
            p.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), (0.92, 0.25, 0.18), GROUND)
    for i in range(int(e.get("boats") or 0)):
        bx, by = rng.uniform(0.1, 0.8) * w, hz + (h - hz) * rng.uniform(0.2, 0.6)
        hull = [(0.62, 0.26, 0.24), (0.26, 0.32, 0.66), (0.90, 0.62, 0.28)][i % 3]
        p.polygon([(bx, by), (bx + s(0.16), by), (bx + s(0.13), by + s(0.03)), (bx + s(0.03), by + s(0.03))],
                  hull, OBJECT)
        p.polygon([(bx + s(0.08), by - s(0.2)), (bx + s(0.08), by - s(0.01)), (bx + s(0.15), by - s(0.01))],
                  (0.98, 0.95, 0.88), OBJECT)
        p.rect((bx + s(0.02), by + s(0.035), bx + s(0.14), by + s(0.06)), p.shadow, WATER)  # reflection
    for i in range(int(e.get("figures") or 0)):
        fx, fy = rng.uniform(0.1, 0.9) * w, hz + (h - hz) * rng.uniform(0.3, 0.8)
        dress = [(0.98, 0.96, 0.92), (0.86, 0.30, 0.26), (0.30, 0.40, 0.80)][i % 3]
        p.cast((fx - s(0.01), fy - s(0.005), fx + s(0.06), fy + s(0.015)))
        p.polygon([(fx - s(0.02), fy), (fx + s(0.02), fy), (fx + s(0.01), fy - s(0.07)), (fx - s(0.01), fy - s(0.07))],
                  dress, OBJECT)
        p.ellipse((fx - s(0.01), fy - s(0.09), fx + s(0.01), fy - s(0.07)), (0.96, 0.78, 0.66), OBJECT)
    if scene.genre == "portrait":
        cx = w * rng.uniform(0.4, 0.6)
        dress = (0.98, 0.96, 0.92) if scene.index % 2 else (0.34, 0.46, 0.86)
        p.polygon([(cx - s(0.3), h), (cx + s(0.3), h), (cx + s(0.12), h * 0.45), (cx - s(0.12), h * 0.45)],
                  dress, OBJECT)
        p.polygon([(cx + s(0.05), h), (cx + s(0.3), h), (cx + s(0.12), h * 0.45)], p.shadow, OBJECT)
        p.ellipse((cx - s(0.1), h * 0.22, cx + s(0.1), h * 0.46), (0.97, 0.80, 0.68), OBJECT)
        p.ellipse((cx - s(0.13), h * 0.16, cx + s(0.13), h * 0.27), (0.70, 0.40, 0.30), OBJECT)  # hat
        if e.get("parasol"):
            p.ellipse((cx - s(0.45), h * 0.02, cx + s(0.15), h * 0.24), (0.96, 0.86, 0.58), LIGHT)
    if scene.genre == "still life":
        ty = h * 0.62
        p.rect((0, ty, w, h), (0.97, 0.96, 0.94), GROUND)
        p.ellipse((w * 0.1, h * 0.9, w * 0.9, h * 1.05), p.shadow, GROUND)
        vx = w * rng.uniform(0.35, 0.6)
        p.ellipse((vx - s(0.12), h * 0.42, vx + s(0.12), h * 0.78), (0.30, 0.46, 0.86), OBJECT)
        p.ellipse((vx, h * 0.48, vx + s(0.12), h * 0.74), p.shadow, OBJECT)
        if e.get("flowers"):
            for _ in range(14):
                fx, fy = vx + s(rng.normal(0, 0.12)), h * rng.uniform(0.12, 0.42)
                col = PIGMENTS[int(rng.choice([0, 3, 4, 5, 12]))]
                p.ellipse((fx - s(0.04), fy - s(0.04), fx + s(0.04), fy + s(0.04)), col, FOLIAGE)
        for i in range(int(e.get("fruit") or 0)):
            fx = w * (0.12 + 0.12 * i) if vx > w / 2 else w * (0.88 - 0.12 * i)
            col = [(0.97, 0.58, 0.18), (0.90, 0.30, 0.22), (0.96, 0.86, 0.30)][i % 3]
            p.cast((fx - s(0.04), h * 0.8, fx + s(0.09), h * 0.86))
            p.ellipse((fx - s(0.05), h * 0.72, fx + s(0.05), h * 0.83), col, OBJECT)
    return np.asarray(p.img, np.float32) / 255.0, np.asarray(p.reg)


def _pigment_for(colours: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Replace each colour by one of its three nearest pure pigments, tinted to its value."""
    chroma = colours - (colours @ LUMA)[:, None]
    pig_chroma = PIGMENTS - (PIGMENTS @ LUMA)[:, None]
    dist = (((chroma[:, None, :] - pig_chroma[None]) ** 2).sum(-1)            # hue/chroma first,
            + 0.15 * ((colours[:, None] - PIGMENTS[None]) ** 2).sum(-1))       # then value
    nearest = np.argsort(dist, axis=1)[:, :3]
    pick = nearest[np.arange(len(colours)), rng.choice(3, size=len(colours), p=[0.6, 0.28, 0.12])]
    pig = PIGMENTS[pick]
    lum, plum = colours @ LUMA, pig @ LUMA
    tint = np.clip((lum - plum) / np.maximum(1 - plum, 1e-3), 0, 0.85)[:, None]
    shade = np.clip(lum / np.maximum(plum, 1e-3), 0.6, 1.0)[:, None]  # darken a little, never to black
    return np.where(tint > 0, pig + tint * (1 - pig), pig * shade)


def paint(scene: Scene, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Short visible strokes of pure colour over a high-key ground."""
    plan, regions = layout(scene, w, h, rng)
    hand = ARTISTS[scene.artist]
    # strokes grow slower than the canvas (a brush has a size): large paintings get more of them
    scale = 128 * (max(w, h) / 128) ** 0.75
    length = max(3.0, hand["stroke"] * scale)
    width = max(1, int(round(hand["width"] * scale)))
    ground = Image.fromarray((plan * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(length / 2))
    ground = np.asarray(ground, np.float32) / 255.0
    ground = ground + hand["key"] * (0.96 - ground)  # high key: lift toward a warm white
    canvas = Image.fromarray((ground * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    step = max(1.5, width * 1.1)
    gy, gx = np.mgrid[0:h:step, 0:w:step * 1.6]
    n = gx.size
    xs = np.clip(gx.ravel() + rng.uniform(-step, step, n), 0, w - 1)
    ys = np.clip(gy.ravel() + rng.uniform(-step, step, n), 0, h - 1)
    order = rng.permutation(n)
    xs, ys = xs[order], ys[order]
    reg = regions[ys.astype(int), xs.astype(int)]
    ang = np.deg2rad(_ANGLE_TABLE[reg, 0] + rng.uniform(-1, 1, n) * _ANGLE_TABLE[reg, 1])
    ln = length * rng.uniform(0.6, 1.2, n)
    dx, dy = np.cos(ang) * ln / 2, -np.sin(ang) * ln / 2
    colours = _pigment_for(plan[ys.astype(int), xs.astype(int)], rng)
    colours = colours + hand["key"] * 0.5 * (0.97 - colours)   # high-key tints
    cols = np.clip(colours * 255, 10, 247).astype(np.uint8)    # never clipped black or white
    segments = np.stack([xs - dx, ys - dy, xs + dx, ys + dy], axis=1).tolist()
    ink = draw.draw.draw_ink  # ImageDraw.line without its per-call colour parsing: ~2x faster
    for seg, c in zip(segments, cols.tolist()):
        draw.draw.draw_lines(seg, ink(tuple(c)), width)
    return _value_contrast(canvas)


def _value_contrast(img: Image.Image, min_std: float = 20.0) -> Image.Image:
    """Stretch a flat painting's values around their mean so light and shade read (std of the
    luminance at least ``min_std``), staying inside [10, 247]: high key, never clipped."""
    arr = np.asarray(img, np.float32)
    lum = arr @ LUMA
    std = float(lum.std())
    if std < min_std:
        mean = float(lum.mean())
        arr = mean + (arr - mean) * min(2.0, min_std / max(std, 1e-3))
    return Image.fromarray(np.clip(arr, 10, 247).astype(np.uint8))


def photo(scene: Scene, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """The same scene rendered smoothly: blurred, muted colours, grey shadows, a little noise."""
    plan, _ = layout(scene, w, h, rng, photo=True)
    grey = (plan @ LUMA)[..., None]
    plan = 0.65 * plan + 0.35 * grey
    img = Image.fromarray((np.clip(plan, 0, 1) * 255).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(max(w, h) / 150))
    arr = np.asarray(img, np.float32) + rng.normal(0, 2.0, (h, w, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
