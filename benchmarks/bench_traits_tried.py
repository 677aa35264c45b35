"""The candidate Impressionism traits that were tried for issue 14 and dropped, measured as the kept ones are.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_traits_tried [--corpus ../shared/realart] [--size 256]

The record behind the global score (traits.composite, the composite before the texture model): the pixel features tried while designing
it (all but a band-energy spectrum and model variants, described in reports/bench/traits_realart.md), on the same realart corpus, with the protocol of ``bench_traits_realart`` (AUC in the candidate's
a-priori direction vs all others / old masters / modern, median scan noise × gap), and the artist-grouped
cross-validated AUC of the frozen composite's components plus that candidate (C = 0.1, refit per
fold, 10 repeats; a threshold variant ``<component>@<value>`` replaces its component instead).
Last, an all-in line: every kept component and every candidate in one L2 logistic regression
(C = 0.03) and in a random forest, as a rough ceiling of what these global statistics carry. Kept
(in traits.COMPONENTS): ``hard_edges`` and ``saturated_colour``; their threshold variants are listed to
show the choice was not tuned (the first values tried were kept; the hard-edge step was first 25 OKLab
units per image side, 0.098 per pixel at 256, then made 0.1 per pixel so that it means the same at 64).
These functions are not used by the pipeline.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_traits_realart as bench  # noqa: E402
from stages.metrics import traits  # noqa: E402


def patch_sd(lab, patch=0.02):
    """Colour standard deviation (OKLab, all three channels) inside each patch of ``patch`` of the side."""
    n = lab.shape[0]
    p = max(2, round(patch * n))
    m = n // p
    P = lab[: m * p, : m * p].reshape(m, p, m, p, 3)
    return np.sqrt(P.var(axis=(1, 3)).sum(-1)), P


def grad(lab):
    jxx, jyy, _ = traits.colour_tensor(lab)
    return np.sqrt(jxx + jyy) * lab.shape[0]  # OKLab units per image side


def hue_share(lab, h0, h1, cmin=0.03):
    a, b = lab[..., 1], lab[..., 2]
    h = np.degrees(np.arctan2(b, a)) % 360
    return float(((np.hypot(a, b) >= cmin) & (h > h0) & (h < h1)).mean())


def band_ratio(lab):
    def band(s0, s1):
        n = lab.shape[0]
        return sum(((ndimage.gaussian_filter(lab[..., c], s0 * n) - ndimage.gaussian_filter(lab[..., c], s1 * n))
                    ** 2).mean() for c in range(3))
    return float(np.log((band(0.004, 0.012) + 1e-6) / (band(0.02, 0.06) + 1e-6)))


def hue_entropy(lab, bins=24, cmin=0.03):
    a, b = lab[..., 1].ravel(), lab[..., 2].ravel()
    C = np.hypot(a, b)
    k = C >= cmin
    if k.sum() < 10:
        return 0.0
    hist, _ = np.histogram(np.arctan2(b[k], a[k]), bins, (-np.pi, np.pi), weights=C[k])
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log(p)).sum() / np.log(bins))


def iso_weighted(lab, s):
    """Structure-tensor isotropy with a window of ``s`` of the side, weighted by gradient energy."""
    n = lab.shape[0]
    jxx, jyy, jxy = (ndimage.gaussian_filter(x, max(s * n, 0.7)) for x in traits.colour_tensor(lab))
    tr = jxx + jyy
    coh = np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / (tr + 1e-12)
    return float(1 - (coh * tr).sum() / tr.sum())


def iso_window(lab, s):
    old, traits.STROKE_SIGMA = traits.STROKE_SIGMA, s
    try:
        return traits.stroke_isotropy(lab)
    finally:
        traits.STROKE_SIGMA = old


def quantile_ratio(x, q0, q1, eps):
    a, b = np.quantile(x, [q0, q1])
    return float(np.log((b + eps) / (a + eps)))


def n_colours(lab, step=0.025, minshare=0.0005):
    _, cnt = np.unique(np.floor(lab.reshape(-1, 3) / step).astype(np.int64), axis=0, return_counts=True)
    return float((cnt >= minshare * lab.shape[0] * lab.shape[1]).sum())


def grad_kurtosis(lab):
    g = grad(lab).ravel()
    return float(((g - g.mean()) ** 4).mean() / g.std() ** 4)


def grad_gini(lab):
    g = np.sort(grad(lab).ravel())
    return float(1 - 2 * (np.cumsum(g) / g.sum()).sum() / g.size + 1 / g.size)


def fine_colour_share(lab):
    """Within-patch a, b variance over the whole image's a, b variance."""
    within = patch_sd(lab)[1][..., 1:].var(axis=(1, 3)).sum(-1).mean()
    return float(within / (lab[..., 1:].reshape(-1, 2).var(0).sum() + 1e-6))


