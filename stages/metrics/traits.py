"""Impressionism trait metrics: weight-free numbers computed from pixels alone, plus one composite.

Every image is resized (bicubic, aspect not kept) to ``size`` x ``size`` so images of different
resolutions are measured at the same scale, then converted to OKLab (sRGB, D65; L in [0, 1],
chroma C = sqrt(a² + b²) about 0..0.32, hue h = atan2(b, a)). Scales are fractions of the image side,
but pixels still matter: use ``size`` 256 (the flux-dev profile's eval.trait_size). There a stroke of
1-3 % of the side spans several pixels; at 64 it is under one and ``stroke_isotropy`` carries no signal
on real paintings, at 128 and 512 it separates less (measured). Measured on 126 real paintings
(docs/evaluation.md, reports/bench/traits_realart.md: ``benchmarks/bench_traits_realart.py``):

``stroke_isotropy`` (short visible strokes, +1)
    1 - the mean coherence of the colour structure tensor (Di Zenzo: the gradient tensors of OKLab
    L, a and b summed) over the textured pixels (gradient above ``TEXTURE_GRAD`` per image side),
    the tensor averaged over a Gaussian window of ``STROKE_SIGMA`` of the side (a window about 2 %
    of the side across). Dabs and short strokes laid in many directions are locally isotropic
    (high); long straight edges, lines and hatching are locally coherent (low); a flat picture or a
    smooth gradient has no textured pixel (0).
``broken_colour`` (colour laid side by side rather than modelled in value, +1)
    The image is cut into stroke-sized patches (``PATCH`` of the side); for every pair of
    4-neighbouring patches, the change of mean colour (a, b) divided by the change of mean
    lightness (+ ``BROKEN_EPS``), averaged. High when neighbouring dabs differ in hue at similar
    value; low for tonal modelling (light/dark of one hue) and for flat colour.
``cool_shadows`` (coloured, not black, shadows, +1)
    Of the darkest ``SHADOW_Q`` of pixels by L, the share that is chromatic (C >= ``SHADOW_C``)
    with a cool hue (``COOL_HUE`` degrees: green-blue-violet).
``dark_share`` (no black, -1)
    Share of pixels darker than OKLab L = ``DARK_L`` (about CIE L* 25: black, umber, deep shade).
``light_key`` (light, high key, +1)
    Mean L minus the standard deviation of L: high for a light picture held in a narrow band of
    values, low for a dark or a strongly contrasted one.
``hard_edges`` (soft, broken contours rather than hard edges, -1)
    Share of pixels whose colour gradient (Di Zenzo, as for stroke isotropy) exceeds ``HARD_STEP``
    OKLab units per pixel: the cut-out edges of flat colour shapes and outlines of modern art;
    Impressionist dabs change colour in smaller steps. A step is per pixel, not per image side (a
    hard edge stays about a pixel wide at any size), but the share of edge pixels still falls as
    the size grows: compare at one size.
``saturated_colour`` (no saturated primaries, -1)
    Share of pixels with OKLab chroma >= ``SAT_C`` (tube primaries used unmixed): modern art has
    more than Impressionism, whose pure hues are mixed with white (and the old masters have none).
``impressionism`` (composite, +1)
    The Impressionism score in [0, 1]: sigmoid of the mean patch logit of a frozen texture model
    (stages/metrics/texture.py): the picture cut into 64 patches of 1/8 of the side, 27 numbers per
    patch (derivative-of-Gaussian energies of L, a, b at 1-4 px at 256, their orientation spread,
    blob / ridge energies, colour moments, gradient statistics), a quadratic L2 logistic regression
    fitted once on the patches of the realart corpus (each labelled as its painting) and FROZEN in
    stages/metrics/texture_weights.py. Cross-validated AUC 0.870 (nested 0.861, half / half by artist
    0.855), 0.835 vs modern (docs/evaluation.md); goal 0.90 not met. Fitted at 256: at other sizes it measures other
    scales (it still cross-validates at 0.86-0.88 when refitted per size, but the frozen model is the
    256 one), and a picture upscaled from a small one reads as smooth. A fixed function of the pixels,
    not a model trained per run.
``global_score`` (diagnostic, +1)
    The composite before the texture model: sigmoid(``COMPOSITE_BIAS`` + sum_i w_i (t_i - mean_i) / sd_i)
    over the seven traits above (``COMPONENTS``), L2 logistic regression (C = 0.1) fitted once on the
    whole corpus and frozen below (``composite()``): cross-validated AUC 0.84, 0.76 vs modern.

Evaluate reports ``NAMES``: ``stroke_isotropy`` and the composite. The other six components and the
global score are ``DIAGNOSTICS`` (``image_traits(..., diagnostics=True)``, the benchmark): four separate
Impressionism from the old masters (AUC 0.79-0.89) but not from modern art (0.61-0.66 < 0.70), so on
its own each would rank a modern-looking sample as Impressionist; ``hard_edges`` and ``saturated_colour``
do the opposite (about 0.80 / 0.70 vs modern, no signal vs the old masters). Also diagnostic:
``pure_colour`` (share of pixels with C >= ``PURE_C`` at ``PURE_L`` lightness), which modern art has
more of than Impressionism (AUC 0.37 vs modern). Numbers: docs/evaluation.md.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
from PIL import Image
from scipy import ndimage

from stages.metrics import texture
from stages.metrics.texture import colour_tensor  # noqa: F401  (traits.colour_tensor: used here and by the benchmarks)

STROKE_SIGMA = 0.005   # structure tensor window (Gaussian sigma), fraction of the side
TEXTURE_GRAD = 2.56    # |grad L| (L units per image side) from which a pixel counts as textured
PATCH = 0.01           # broken colour: patch side, fraction of the image side
BROKEN_EPS = 0.02      # lightness step (OKLab L) added to the denominator of broken colour
SHADOW_Q = 0.2         # the darkest 20% of pixels are the shadows
SHADOW_C = 0.05        # chroma from which a shadow pixel counts as coloured
COOL_HUE = (140.0, 320.0)  # OKLab hue range (degrees) of cool colours: green, blue, violet
DARK_L = 0.35          # OKLab L under which a pixel is dark
HARD_STEP = 0.1        # colour gradient (OKLab units per pixel) from which an edge is hard
SAT_C = 0.15           # OKLab chroma from which a pixel is a saturated (unmixed) colour
PURE_C = 0.1           # diagnostic pure colour: chroma ...
PURE_L = (0.6, 0.9)    # ... at mid-high lightness

COMPONENTS = ("stroke_isotropy", "broken_colour", "cool_shadows", "dark_share", "light_key", "hard_edges",
              "saturated_colour")
COMPOSITE = "impressionism"
GLOBAL = "global_score"  # the frozen logistic score of the seven COMPONENTS (the composite before)
# Every number evaluate reports: the traits that separate Impressionism from old masters AND from
# modern art on realart (AUC >= 0.75 / >= 0.70 vs modern, scan noise < 1/4 of the gap), and the composite
# (the texture model of stages/metrics/texture.py).
NAMES = ("stroke_isotropy", COMPOSITE)
# Measured (image_traits(..., diagnostics=True), the benchmark) but not reported: the global score's other
# components, which separate Impressionism from old masters but not from modern art, the global score
# itself (the composite before the texture model) and pure colour.
DIAGNOSTICS = tuple(k for k in COMPONENTS if k not in NAMES) + (GLOBAL, "pure_colour")

# Which way is "more Impressionist" for each trait (+1 higher, -1 lower).
DIRECTION = {"stroke_isotropy": 1, "broken_colour": 1, "cool_shadows": 1, "dark_share": -1,
             "light_key": 1, "hard_edges": -1, "saturated_colour": -1, COMPOSITE: 1, GLOBAL: 1, "pure_colour": 1}

# One line each, for tables (report, model card): what the number measures.
LABELS = {"stroke_isotropy": "short strokes: structure-tensor isotropy of the textured pixels",
          "broken_colour": "broken colour: hue change over value change between stroke-sized patches",
          "cool_shadows": "coloured shadows: share of the darkest 20% that is cool and chromatic",
          "dark_share": "no black: share of dark pixels (OKLab L < 0.35; lower = more Impressionist)",
          "light_key": "light: mean minus spread of OKLab lightness",
          "hard_edges": "hard edges: share of pixels with a colour step above 0.1 OKLab per pixel",
          "saturated_colour": "saturated primaries: share of pixels with OKLab chroma >= 0.15",
          COMPOSITE: "Impressionism score: frozen texture model of 32-px patches (mean patch logit)",
          GLOBAL: "global-statistics score: frozen logistic composite of the seven traits above"}

# Frozen global score (fitted by `python -m benchmarks.bench_traits_realart --fit` at size 256 on the
# realart corpus; see docs/evaluation.md). Per trait: (mean, sd, weight).
COMPOSITE_WEIGHTS = {
    "stroke_isotropy": (0.350735, 0.0945789, 0.439193),
    "broken_colour": (0.213939, 0.0917995, 0.326553),
    "cool_shadows": (0.0611454, 0.141902, 0.165935),
    "dark_share": (0.245837, 0.227464, -0.485824),
    "light_key": (0.363953, 0.136037, 0.399225),
    "hard_edges": (0.0579836, 0.0524119, -0.348426),
    "saturated_colour": (0.0169023, 0.0613944, -0.371007),
}
COMPOSITE_BIAS = -0.145663


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


def srgb_to_oklab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] (..., 3) -> OKLab (Ottosson 2020): L in [0, 1], a/b roughly [-0.3, 0.3]."""
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    lms = lin @ np.array([[0.4122214708, 0.5363325363, 0.0514459929],
                          [0.2119034982, 0.6806995451, 0.1073969566],
                          [0.0883024619, 0.2817188376, 0.6299787005]]).T
    return np.cbrt(lms) @ np.array([[0.2104542553, 0.7936177850, -0.0040720468],
                                    [1.9779984951, -2.4285922050, 0.4505937099],
                                    [0.0259040371, 0.7827717662, -0.8086757660]]).T


