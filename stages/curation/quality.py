"""Image quality: weight-free heuristics, the LAION aesthetic head, thresholds, and scoring the
filter against planted ground truth.

Heuristics (:func:`heuristics`) on the decoded RGB image; blur, exposure and blank are measured on
the gray image with its long side scaled down to at most ``analysis_side`` px, so one threshold
serves every resolution:

- ``min_side`` (px) and ``aspect`` (width / height) of the stored image;
- ``blur``: variance of the Laplacian (0-255 gray) - low means no edges, i.e. blurred;
- ``clipped``: share of pixels at the ends of the range (gray <= 2 or >= 253): over/under-exposure;
- ``entropy`` (bits, 256-bin gray histogram) and ``std``: near-blank images have little of either;
- ``border``: the widest uniform band at an edge, as a share of that side (frames, letterboxing).

:func:`reject_reasons` turns scores into reason codes (:data:`REASONS`, in priority order).
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

# Reason codes, in the order they are reported (the first failing one is the row's `reason`).
REASONS = {
    "unreadable": "the image bytes do not decode",
    "too_small": "shorter side under filter.min_side",
    "bad_aspect": "width/height outside [filter.aspect_min, filter.aspect_max]",
    "exposure": "share of clipped pixels > filter.clipped_max (over/under-exposed)",
    "blank": "near-blank: gray entropy < filter.entropy_min or std < filter.std_min",
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


def heuristics(img, analysis_side: int = 512, size: Optional[tuple[int, int]] = None) -> dict:
    """All weight-free scores of one PIL image (see the module docstring). ``size``: the stored
    image's (width, height) when ``img`` was decoded at a reduced scale."""
    gray = _gray(img, analysis_side)
    clipped = float(((gray <= 2) | (gray >= 253)).mean())
    w, h = size or img.size
    return {
        "width": w, "height": h, "min_side": min(w, h), "aspect": w / max(1, h),
        "blur": laplacian_variance(gray), "clipped": clipped,
        "entropy": entropy_bits(gray), "std": float(gray.std()), "border": border_share(gray),
    }


def reject_reasons(s: dict, f) -> list[str]:
    """Heuristic reason codes for one image's scores ``s`` under the ``filter`` params ``f``."""
    out = []
    if s["min_side"] < f.min_side:
        out.append("too_small")
    if not f.aspect_min <= s["aspect"] <= f.aspect_max:
        out.append("bad_aspect")
    if s["entropy"] < f.entropy_min or s["std"] < f.std_min:
        out.append("blank")
    if s["clipped"] > f.clipped_max:
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


# ---- the LAION aesthetic head ----------------------------------------------------------------

class AestheticHead(nn.Module):
    """LAION improved aesthetic predictor: an MLP on the L2-normalised CLIP ViT-L/14 image embedding
    (no activations). Parameter names match the published ``sac+logos+ava1-l14-linearMSE.pth``."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.dim = dim
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb).squeeze(-1)

    @torch.inference_mode()
    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, dim) L2-normalised embeddings -> (N,) scores (about 1-10 with the LAION weights)."""
        if embeddings.shape[-1] != self.dim:
            raise ValueError(f"the aesthetic head takes {self.dim}-d CLIP embeddings, got "
                             f"{embeddings.shape[-1]}-d: use clip.model=ViT-L-14 with its weights")
        p = next(self.parameters())
        return self(torch.as_tensor(embeddings, dtype=p.dtype, device=p.device)).float().cpu().numpy()


def load_aesthetic_head(path_or_url: Optional[str], dim: int = 768, seed: int = 0,
                        device: str = "cpu") -> AestheticHead:
    """The head with weights from a local file (.pth/.pt/.safetensors) or an http(s) URL (cached by
    torch.hub); ``None`` gives seeded random weights (smoke profile: its scores mean nothing)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AestheticHead(dim)
    if path_or_url:
        if path_or_url.startswith(("http://", "https://")):
            state = torch.hub.load_state_dict_from_url(path_or_url, map_location="cpu",
                                                       weights_only=True, check_hash=False)
        elif path_or_url.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path_or_url)
        else:
            state = torch.load(path_or_url, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("model."): v for k, v in state.items()}
        head.load_state_dict(state)
        log.info("aesthetic head from %s", path_or_url)
    return head.to(device).eval()


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
