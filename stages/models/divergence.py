"""Divergence guards: a NaN/inf loss, gradient norm or LoRA weight stops training at the step it
appears (naming it), before it can be checkpointed or exported."""
from __future__ import annotations

import numpy as np
import torch


class TrainingDiverged(SystemExit):
    """Training stopped on a non-finite loss, gradient or weight (a clean exit with the message)."""


def check_step(metrics: dict, step: int) -> None:
    """Stop at the first step whose loss or gradient norm is NaN/inf, naming it."""
    bad = {k: metrics[k] for k in ("loss", "grad_norm") if k in metrics and not np.isfinite(metrics[k])}
    if bad:
        raise TrainingDiverged(
            f"non-finite {', '.join(f'{k} ({v})' for k, v in bad.items())} at step {step}: training stopped "
            "before saving it; the last checkpoint is kept. Lower train.lr, raise train.warmup_steps or "
            "check the data (data/cache)")


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