def stroke_isotropy(lab: np.ndarray, tensor=None) -> float:
    """1 - mean coherence of the colour structure tensor over the textured pixels of ``lab`` (n, n, 3);
    0 when nothing is textured (a flat picture or a smooth gradient)."""
    n = lab.shape[0]
    jxx, jyy, jxy = colour_tensor(lab) if tensor is None else tensor
    sigma = max(STROKE_SIGMA * n, 0.7)
    jxx, jyy, jxy = (ndimage.gaussian_filter(x, sigma) for x in (jxx, jyy, jxy))
    trace = jxx + jyy
    textured = np.sqrt(trace) > TEXTURE_GRAD / n
    if not textured.any():
        return 0.0
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2)[textured] / trace[textured]
    return float(1.0 - coherence.mean())


def broken_colour(lab: np.ndarray, patch: float = PATCH) -> float:
    """Mean over 4-neighbouring patch pairs of |delta ab| / (|delta L| + BROKEN_EPS)."""
    n = lab.shape[0]
    p = max(1, int(round(patch * n)))
    m = n // p
    if m < 2:
        raise ValueError(f"image {n}x{n} too small for patches of {p} px")
    means = lab[: m * p, : m * p].reshape(m, p, m, p, 3).mean(axis=(1, 3))
    ratios = []
    for d in (np.diff(means, axis=0), np.diff(means, axis=1)):
        ratios.append(np.hypot(d[..., 1], d[..., 2]) / (np.abs(d[..., 0]) + BROKEN_EPS))
    return float(np.concatenate([r.ravel() for r in ratios]).mean())