def thirds(lab):
    """The top and the bottom third of the picture."""
    t = lab.shape[0] // 3
    return lab[:t], lab[-t:]


def texture(lab):
    return float(np.abs(np.diff(lab[..., 0], axis=1)).mean() + 1e-4)


def chroma(lab):
    return np.hypot(lab[..., 1], lab[..., 2])


# name: (function of the OKLab image, a-priori direction, what it measures)
CANDIDATES = {
    "flat_share": (lambda l: float((patch_sd(l)[0] < 0.02).mean()), -1,
                   "share of 2 % patches with colour sd < 0.02 (flat colour)"),
    "edge_tail": (lambda l: quantile_ratio(grad(l), 0.5, 0.95, 0.5), -1,
                  "log q95 / q50 of the colour gradient (few hard edges + flat areas)"),
    "grad_kurtosis": (grad_kurtosis, -1, "kurtosis of the colour gradient"),
    "grad_gini": (grad_gini, -1, "Gini coefficient of the colour gradient"),
    "grad_spread": (lambda l: quantile_ratio(grad(l), 0.1, 0.9, 0.5), -1,
                    "log q90 / q10 of the colour gradient (uneven texture)"),
    "patch_sd_spread": (lambda l: quantile_ratio(patch_sd(l)[0], 0.1, 0.9, 0.005), -1,
                        "log q90 / q10 of the 2 % patch colour sd"),
    "textured_share": (lambda l: float((grad(l) > traits.TEXTURE_GRAD).mean()), 1,
                       "share of pixels above the stroke-isotropy texture threshold"),
    "band_ratio": (band_ratio, 1, "log energy at 0.4-1.2 % of the side / at 2-6 %"),
    "fine_colour_share": (fine_colour_share, 1, "within-2 %-patch a,b variance / whole-image a,b variance"),
    "hue_entropy": (hue_entropy, 1, "chroma-weighted hue entropy (24 bins)"),
    "n_colours": (n_colours, 1, "OKLab cells of 0.025 holding >= 0.05 % of pixels"),
    "chroma_spread": (lambda l: float(chroma(l).std()), 1, "sd of OKLab chroma"),
    "mean_chroma": (lambda l: float(chroma(l).mean()), 1, "mean OKLab chroma"),
    "pastel_share": (lambda l: float(((l[..., 0] >= 0.65) & (l[..., 0] <= 0.95) & (chroma(l) >= 0.02)
                                      & (chroma(l) <= 0.12)).mean()), 1, "share of light tints (L .65-.95, C .02-.12)"),
    "cool_share": (lambda l: hue_share(l, 140, 320), 1, "share of chromatic cool-hued pixels"),
    "blue_share": (lambda l: hue_share(l, 200, 320), 1, "share of chromatic blue-violet pixels"),
    "warm_cast": (lambda l: float(l[..., 2].mean() / (chroma(l).mean() + 1e-6)), -1,
                  "mean b / mean chroma (yellowed varnish, earth palette)"),
    "dark_lines": (lambda l: float((ndimage.grey_closing(l[..., 0], size=7) - l[..., 0] > 0.12).mean()), -1,
                   "black top-hat > 0.12 (dark thin lines)"),
    "top_light": (lambda l: float(thirds(l)[0][..., 0].mean() - thirds(l)[1][..., 0].mean()), 1,
                  "mean L of the top third - bottom third (a sky above)"),
    "top_blue": (lambda l: float(thirds(l)[1][..., 2].mean() - thirds(l)[0][..., 2].mean()), 1,
                 "OKLab b of the bottom third - top third (blue above)"),
    "top_texture_ratio": (lambda l: float(np.log(texture(thirds(l)[0]) / texture(thirds(l)[1]))), -1,
                          "log L texture of the top third / bottom third (smooth sky, textured ground)"),
    "iso_window_1pc": (lambda l: iso_window(l, 0.01), 1, "stroke isotropy with a 1 % window"),
    "iso_window_2pc": (lambda l: iso_window(l, 0.02), 1, "stroke isotropy with a 2 % window"),
    "iso_weighted_2pc": (lambda l: iso_weighted(l, 0.02), 1, "isotropy, 2 % window, gradient-energy weighted"),
    "hard_edges@0.06": (lambda l: float((grad(l) / l.shape[0] > 0.06).mean()), -1, "hard_edges, step 0.06"),
    "hard_edges@0.16": (lambda l: float((grad(l) / l.shape[0] > 0.16).mean()), -1, "hard_edges, step 0.16"),
    "saturated_colour@0.12": (lambda l: float((chroma(l) >= 0.12).mean()), -1, "saturated_colour, C >= 0.12"),
    "saturated_colour@0.20": (lambda l: float((chroma(l) >= 0.20).mean()), -1, "saturated_colour, C >= 0.20"),
}


