"""The sampling transformer with its adapter, and the decoding of what it renders: the renderer of the
sample stage and of the operating-point grid.

Both stages store base images (LoRA scale 0) in the shared base-image cache (stages.models.base_cache),
so both render them with this code, which is part of the cache's key; the stages only choose what to
render (prompts, seeds, scales, adapters), which the key's fields say. :class:`Sampler` loads the
transformer on the card's attention kernel with one adapter (later adapters, the grid's snapshots, are
hot-swapped into the same layers; the scale is set in place), compiles its blocks once, and renders
through stages.models.render.denoise; :func:`decode_calls` decodes in the batches of the pipeline calls
that rendered the images, whatever a cache held.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from stages.models import attention, compiling, flux, memory, render
from stages.models.base_cache import batches
from stages.models.snapshots import DIFFUSERS_FILE as LORA_FILE  # an adapter folder's weights


class Sampler:
    """The sampling transformer of ``p.model`` with one LoRA adapter (none: ``lora_dir=None``), on the
    card's attention kernel, its blocks compiled after the adapter is in them (``sample.compile``);
    renders at ``sample.steps``, ``guidance``, ``resolution``, ``batch_size`` images per pipeline call."""

    ADAPTER = "style"

    def __init__(self, p, device, lora_dir: Optional[Path] = None):
        self.sp = sp = p.sample
        kernel = attention.choose(p.model, device, memory.tokens(sp.resolution, p.train.max_sequence_length),
                                  backward=False)
        self.pipe = render.transformer_pipeline(p.model, flux.load_transformer(p.model, device=device))
        attention.set_backend(self.pipe.transformer, kernel)
        self.has_lora = lora_dir is not None
        if self.has_lora:
            self.pipe.load_lora_weights(str(lora_dir), weight_name=LORA_FILE, adapter_name=self.ADAPTER)
        if compiling.enabled(sp.compile, device):  # after the adapter: its layers are part of the graphs
            compiling.compile_blocks(self.pipe.transformer)

    def swap(self, lora_dir: Path) -> None:
        """Another adapter of the same shape into the same layers (a snapshot): the compiled blocks stay."""
        self.pipe.load_lora_weights(str(lora_dir), weight_name=LORA_FILE, adapter_name=self.ADAPTER, hotswap=True)

    def latents(self, scale: float, embeds: torch.Tensor, pooled: torch.Tensor, seeds: list[int],
                progress: Optional[callable] = None) -> list[torch.Tensor]:
        """:func:`render.denoise` of ``(embeds[k], seeds[k])`` at LoRA ``scale`` (0: the adapter off, the base
        model). The scale is set in place (render.set_lora_scale): no recompiling per scale; the first
        compiled call builds the graphs, and runs eager if that fails (stages.models.compiling.run_first)."""
        if scale == 0:
            if self.has_lora:
                self.pipe.disable_lora()
        elif not self.has_lora:
            raise ValueError(f"LoRA scale {scale}: this sampler has no adapter")
        else:
            self.pipe.enable_lora()
            render.set_lora_scale(self.pipe.transformer, self.ADAPTER, scale)
        sp = self.sp
        return compiling.run_first(lambda: render.denoise(
            self.pipe, embeds, pooled, seeds, steps=sp.steps, guidance=sp.guidance, height=sp.resolution,
            width=sp.resolution, batch_size=sp.batch_size, progress=progress), self.pipe.transformer)

    def close(self) -> None:
        """Free the device for the VAE."""
        del self.pipe
        render.free_memory()


def decode_calls(vae, latents: dict[int, torch.Tensor], batch_size: int, side: int, vae_batch: int):
    """(job index, PIL image) of ``latents`` (``{job index: latents}``), decoded per pipeline call
    (``batch_size`` jobs a call, stages.models.base_cache.batches): the same VAE batches whether a call's
    images were all rendered now or a cache held some, so the same bytes. A generator: the caller can
    encode one call's PNGs while the VAE decodes the next."""
    if not latents:
        return
    for chunk in batches(max(latents) + 1, batch_size):
        ks = [k for k in chunk if k in latents]
        if ks:
            yield from zip(ks, render.decode(vae, [latents[k] for k in ks], side, side, vae_batch))
