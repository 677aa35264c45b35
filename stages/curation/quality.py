"""Image quality: weight-free heuristics, thresholds, and scoring the filter against planted ground
truth (the LAION aesthetic head is ``stages.models.aesthetic``).

Heuristics (:func:`heuristics`) on the decoded RGB image; blur, exposure and blank are measured on
the gray image with its long side scaled down to at most ``analysis_side`` px, so one threshold
serves every resolution:

- ``min_side`` (px) and ``aspect`` (width / height) of the stored image, and ``bucket_side``: the
  side of the square with the pixels the trainer's aspect buckets can use (the image cropped to the
  nearest bucket aspect, ``stages.models.cache.ASPECTS``; every bucket holds about resolution²
  pixels, so this, not the shorter side, says how far an image is upscaled in training);
- ``blur``: variance of the Laplacian (0-255 gray) - low means no edges, i.e. blurred;
- ``clipped``: share of pixels at the ends of the range (gray <= 2 or >= 253), and
  ``clipped_inner``: the part of it not connected to the image's edge. A black or white surround
  (an altarpiece's panels on black) is clipped but edge-connected; burnt-out or crushed content
  inside the picture is not; a badly exposed image clips most of its area either way;
- ``texture``: share of pixels whose gradient (Sobel, after a 1 px Gaussian) exceeds 2 gray levels
  per pixel: content. A blank canvas has none, a foggy Monet plenty: low contrast is not blank;
- ``entropy`` (bits, 256-bin gray histogram) and ``std`` (informational; a cut-off only with
  ``filter.std_min`` > 0);
- ``border``: the widest uniform band at an edge, as a share of that side (frames, letterboxing).

The default cut-offs and what they were checked on (``benchmarks/bench_curation_realart.py``,
``reports/bench/curation_realart.md``; 126 real paintings + 12 second scans in ../shared/realart,
and the synthetic set's planted defects):

- ``texture_min`` 0.02: real paintings 0.19 (Motherwell's Elegy, flat black) and up, Monet's foggy
  Charing Cross Bridge 0.37 (its std, 12.5, sat right at the old std cut-off of 12); blank
  canvases (flat colour + 1-3 levels of noise, JPEG or not) 0.000-0.003; a smooth gradient 0;
- ``clipped_max`` 0.25 (inner) and ``surround_max`` 0.5 (all): real paintings clip at most 0.215
  (the Ghent Altarpiece, 0.213 of it its black surround; inner at most 0.041, a Rubens), the
  synthetic over/under-exposed and text-page defects 0.75-1.0;
- ``entropy_min`` 3 bits: the synthetic blank canvas 2.1;
- ``min_side`` on ``bucket_side`` (``size_check: bucket``): flux-dev's 512 means at most 2x
  upscaling into a 1024² bucket, whatever the aspect; ``short_side`` for square-crop training.

:func:`reject_reasons` turns scores into reason codes (:data:`REASONS`, in priority order).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

# Reason codes, in the order they are reported (the first failing one is the row's `reason`).
REASONS = {
    "unreadable": "the image bytes do not decode",
    "too_small": "bucket_side (or, with filter.size_check=short_side, the shorter side) under filter.min_side",
    "bad_aspect": "width/height outside [filter.aspect_min, filter.aspect_max]",
    "exposure": "clipped_inner > filter.clipped_max or clipped > filter.surround_max (over/under-exposed)",
    "blank": "no content: texture < filter.texture_min or gray entropy < filter.entropy_min "
             "(or std < filter.std_min, off by default)",
    "blurry": "variance of the Laplacian < filter.blur_min",
    "border": "a uniform band wider than filter.border_max at an edge (filter.border_detect)",
    "low_aesthetic": "aesthetic score under its threshold",
    "not_painting": "zero-shot 'painting' probability under its threshold",
}
HEURISTIC = ("unreadable", "too_small", "bad_aspect", "exposure", "blank", "blurry", "border")


# ---- heuristics ------------------------------------------------------------------------------

def _gray(img, analysis_side: int) -> np.ndarray:
    from PIL import Image

    g = img.convert("L")
    if max(g.size) > analysis_side:
        scale = analysis_side / max(g.size)
        g = g.resize((max(1, round(g.width * scale)), max(1, round(g.height * scale))),
                     Image.Resampling.BOX)
    return np.asarray(g, dtype=np.float32)


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior pixels."""
    if min(gray.shape) < 3:
        return 0.0
    lap = (gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:]
           - 4.0 * gray[1:-1, 1:-1])
    return float(lap.var())


def entropy_bits(gray: np.ndarray) -> float:
    hist = np.bincount(gray.astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum())


def border_share(gray: np.ndarray, tol: float = 4.0) -> float:
    """Widest run of near-constant rows/columns from any edge, as a share of that side."""
    def run(lines: np.ndarray) -> int:  # lines: (k, L) from the edge inwards
        flat = lines.std(axis=1) <= tol
        return len(flat) if flat.all() else int(np.argmin(flat))

    h, w = gray.shape
    bands = [run(gray) / h, run(gray[::-1]) / h, run(gray.T) / w, run(gray.T[::-1]) / w]
    return float(max(bands))


