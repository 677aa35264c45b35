"""Rectified-flow training maths for Flux (as in diffusers' train_dreambooth_lora_flux.py), free of any
stage or file logic.

- latents are cached already shifted and scaled: ``(vae.encode(x).sample() - shift) * scale``;
- ``x_t = (1 - σ)·x0 + σ·ε``, the model predicts the velocity ``ε - x0``;
- the timestep passed to the transformer is σ itself (the model multiplies it by 1000);
- σ is drawn ``uniform``, ``logit_normal`` (sigmoid of a normal) or ``shift`` (logit-normal,
  then the time shift ``s·σ / (1 + (s-1)·σ)`` that Flux applies at inference, which moves
  training towards noisier steps where composition and style are set).
"""
from __future__ import annotations

from typing import Optional

import torch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2·W/2, 4C) tokens (Flux's 2x2 patches)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, height_px: int, width_px: int, vae_scale_factor: int = 8) -> torch.Tensor:
    """Inverse of :func:`pack`, given the image size in pixels."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, height_px, width_px, vae_scale_factor)


def image_ids(latent_h: int, latent_w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """2-D positional ids (H/2·W/2, 3) for packed latents of a (latent_h, latent_w) grid."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, latent_h // 2, latent_w // 2, device, dtype)


def text_ids(seq_len: int, device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)


def sample_sigmas(n: int, mode: str, *, generator: Optional[torch.Generator] = None,
                  logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 3.0,
                  device=None) -> torch.Tensor:
    """n noise levels σ in (0, 1), float32."""
    if mode == "uniform":
        sigmas = torch.rand(n, generator=generator)
    elif mode in ("logit_normal", "shift"):
        sigmas = torch.sigmoid(torch.randn(n, generator=generator) * logit_std + logit_mean)
        if mode == "shift":
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    else:
        raise ValueError(f"unknown sigma sampling {mode!r} (uniform | logit_normal | shift)")
    return sigmas.clamp(1e-4, 1 - 1e-4).to(device)


def noisy_and_target(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor):
    """``x_t = (1-σ)x0 + σε`` and the velocity target ``ε - x0`` (σ broadcast over tokens)."""
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 (bf16 predictions are upcast first)."""
    return torch.nn.functional.mse_loss(pred.float(), target.float())
