"""Prompt fidelity (CLIP score) and distribution distances (KID, FID) on precomputed embeddings.

- :func:`clip_score`: torchmetrics' definition, ``100 * max(cos(image, text), 0)`` averaged over
  pairs, computed with the project's open_clip model (no extra weights to download).
- :func:`kid` / :func:`fid`: torchmetrics' KernelInceptionDistance / FrechetInceptionDistance fed
  with image *embeddings* through an identity feature extractor. The evaluate stage passes the
  style embeddings (CLIP, or CSD), i.e. "KID/FID in CLIP space" as in clean-fid's CLIP mode:
  Inception weights would need a download, and CLIP features track style better. Values are only
  comparable between runs that use the same embedding model.
"""
from __future__ import annotations

import numpy as np
import torch


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """Mean of ``100 * max(cos, 0)`` over matching rows of unit image and text embeddings."""
    image_emb, text_emb = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image {image_emb.shape} and text {text_emb.shape} embeddings differ")
    if len(image_emb) == 0:
        return float("nan")
    cos = np.sum(image_emb * text_emb, axis=1)
    return float(np.mean(100.0 * np.maximum(cos, 0.0)))


class _Precomputed(torch.nn.Module):
    """Identity 'feature extractor': the metric receives embeddings instead of images."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def kid(real: np.ndarray, fake: np.ndarray, subset_size: int, subsets: int = 100,
        seed: int = 0) -> tuple[float, float, int]:
    """KID (polynomial-kernel MMD², torchmetrics) between two embedding sets.
    Returns (mean, std over subsets, subset size used = min(subset_size, |real|, |fake|))."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = int(min(subset_size, len(real), len(fake)))
    if size < 2:
        raise ValueError(f"KID needs at least 2 embeddings per set, got {len(real)} and {len(fake)}")
    metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subset_size=size,
                                     subsets=subsets)
    metric.update(torch.as_tensor(real, dtype=torch.float64), real=True)
    metric.update(torch.as_tensor(fake, dtype=torch.float64), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # subsets are drawn with torch.randperm
        mean, std = metric.compute()
    return float(mean), float(std), size


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance (torchmetrics) between two embedding sets."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    metric.update(torch.as_tensor(real, dtype=torch.float64), real=True)
    metric.update(torch.as_tensor(fake, dtype=torch.float64), real=False)
    return float(metric.compute())
