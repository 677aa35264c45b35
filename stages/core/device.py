"""Where models run: the one default device (a CUDA GPU when there is one, else the CPU) and the
dtype that goes with it (bf16 on CUDA, fp32 on CPU, where bf16 matmuls are slow)."""
from __future__ import annotations

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
