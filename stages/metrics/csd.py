"""CSD style embeddings (Somepalli et al. 2024, "Measuring Style Similarity in Diffusion Models").

CSD is a CLIP ViT-L/14 vision tower whose projection is replaced by a learnt *style* projection.
The released checkpoint (``checkpoint.pth`` from github.com/learn2phoenix/CSD) holds
``model_state_dict`` with keys ``[module.]backbone.*`` (OpenAI CLIP visual weights without
``proj``), ``last_layer_style`` (1024 x 768) and ``last_layer_content``. open_clip's
``VisionTransformer`` uses the same key names as OpenAI CLIP, so we load the backbone into
``open_clip.create_model(arch).visual`` and put ``last_layer_style`` in its ``proj`` slot:
``visual(x) = backbone(x) @ last_layer_style``, then L2-normalise, exactly CSD's style output.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


class CsdModel:
    """``embed_images(images) -> (N, D)`` unit style vectors, like ``ClipModel.embed_images``."""

    def __init__(self, visual: torch.nn.Module, preprocess, device: str, name: str, batch_size: int = 16):
        self.visual, self.preprocess, self.device, self.name = visual.eval(), preprocess, device, name
        self.batch_size = batch_size

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int | None = None,
                     progress: bool = False) -> np.ndarray:
        bs = batch_size or self.batch_size
        out = []
        for i in range(0, len(images), bs):
            batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i:i + bs]])
            feats = self.visual(batch.to(self.device)).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def load_csd(weights: str | Path, arch: str = "ViT-L-14", device: str = "cpu",
             batch_size: int = 16) -> CsdModel:
    """Build the CSD style encoder from a checkpoint file (``arch`` = the open_clip model name of
    its backbone; tests use the project's tiny CLIP architecture)."""
    import open_clip

    from stages.models import clip as clip_mod

    if arch == clip_mod.TINY:
        clip_mod._register_tiny(open_clip)
        arch = clip_mod.TINY_NAME
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None,
                                                                 force_quick_gelu=True)
    visual = model.visual
    ckpt = torch.load(str(weights), map_location="cpu", weights_only=True)
    state = ckpt.get("model_state_dict", ckpt)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "last_layer_style" not in state:
        raise ValueError(f"{weights}: not a CSD checkpoint (no 'last_layer_style' key)")
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    backbone.pop("proj", None)
    missing, unexpected = visual.load_state_dict(backbone, strict=False)
    missing = [k for k in missing if k != "proj"]
    if missing or unexpected:
        raise ValueError(f"{weights}: CSD backbone does not fit {arch}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    visual.proj = torch.nn.Parameter(state["last_layer_style"].float(), requires_grad=False)
    log.info("CSD style encoder %s (%s) on %s", Path(weights).name, arch, device)
    return CsdModel(visual.to(device), preprocess, device, f"csd/{Path(weights).name}", batch_size)