def hard_edges(lab: np.ndarray, tensor=None) -> float:
    """Share of pixels whose colour gradient magnitude exceeds HARD_STEP per pixel."""
    jxx, jyy, _ = colour_tensor(lab) if tensor is None else tensor
    return float((np.sqrt(jxx + jyy) > HARD_STEP).mean())


def cool_shadows(lab: np.ndarray) -> float:
    """Share of the darkest SHADOW_Q pixels that are chromatic and of a cool hue."""
    L, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    shadows = L <= np.quantile(L, SHADOW_Q)
    hue = np.degrees(np.arctan2(b, a)) % 360.0
    cool = (np.hypot(a, b) >= SHADOW_C) & (hue > COOL_HUE[0]) & (hue < COOL_HUE[1])
    return float((cool & shadows).sum() / shadows.sum())


def composite(values: dict[str, float]) -> float:
    """The frozen global-statistics score (GLOBAL) in [0, 1] from the COMPONENTS' values."""
    z = COMPOSITE_BIAS + sum(w * (values[k] - mu) / sd for k, (mu, sd, w) in COMPOSITE_WEIGHTS.items())
    return float(1.0 / (1.0 + np.exp(-z)))


def image_traits(img: Image.Image | np.ndarray, size: int = 64, diagnostics: bool = False) -> dict[str, float]:
    """NAMES for one image, and DIAGNOSTICS too when asked (see the module docstring)."""
    lab = srgb_to_oklab(to_rgb_array(img, size))
    L, chroma, tensor = lab[..., 0], np.hypot(lab[..., 1], lab[..., 2]), colour_tensor(lab)
    out = {"stroke_isotropy": stroke_isotropy(lab, tensor),
           "broken_colour": broken_colour(lab),
           "cool_shadows": cool_shadows(lab),
           "dark_share": float((L < DARK_L).mean()),
           "light_key": float(L.mean() - L.std()),
           "hard_edges": hard_edges(lab, tensor),
           "saturated_colour": float((chroma >= SAT_C).mean())}
    out[COMPOSITE] = float(1.0 / (1.0 + np.exp(-texture.texture_logit(lab, tensor))))
    if not diagnostics:
        return {k: out[k] for k in NAMES}
    out[GLOBAL] = composite(out)
    out["pure_colour"] = float(((chroma >= PURE_C) & (L >= PURE_L[0]) & (L <= PURE_L[1])).mean())
    return out


def trait_table(images: Iterable[Image.Image | np.ndarray], size: int = 64) -> dict[str, np.ndarray]:
    """Per-trait arrays over ``images`` (one value per image, in order)."""
    from stages.core.pool import threads

    with threads("traits") as ex:  # scipy's filters and Pillow's resize release the GIL
        rows = list(ex.map(lambda im: image_traits(im, size), images))
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in NAMES}


def distance(table: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    """Per trait: |mean of ``table`` - mean of ``ref``| in standard deviations of ``ref`` (raw units
    where ``ref`` does not vary): how far a set of images is from the reference paintings."""
    out = {}
    for k in NAMES:
        sd = float(np.std(ref[k])) if len(ref[k]) > 1 else 0.0
        gap = abs(float(np.mean(table[k])) - float(np.mean(ref[k])))
        out[k] = gap / sd if sd > 1e-9 else gap
    return out


def mean_traits(images: Iterable[Image.Image | np.ndarray], size: int = 64) -> dict[str, float]:
    """Per-trait mean over ``images`` (NaN for an empty set, so a missing set is visible)."""
    table = trait_table(images, size)
    return {k: float(v.mean()) if v.size else float("nan") for k, v in table.items()}
