"""Stroke-scale texture: a descriptor of image patches and the frozen patch model of the Impressionism score.

The image (OKLab, ``size`` x ``size``: traits.image_traits resizes it, 256 for real runs) is cut into
square patches of ``PATCH`` of the side (32 px at 256: 64 patches); each patch gets ``len(NAMES)``
numbers, all computed from pixels (derivative-of-Gaussian filters, sigmas in fractions of the side
so a picture measures the same at any size; derivatives scale-normalised, i.e. multiplied by sigma^order):

per scale ``s`` of ``SCALES`` (1, 2, 4 px at 256: the width of a brush stroke and of its edge)
    ``grad<s>``  log gradient energy of L (texture strength);
    ``iso<s>``   1 - coherence of the patch's summed L structure tensor (strokes in many directions:
                 high; hatching, parallel lines, one long edge: low);
    ``blob<s>``  log energy of the Laplacian of L (dabs, spots);
    ``ridge<s>`` log energy of the Hessian anisotropy of L (lines, thin strokes, outlines);
    ``cgrad<s>`` log gradient energy of a and b (hue changes: broken colour);
colour moments
    mean and sd of L, a, b and chroma in the patch;
gradient statistics (colour gradient per pixel, :func:`colour_tensor`)
    ``hard_share`` share of pixels above ``HARD`` per pixel (hard edges), ``grad_tail`` log q90 / q50 of
    the gradient, ``flat_share`` share of pixels under 1 OKLab unit per image side (flat colour),
    ``local_iso`` 1 - the mean coherence of the 0.5 % window colour tensor (traits.stroke_isotropy
    without its texture mask).

The model: every descriptor standardised (the corpus mean and sd in ``texture_weights.DESCRIPTORS``),
then a logistic regression on the descriptors and all their pairwise products and squares (L2, C picked
by artist-grouped CV, fitted on the PATCHES of the realart corpus at 256, each patch labelled as its
painting: ``benchmarks/bench_traits_realart.py --fit-texture``). The image's score is the mean patch
logit; traits.py reports sigmoid of it as ``impressionism``. The fitted numbers are frozen in
``stages/metrics/texture_weights.py`` (a module, no data file). Cross-validated AUC 0.87, nested 0.86
(reports/bench/traits_realart.md).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from stages.metrics import texture_weights as weights
PATCH = 0.125                    # patch side, fraction of the image side (32 px at 256)
SCALES = (0.004, 0.008, 0.016)   # derivative-of-Gaussian sigmas, fraction of the side (1, 2, 4 px at 256)
EPS = 1e-6                       # added to every energy before the log (OKLab units², scale-normalised)
HARD = 0.1                       # colour step per pixel from which an edge counts as hard


def colour_tensor(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel gradient tensor (jxx, jyy, jxy) of ``lab`` (n, n, 3), in OKLab units per pixel:
    Di Zenzo, the tensors of L, a and b summed (a hue edge is an edge too), after a 0.5 px blur."""
    jxx = jyy = jxy = 0.0
    for c in range(3):
        g = ndimage.gaussian_filter(lab[..., c], 0.5)
        gx, gy = ndimage.sobel(g, 1) / 8.0, ndimage.sobel(g, 0) / 8.0
        jxx, jyy, jxy = jxx + gx * gx, jyy + gy * gy, jxy + gx * gy
    return jxx, jyy, jxy


def descriptor_names() -> list[str]:
    names = []
    for s in range(len(SCALES)):
        names += [f"grad{s}", f"iso{s}", f"blob{s}", f"ridge{s}", f"cgrad{s}"]
    names += ["L_mean", "L_sd", "a_mean", "b_mean", "a_sd", "b_sd", "C_mean", "C_sd",
              "hard_share", "grad_tail", "flat_share", "local_iso"]
    return names


NAMES = tuple(descriptor_names())


def patch_means(x: np.ndarray, p: int) -> np.ndarray:
    m = x.shape[0] // p
    return x[: m * p, : m * p].reshape(m, p, m, p).mean(axis=(1, 3)).ravel()


def patch_quantile(x: np.ndarray, p: int, q) -> np.ndarray:
    m = x.shape[0] // p
    blocks = x[: m * p, : m * p].reshape(m, p, m, p).transpose(0, 2, 1, 3).reshape(m * m, p * p)
    return np.quantile(blocks, q, axis=1)


