"""Impressionism trait metrics: weight-free numbers computed from pixels alone.

Every image is first resized (bicubic, aspect not kept) to ``size`` x ``size`` so images of different
resolutions are measured at the same scale, then converted to CIE L*a*b* (sRGB, D65). One number
per trait of the seed plan (docs: .agents/readme-eval.md, README "Evaluation"):

``hf_energy`` (visible short strokes)
    Share of the non-DC spectral power of the luminance L* (Hann-windowed 2-D FFT) at radial
    frequencies of at least ``HF_CYCLES`` cycles per image side, i.e. structures smaller than 1/8
    of the picture: brush strokes, not the composition. 0 for a flat or a smooth-gradient image,
    about 0.5 or more for a stroke texture, up to ~0.95 for white noise.
``broken_colour`` (colour laid side by side, not blended)
    The image is cut into a ``PATCHES`` x ``PATCHES`` grid; each patch's mean chroma (a*, b*) is
    taken; the metric is the mean Euclidean a*b* distance between 4-neighbouring patches (Lab
    units). 0 for one flat colour, small for a smooth gradient, large for juxtaposed dabs of
    different hues. Luminance-only texture (grey strokes) scores 0.
``saturation`` / ``pure_share`` (pure, unmixed colours)
    HSV saturation of the pixels that are not dark (V >= ``DARK_V``): its mean, and the share of
    those pixels with saturation >= ``PURE_S`` (mixed, muddy colours are desaturated).
``black_share`` / ``shadow_chroma`` (avoidance of black)
    Share of near-black pixels (L* < ``BLACK_L``), and the mean chroma C*ab = sqrt(a*² + b*²) of
    the shadows (the darkest ``SHADOW_Q`` of pixels by L*): coloured shadows score high, black or
    grey shadows near 0.
``light_key`` / ``highkey_share`` (emphasis on light)
    Mean L* / 100 (the luminance key), and the share of pixels with L* >= ``HIGHKEY_L``.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
from PIL import Image

HF_CYCLES = 8.0      # cycles per image side from which power counts as "high frequency"
PATCHES = 16         # broken colour: patch grid per side
DARK_V = 0.2         # HSV value under which saturation is ignored (unstable in the dark)
PURE_S = 0.6         # saturation from which a colour counts as pure
BLACK_L = 10.0       # L* under which a pixel is near-black
SHADOW_Q = 0.2       # the darkest 20% of pixels are the shadows
HIGHKEY_L = 70.0     # L* from which a pixel is high-key

NAMES = ("hf_energy", "broken_colour", "saturation", "pure_share", "black_share", "shadow_chroma",
         "light_key", "highkey_share")

# Which way is "more Impressionist" for each trait (+1 higher, -1 lower): used by the report.
DIRECTION = {"hf_energy": 1, "broken_colour": 1, "saturation": 1, "pure_share": 1,
             "black_share": -1, "shadow_chroma": 1, "light_key": 1, "highkey_share": 1}


def to_rgb_array(img: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """PIL image or (H, W, 3) array (uint8 or float in [0, 1]) -> float64 (size, size, 3) in [0, 1]."""
    if isinstance(img, np.ndarray):
        arr = img.astype(np.float64)
        if img.dtype == np.uint8:
            arr /= 255.0
        img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8))
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float64) / 255.0


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] (..., 3) -> CIE L*a*b* (D65): L in [0, 100], a/b roughly [-128, 127]."""
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    L = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1)


def hf_energy(L: np.ndarray) -> float:
    """Share of non-DC power of ``L`` (H, W) at >= HF_CYCLES cycles per image side."""
    h, w = L.shape
    x = (L - L.mean()) * np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fft2(x)) ** 2
    fy = np.fft.fftfreq(h) * h  # cycles per image side
    fx = np.fft.fftfreq(w) * w
    radius = np.hypot(*np.meshgrid(fy, fx, indexing="ij"))
    power[0, 0] = 0.0
    total = power.sum()
    return float(power[radius >= HF_CYCLES].sum() / total) if total > 1e-12 else 0.0


def broken_colour(lab: np.ndarray, patches: int = PATCHES) -> float:
    """Mean a*b* distance between 4-neighbouring patch means on a ``patches`` grid."""
    h, w, _ = lab.shape
    ph, pw = h // patches, w // patches
    if ph < 1 or pw < 1:
        raise ValueError(f"image {h}x{w} too small for a {patches}x{patches} patch grid")
    ab = lab[: ph * patches, : pw * patches, 1:]
    means = ab.reshape(patches, ph, patches, pw, 2).mean(axis=(1, 3))
    horiz = np.linalg.norm(means[:, 1:] - means[:, :-1], axis=-1)
    vert = np.linalg.norm(means[1:] - means[:-1], axis=-1)
    return float(np.concatenate([horiz.ravel(), vert.ravel()]).mean())


def _hsv_sv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = rgb.max(axis=-1)
    s = np.where(v > 0, (v - rgb.min(axis=-1)) / np.maximum(v, 1e-12), 0.0)
    return s, v


def image_traits(img: Image.Image | np.ndarray, size: int = 64) -> dict[str, float]:
    """All trait metrics of one image (see the module docstring for the definitions)."""
    rgb = to_rgb_array(img, size)
    lab = srgb_to_lab(rgb)
    L = lab[..., 0]
    s, v = _hsv_sv(rgb)
    lit = v >= DARK_V
    sat = s[lit]
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    shadows = L <= np.quantile(L, SHADOW_Q)
    return {
        "hf_energy": hf_energy(L),
        "broken_colour": broken_colour(lab, min(PATCHES, size)),
        "saturation": float(sat.mean()) if sat.size else 0.0,
        "pure_share": float((sat >= PURE_S).mean()) if sat.size else 0.0,
        "black_share": float((L < BLACK_L).mean()),
        "shadow_chroma": float(chroma[shadows].mean()),
        "light_key": float(L.mean() / 100.0),
        "highkey_share": float((L >= HIGHKEY_L).mean()),
    }


def mean_traits(images: Iterable[Image.Image | np.ndarray], size: int = 64) -> dict[str, float]:
    """Per-trait mean over ``images`` (NaN for an empty set, so a missing set is visible)."""
    rows = [image_traits(im, size) for im in images]
    if not rows:
        return {k: float("nan") for k in NAMES}
    return {k: float(np.mean([r[k] for r in rows])) for k in NAMES}