def grouped_cv(X, y, era, artist, make, repeats):
    keep = (y == 1) | (era == "modern")
    aucs, modern = [], []
    for rep in range(repeats):
        s = np.zeros(len(y))
        for tr, te in StratifiedGroupKFold(bench.FOLDS, shuffle=True, random_state=rep).split(X, y, artist):
            mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-12
            s[te] = make().fit((X[tr] - mu) / sd, y[tr]).predict_proba((X[te] - mu) / sd)[:, 1]
        aucs.append(bench.auc(y, s))
        modern.append(bench.auc(y[keep], s[keep]))
    return float(np.mean(aucs)), float(np.mean(modern))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("../shared/realart"))
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    rows, values = bench.load(args.corpus, args.size)
    for r, v in zip(rows, values):
        with Image.open(args.corpus / r["file"]) as im:
            lab = traits.srgb_to_oklab(traits.to_rgb_array(im.convert("RGB"), args.size))
        v.update({k: f(lab) for k, (f, _, _) in CANDIDATES.items()})
    comp = list(traits.COMPONENTS)
    X, y, era, artist = bench.corpus_arrays(rows, values, comp)
    base = bench.cross_validated_auc(X, y, era, artist)
    file_row = {r["file"]: i for i, r in enumerate(rows)}
    pairs = [(file_row[r["dup_of"]], i) for i, r in enumerate(rows) if r["role"] == "dupe"]
    print(f"### candidates at size {args.size} (dropped unless named in traits.COMPONENTS)\n\n"
          f"Composite of traits.COMPONENTS alone ({len(comp)}), cross-validated as in bench_traits_realart: "
          f"{base[0]:.3f}, vs modern {base[3]:.3f}.\n\n"
          "| candidate | dir | measures | AUC all | vs old | vs modern | scan noise × gap | CV AUC, components + "
          "candidate (vs modern) |\n|---|---|---|---|---|---|---|---|")
    for k, (_, d, what) in CANDIDATES.items():
        Xk, yk, erak, _ = bench.corpus_arrays(rows, values, [k])
        s = Xk[:, 0] * d
        cells = [bench.auc(yk[sel], s[sel]) for sel in (yk >= 0, (yk == 1) | (erak == "old"), (yk == 1) | (erak == "modern"))]
        gap = abs(Xk[yk == 1, 0].mean() - Xk[yk == 0, 0].mean())
        noise = np.median([abs(values[a][k] - values[b][k]) for a, b in pairs]) / gap if gap > 0 else float("inf")
        # a threshold variant "<component>@<value>" replaces its component; any other candidate is added
        Xc, _, _, _ = bench.corpus_arrays(rows, values, [c for c in comp if c != k.split("@")[0]] + [k])
        cv = bench.cross_validated_auc(Xc, y, era, artist, repeats=10)
        print(f"| {k} | {d:+d} | {what} | " + " | ".join(f"{c:.3f}" for c in cells)
              + f" | {noise:.2f} | {cv[0]:.3f} ({cv[3]:.3f}) |")
    names = comp + list(CANDIDATES)
    Xa, ya, eraa, arta = bench.corpus_arrays(rows, values, names)
    l2 = grouped_cv(Xa, ya, eraa, arta, lambda: LogisticRegression(C=0.03, max_iter=2000), 10)
    rf = grouped_cv(Xa, ya, eraa, arta, lambda: RandomForestClassifier(300, min_samples_leaf=3, random_state=0), 3)
    print(f"\nAll in ({len(names)} features: the components and every candidate), artist-grouped 5-fold CV: "
          f"L2 logistic C = 0.03 {l2[0]:.3f} (vs modern {l2[1]:.3f}, 10 repeats); random forest (300 trees, "
          f"leaf >= 3) {rf[0]:.3f} (vs modern {rf[1]:.3f}, 3 repeats).")


if __name__ == "__main__":
    main()
