"""Divergence guards: a NaN/inf loss, gradient norm or LoRA weight stops training at the step it
appears (naming it), before it can be checkpointed or exported."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


class TrainingDiverged(SystemExit):
    """Training stopped on a non-finite loss, gradient or weight (a clean exit with the message)."""


def check_step(metrics: dict, step: int, last_checkpoint: Optional[int] = None) -> None:
    """Stop at the first step whose loss or gradient norm is NaN/inf, naming it (and the run's last
    checkpoint, ``last_checkpoint``, when it has one)."""
    bad = {k: metrics[k] for k in ("loss", "grad_norm") if k in metrics and not np.isfinite(metrics[k])}
    if bad:
        kept = (f"this run's last checkpoint (step {last_checkpoint}) is kept" if last_checkpoint
                else "this run has saved no checkpoint yet")
        raise TrainingDiverged(
            f"non-finite {', '.join(f'{k} ({v})' for k, v in bad.items())} at step {step}: training stopped "
            f"before saving it; {kept}. Lower train.lr, raise train.warmup_steps or check the data (data/cache)")


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
