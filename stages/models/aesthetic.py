"""The LAION improved aesthetic predictor: an MLP head on CLIP ViT-L/14 image embeddings (the filter's
``low_aesthetic`` check and evaluate's aesthetic score)."""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


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
