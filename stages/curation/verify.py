"""Confirming near-duplicate candidates on fine pixel detail (the dedupe stage's verification).

pHash keeps only the coarsest 8x8 DCT frequencies, so two different paintings of one composition
(a series, a template) can fall within a few bits. A real copy (resized, re-encoded, slightly
cropped, colour-shifted) keeps the fine detail too. The signature is the high-pass detail of a
64 px gray thumbnail (mean and colour removed), of the whole image and of windows inside it (up
to 10 % smaller, centred or shifted to the sides and corners) to absorb crops; two images are the
same picture when one's whole view correlates highly with one of the other's windows, for the
images or their central bands, either way round and mirrored or not (:func:`match`). The keep rule
reads the same signatures: which members match mirrored, and their colour statistics.
"""
from __future__ import annotations

import numpy as np

from stages.curation.hashing import band

VERIFY_SIDE = 64
CENTRED = tuple((c, c, 1 - c, 1 - c) for c in (0.0, 0.01, 0.02, 0.03, 0.04, 0.05))


def _windows() -> tuple[tuple[float, float, float, float], ...]:
    """(x0, y0, x1, y1) fractions: the whole image first, centred crops of 1-5 % per side, and 95 %
    windows on a 5 x 5 grid of offsets, 90 % ones on a 3 x 3 grid (a mirror-symmetric set). The
    detail is fine (a 1 px shift at 64 px costs much correlation), hence the dense grid: with 3 x 3
    at 95 % a random 5 % crop matched its source at 0.50-0.98, with 5 x 5 at 0.83-0.99 (realart)."""
    out = list(CENTRED)
    for size, steps in ((0.95, 5), (0.90, 3)):
        grid = np.linspace(0, 1 - size, steps)
        out += [(x, y, x + size, y + size) for x in grid for y in grid
                if not (np.isclose(x, (1 - size) / 2) and np.isclose(y, (1 - size) / 2))]
    return tuple(tuple(float(v) for v in w) for w in out)


VERIFY_WINDOWS = _windows()


def detail_signature(img, windows=VERIFY_WINDOWS) -> np.ndarray:
    """(len(windows), D) float16: unit-norm high-pass detail of ``windows`` of ``img``."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    gray = img.convert("L")
    w, h = gray.size
    out = []
    for x0, y0, x1, y1 in windows:
        box = (w * x0, h * y0, w * x1, h * y1)
        t = np.asarray(gray.resize((VERIFY_SIDE, VERIFY_SIDE), Image.Resampling.BOX, box=box), np.float32)
        t = (t - gaussian_filter(t, 2.0))[4:-4, 4:-4].ravel()
        out.append(t / (np.linalg.norm(t) + 1e-6))
    return np.stack(out).astype(np.float16)


def pair_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Best correlation of one image's whole view against the other's windows, both ways round."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    return float(max((a[0] @ b.T).max(), (b[0] @ a.T).max()))


def mirror_detail(sig: np.ndarray) -> np.ndarray:
    """The detail signature of the horizontally mirrored image (the window set is symmetric)."""
    side = VERIFY_SIDE - 8
    return sig.reshape(len(sig), side, side)[:, :, ::-1].reshape(len(sig), -1)


def signature(img) -> dict:
    """What verification and the keep rule compare: the ``full`` detail signature (all windows),
    the ``band``'s (centred windows only: ~280 KB in all, float16) and ``colour`` (per-channel
    mean and std of a small thumbnail, 0-1)."""
    from PIL import Image

    thumb = np.asarray(img.convert("RGB").resize((VERIFY_SIDE, VERIFY_SIDE), Image.Resampling.BOX),
                       np.float32).reshape(-1, 3) / 255
    return {"full": detail_signature(img), "band": detail_signature(band(img)),
            "colour": np.concatenate([thumb.mean(0), thumb.std(0)])}


def match(a: dict, b: dict) -> tuple[float, str]:
    """(similarity, how): the best :func:`pair_similarity` of ``a`` and ``b`` over the views that
    correspond (full/full, band/band), each also against the other's mirror image."""
    best = (-1.0, "")
    for view in ("full", "band"):
        for how, other in ((view, b[view]), (f"{view}/mirror", mirror_detail(b[view]))):
            best = max(best, (pair_similarity(a[view], other), how))
    return best


def colour_gap(a: dict, b: dict) -> float:
    """Mean absolute difference of two signatures' colour statistics (0-1 scale)."""
    return float(np.abs(a["colour"] - b["colour"]).mean())