def patch_descriptors(lab: np.ndarray, tensor=None) -> np.ndarray:
    """(n_patches, len(NAMES)) descriptors of OKLab image ``lab`` (n, n, 3); ``tensor``: its
    colour_tensor, when the caller has it already."""
    n = lab.shape[0]
    p = max(4, int(round(PATCH * n)))
    L, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    cols = []
    for frac in SCALES:
        s = max(frac * n, 0.7)
        lx = ndimage.gaussian_filter(L, s, order=(0, 1)) * s
        ly = ndimage.gaussian_filter(L, s, order=(1, 0)) * s
        lxx = ndimage.gaussian_filter(L, s, order=(0, 2)) * s * s
        lyy = ndimage.gaussian_filter(L, s, order=(2, 0)) * s * s
        lxy = ndimage.gaussian_filter(L, s, order=(1, 1)) * s * s
        jxx, jyy, jxy = patch_means(lx * lx, p), patch_means(ly * ly, p), patch_means(lx * ly, p)
        tr = jxx + jyy
        cols.append(np.log(tr + EPS))
        cols.append(1.0 - np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / (tr + EPS))
        cols.append(np.log(patch_means((lxx + lyy) ** 2, p) + EPS))
        cols.append(np.log(patch_means((lxx - lyy) ** 2 + 4 * lxy ** 2, p) + EPS))
        cg = 0.0
        for c in (a, b):
            cx = ndimage.gaussian_filter(c, s, order=(0, 1)) * s
            cy = ndimage.gaussian_filter(c, s, order=(1, 0)) * s
            cg = cg + cx * cx + cy * cy
        cols.append(np.log(patch_means(cg, p) + EPS))
    C = np.hypot(a, b)
    mL, ma, mb, mC = (patch_means(x, p) for x in (L, a, b, C))
    sL, sa, sb, sC = (np.sqrt(np.maximum(patch_means(x * x, p) - m * m, 0))
                      for x, m in ((L, mL), (a, ma), (b, mb), (C, mC)))
    cols += [mL, sL, ma, mb, sa, sb, mC, sC]
    jxx, jyy, jxy = colour_tensor(lab) if tensor is None else tensor
    g = np.sqrt(jxx + jyy)
    cols.append(patch_means((g > HARD).astype(float), p))
    q50, q90 = patch_quantile(g, p, [0.5, 0.9])
    cols.append(np.log((q90 + 1e-4) / (q50 + 1e-4)))
    cols.append(patch_means((g * n < 1.0).astype(float), p))
    w = max(0.005 * n, 0.7)
    sxx, syy, sxy = (ndimage.gaussian_filter(x, w) for x in (jxx, jyy, jxy))
    coh = np.sqrt((sxx - syy) ** 2 + 4 * sxy ** 2) / (sxx + syy + 1e-9)
    cols.append(1.0 - patch_means(coh, p))
    return np.stack(cols, axis=1)


def quadratic(z: np.ndarray) -> np.ndarray:
    """(m, d) standardised descriptors -> (m, d(d+1)/2) products z_i z_j, i <= j (row-major order)."""
    i, j = np.triu_indices(z.shape[1])
    return z[:, i] * z[:, j]


def patch_logits(desc: np.ndarray, mu, sd, lin, quad, bias: float) -> np.ndarray:
    """Logit of every patch of ``desc`` (n_patches, d) under a fitted model (arrays of the shapes of
    texture_weights: mu, sd, lin (d,), quad (d(d+1)/2,), bias)."""
    z = (desc - np.asarray(mu)) / np.asarray(sd)
    return bias + z @ np.asarray(lin) + quadratic(z) @ np.asarray(quad)


def texture_logit(lab: np.ndarray, tensor=None) -> float:
    """Mean patch logit of OKLab image ``lab`` (n, n, 3) under the frozen model (texture_weights)."""
    rows = [weights.DESCRIPTORS[k] for k in NAMES]
    mu, sd, lin = (np.array([r[i] for r in rows]) for i in range(3))
    quad = np.concatenate([np.asarray(r, dtype=float) for r in weights.QUADRATIC])
    return float(patch_logits(patch_descriptors(lab, tensor), mu, sd, lin, quad, weights.BIAS).mean())