def texture_density(gray: np.ndarray, step: float = 2.0) -> float:
    """Share of pixels whose gradient magnitude (Sobel after a 1 px Gaussian, gray levels per
    pixel) exceeds ``step``: brushwork, edges, any content; pixel noise is smoothed away."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(gray, 1.0)
    grad = np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1)) / 8
    return float((grad > step).mean())


def clipped_shares(gray: np.ndarray) -> tuple[float, float]:
    """(all clipped pixels, those not connected to the image's edge) as shares of the image."""
    from scipy import ndimage

    clipped = (gray <= 2) | (gray >= 253)
    labels, _ = ndimage.label(clipped)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inner = clipped & ~np.isin(labels, edge[edge > 0])
    return float(clipped.mean()), float(inner.mean())


def bucket_side(width: int, height: int) -> float:
    """Side of the square with the pixels of the image cropped to the nearest bucket aspect."""
    from stages.models.cache import ASPECTS

    aspect = min(max(width / max(1, height), min(ASPECTS)), max(ASPECTS))
    w, h = min(width, height * aspect), min(height, width / aspect)
    return float(np.sqrt(w * h))


def heuristics(img, analysis_side: int = 512, size: Optional[tuple[int, int]] = None) -> dict:
    """All weight-free scores of one PIL image (see the module docstring). ``size``: the stored
    image's (width, height) when ``img`` was decoded at a reduced scale."""
    gray = _gray(img, analysis_side)
    clipped, inner = clipped_shares(gray)
    w, h = size or img.size
    return {
        "width": w, "height": h, "min_side": min(w, h), "aspect": w / max(1, h),
        "bucket_side": bucket_side(w, h), "blur": laplacian_variance(gray), "clipped": clipped,
        "clipped_inner": inner, "texture": texture_density(gray),
        "entropy": entropy_bits(gray), "std": float(gray.std()), "border": border_share(gray),
    }


def reject_reasons(s: dict, f) -> list[str]:
    """Heuristic reason codes for one image's scores ``s`` under the ``filter`` params ``f``."""
    out = []
    if s["bucket_side" if f.size_check == "bucket" else "min_side"] < f.min_side:
        out.append("too_small")
    if not f.aspect_min <= s["aspect"] <= f.aspect_max:
        out.append("bad_aspect")
    if s["texture"] < f.texture_min or s["entropy"] < f.entropy_min or s["std"] < f.std_min:
        out.append("blank")
    if s["clipped_inner"] > f.clipped_max or s["clipped"] > f.surround_max:
        out.append("exposure")
    if s["blur"] < f.blur_min:
        out.append("blurry")
    if f.border_detect and s["border"] > f.border_max:
        out.append("border")
    return out


def cutoff(scores: np.ndarray, mode: str, threshold: float, percentile: float) -> float:
    """The score below which an image is rejected: ``threshold`` itself in absolute mode; in
    percentile mode (random-weight models) the value that leaves the lowest ``percentile`` % of
    ``scores`` (rounded up, so any p > 0 rejects at least one) below it."""
    if mode == "absolute":
        return float(threshold)
    scores = np.sort(np.asarray(scores, float)[np.isfinite(scores)])
    k = int(np.ceil(len(scores) * percentile / 100 - 1e-9))
    if k <= 0:
        return -np.inf
    return float(scores[k]) if k < len(scores) else np.inf


# ---- scoring against ground truth ------------------------------------------------------------

def filter_scores(scored: list[dict], truth: dict[str, dict]) -> dict:
    """Precision/recall of the heuristic filter on planted defects. ``scored``: filter rows
    (``id``, ``reasons`` list); ``truth``: id -> {kind, defect}. A heuristic reject is positive."""
    rows = [r for r in scored if r["id"] in truth]
    pred = [any(x in HEURISTIC for x in r["reasons"]) for r in rows]
    bad = [truth[r["id"]]["kind"] == "defect" for r in rows]
    good = [truth[r["id"]]["kind"] == "good" for r in rows]
    tp = sum(p and b for p, b in zip(pred, bad))
    lost = sum(p and g for p, g in zip(pred, good))
    by_defect: dict[str, list[int]] = {}
    for r, p, b in zip(rows, pred, bad):
        if b:
            k = by_defect.setdefault(str(truth[r["id"]].get("defect")), [0, 0])
            k[0] += p
            k[1] += 1
    return {
        "precision": tp / sum(pred) if sum(pred) else 1.0,
        "recall": tp / sum(bad) if sum(bad) else 1.0,
        "good_lost": lost / sum(good) if sum(good) else 0.0,
        "defects": sum(bad), "rejected": sum(pred), "true_rejects": tp, "good_rejected": lost,
        "recall_by_defect": {k: v[0] / v[1] for k, v in sorted(by_defect.items())},
    }
