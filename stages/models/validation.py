"""Validation images during training: the user's prompts, seeds and guidance, every ``train.validate_every`` steps.

Prompts come from ``train.validation_prompts`` (a prompt file, the format of ``sample.prompts``; None =
``sample.prompts``), each with the trigger (``caption.trigger``) appended as the sample stage does. Each is
rendered for every seed of ``train.validation_seeds`` at ``train.validation_guidance``,
``train.validation_steps`` sampling steps and ``train.validation_resolution`` (None = ``train.resolution``).

Memory: :func:`prepare` runs before the transformer is loaded. It embeds the prompts once with
stages.models.render.embed_prompts (the text encoders alone on the device, freed before it returns;
embeddings cached between runs) and loads the VAE, so validation adds the VAE and the sampler's
activations to the training budget, never T5 (~9 GB in bf16 on FLUX.1-dev). Rendering is render's
pipeline in parts: the training transformer denoises, the VAE decodes.

Images go to ``step-<N>-p<prompt>-s<seed>.png`` in the run's progress folder (stages/train.py copies
them to ``reports/train/validation/`` when the run has finished) and to MLflow as images with their
step (``validation/p<prompt>-s<seed>``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.core import tracking
from stages.core.images import encode_pngs
from stages.core.io import write_bytes
from stages.core.prompts import read_prompts, with_trigger

log = logging.getLogger(__name__)


def validation_prompts(p) -> list[str]:
    """The validation prompts with the trigger, from ``train.validation_prompts`` or ``sample.prompts``."""
    key = "train.validation_prompts" if p.train.validation_prompts else "sample.prompts"
    path = p.train.validation_prompts or p.sample.prompts
    return [with_trigger(pr, p.caption.trigger) for pr in read_prompts(path, key)]


def side(p) -> int:
    return max(16, ((p.train.validation_resolution or p.train.resolution) // 16) * 16)


@dataclass
class Validator:
    prompts: list[str]
    embeds: torch.Tensor   # (P, L, D) T5 embeddings, on CPU
    pooled: torch.Tensor   # (P, D') CLIP pooled, on CPU
    vae: torch.nn.Module
    p: object
    batch: int = 1         # images per transformer and VAE call (the plan's validation_batch)

    def due(self, step: int) -> bool:
        every = self.p.train.validate_every
        return bool(every) and (step % every == 0 or step == self.p.train.steps)

    def render(self, trainer, step: int, out_dir: Path) -> list[Path]:
        """One image per (prompt, seed) with the adapter being trained; logged to MLflow with ``step``."""
        from stages.models import render

        tp = self.p.train
        jobs = [(k, seed) for k in range(len(self.prompts)) for seed in tp.validation_seeds]
        rows = torch.tensor([k for k, _ in jobs])
        pipe = render.transformer_pipeline(self.p.model, trainer.transformer)
        n, was_training = side(self.p), trainer.transformer.training
        trainer.transformer.eval()
        try:
            with torch.autocast(trainer.device.type, dtype=trainer.base_dtype, enabled=trainer.autocast):
                latents = render.denoise(pipe, self.embeds[rows], self.pooled[rows], [s for _, s in jobs],
                                         steps=tp.validation_steps, guidance=tp.validation_guidance, height=n, width=n,
                                         batch_size=self.batch)
            images = render.decode(self.vae, latents, n, n, self.batch)
        finally:
            trainer.transformer.train(was_training)
        paths = []
        for (k, seed), img, png in zip(jobs, images, encode_pngs(images)):  # PNGs encoded on threads
            path = out_dir / f"step-{step:06d}-p{k}-s{seed}.png"
            write_bytes(path, png)  # a DVC output (reports/train/validation): atomic
            tracking.log_image(img, f"validation/p{k}-s{seed}", step)
            paths.append(path)
        return paths

    def index(self) -> dict:
        tp = self.p.train
        return {"prompts": self.prompts, "seeds": list(tp.validation_seeds), "guidance": tp.validation_guidance,
                "steps": tp.validation_steps, "resolution": side(self.p), "every": tp.validate_every}


def prepare(p, device, plan) -> Validator:
    """Embed the validation prompts (text encoders loaded and freed) and load the VAE: call before
    loading the transformer. ``plan``: the stage's stages.models.memory plan."""
    from stages.models import flux, render

    prompts = validation_prompts(p)
    embeds, pooled = render.embed_prompts(p.model, prompts, p.train.max_sequence_length, plan, device=device)
    vae = flux.load_vae(p.model, device=device)
    log.info("validation: %d prompts x %d seeds every %d steps at %d px, %d per call", len(prompts),
             len(p.train.validation_seeds), p.train.validate_every, side(p), plan.validation_batch)
    return Validator(prompts, embeds, pooled, vae, p, batch=plan.validation_batch)
