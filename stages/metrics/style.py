"""Style similarity and diversity on L2-normalised image embeddings (CLIP or CSD).

All inputs are (N, D) float arrays whose rows are unit vectors; cosine = dot product.

- :func:`centroid_cosine`: mean cosine of each sample to the (re-normalised) centroid of the
  reference set. Raw cosines of CLIP/CSD are uncalibrated: read them against the held-out set's own
  value (leave-one-out), which the evaluate stage reports beside base and LoRA.
- :func:`nn_cosine`: mean over samples of the cosine to the nearest reference embedding.
- :func:`diversity`: mean pairwise cosine distance (1 - cos) inside each group (one prompt's
  seeds), averaged over groups with at least two members.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def centroid_cosine(samples: np.ndarray, reference: np.ndarray, leave_one_out: bool = False) -> float:
    """Mean cosine of ``samples`` to the reference centroid. With ``leave_one_out`` (samples IS
    the reference set) each row is compared to the centroid of the others."""
    s, r = _unit(samples), _unit(reference)
    if len(s) == 0 or len(r) == 0:
        return float("nan")
    if leave_one_out:
        if len(r) < 2:
            return float("nan")
        others = (r.sum(axis=0, keepdims=True) - r) / (len(r) - 1)
        return float(np.mean(np.sum(r * _unit(others), axis=1)))
    return float(np.mean(s @ _unit(r.mean(axis=0))))


def centroid_cosines(samples: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each sample's cosine to the reference centroid: the terms whose mean is :func:`centroid_cosine`
    (the operating-point grid bootstraps over them)."""
    s, r = _unit(samples), _unit(reference)
    return s @ _unit(r.mean(axis=0))


def nn_cosine(samples: np.ndarray, reference: np.ndarray, leave_one_out: bool = False) -> float:
    """Mean over samples of the highest cosine to any reference row (self excluded with
    ``leave_one_out``, where samples and reference are the same set)."""
    s, r = _unit(samples), _unit(reference)
    if len(s) == 0 or len(r) == 0 or (leave_one_out and len(r) < 2):
        return float("nan")
    sims = s @ r.T
    if leave_one_out:
        np.fill_diagonal(sims, -np.inf)
    return float(np.mean(sims.max(axis=1)))


def diversity(embeddings: np.ndarray, groups: Sequence[Hashable] | None = None) -> float:
    """Mean pairwise cosine distance within each group, averaged over groups of >= 2 rows
    (one group = all rows when ``groups`` is None). NaN when no group has two rows."""
    e = _unit(embeddings)
    groups = list(groups) if groups is not None else [0] * len(e)
    if len(groups) != len(e):
        raise ValueError(f"{len(groups)} group labels for {len(e)} embeddings")
    values = []
    for g in dict.fromkeys(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        if len(idx) < 2:
            continue
        sims = e[idx] @ e[idx].T
        iu = np.triu_indices(len(idx), k=1)
        values.append(float(np.mean(1.0 - sims[iu])))
    return float(np.mean(values)) if values else float("nan")
