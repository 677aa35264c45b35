"""Images from prompts with one large model on the device at a time.

``FluxPipeline(prompt=...)`` keeps T5-XXL (8.9 GiB in bf16), CLIP, the VAE and the transformer on
the GPU together: 17.6 GiB peak for one 1024² image with an nf4 transformer. Rendering here runs
the pipeline's three parts one after the other, each alone on the device:

1. :func:`embed_prompts`: the text encoders (T5 in nf4 on small cards) turn every prompt into
   embeddings, then are freed; the embeddings are cached, so a rerun (another LoRA, another
   experiment) loads no text encoder at all;
2. :func:`denoise`: the transformer (with its adapter) turns embeddings + seeded noise into
   latents, through FluxPipeline's own loop (``output_type="latent"``); the caller frees it
   (stages.models.sampler: that transformer with an adapter, as the sample stage and the grid use it);
3. :func:`decode`: the VAE turns the latents into images, exactly as the pipeline would.

The images are the pipeline's: same embeddings, same noise (one CPU generator per image), same
scheduler and same decoding; tests/test_render.py compares them with ``FluxPipeline(prompt=...)``.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from stages.core.device import default_device, default_dtype

log = logging.getLogger(__name__)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompt_cache_file(model_params, prompts: list[str], max_sequence_length: int, plan, device) -> Path:
    """Where the embeddings of ``prompts`` are kept between runs: keyed by both text encoders'
    files (stages.models.quant_cache.key), T5's quantization, the dtype, the length and the text."""
    from stages.models import flux, quant_cache

    source = flux.resolve_base(model_params)
    dtype = default_dtype(device)
    keys = [quant_cache.key(flux.local_folder(source, model_params.revision, sub), mode, dtype)
            for sub, mode in (("text_encoder", "none"), ("text_encoder_2", plan.text_encoder_quantization))]
    blob = json.dumps([keys, max_sequence_length, prompts])
    return quant_cache.root() / "prompt-embeddings" / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.safetensors"


@torch.no_grad()
def encode_texts(pipe, prompts: list[str], max_sequence_length: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pipe.encode_prompt`` over ``prompts`` in batches of ``batch``: T5 embeddings (N, L, D) and
    CLIP pooled embeddings (N, P), on the CPU (what the encode stage and :func:`embed_prompts` use)."""
    logging.getLogger("diffusers.pipelines.flux.pipeline_flux").setLevel(logging.ERROR)  # truncation notes
    device = pipe.text_encoder_2.device
    embeds, pooled = [], []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        e, pl, _ = pipe.encode_prompt(prompt=chunk, prompt_2=chunk, device=device,
                                      max_sequence_length=max_sequence_length)
        embeds.append(e.cpu())
        pooled.append(pl.cpu())
    return torch.cat(embeds), torch.cat(pooled)


@torch.no_grad()
def embed_prompts(model_params, prompts: list[str], max_sequence_length: int, plan, *,
                  device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 embeddings (N, L, D) and CLIP pooled embeddings (N, P) of ``prompts``, on the CPU. The
    text encoders are loaded for this and freed before returning; embeddings computed once are
    read back from the cache (:func:`prompt_cache_file`), so a rerun loads no text encoder."""
    from safetensors.torch import load_file

    from stages.core import tensorfiles
    from stages.core.io import atomic_file
    from stages.models import flux

    device = torch.device(device) if device is not None else default_device()
    cached = prompt_cache_file(model_params, prompts, max_sequence_length, plan, device)
    if cached.exists():
        t = load_file(cached)
        log.info("prompt embeddings from %s (no text encoder loaded)", cached)
        return t["prompt_embeds"], t["pooled"]
    pipe = flux.load_text_encoders(model_params, device=device, text_quantization=plan.text_encoder_quantization)
    embeds, pooled = encode_texts(pipe, prompts, max_sequence_length, plan.text_batch)
    del pipe
    free_memory()
    try:
        with atomic_file(cached, suffix=".safetensors") as tmp:
            tensorfiles.save({"prompt_embeds": embeds.contiguous(), "pooled": pooled.contiguous()}, tmp)
    except OSError as err:  # a cache: a full disk must not stop the stage
        log.warning("could not cache prompt embeddings in %s: %s", cached, err)
    return embeds, pooled


def transformer_pipeline(model_params, transformer):
    """A FluxPipeline around ``transformer`` alone (scheduler from the base; no VAE, no text
    encoders): what :func:`denoise` runs, and what LoRA adapters are loaded into."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from stages.models import flux

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        flux.resolve_base(model_params), subfolder="scheduler", revision=model_params.revision)
    pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_lora_scale(transformer, adapter: str, scale: float) -> None:
    """Render with ``adapter`` at ``scale`` (peft's: ``scale`` x alpha / rank). The scales are 0-dim tensors
    changed in place, so compiled blocks read a new value instead of baking a new constant: diffusers'
    ``set_adapters`` stores Python floats, on which dynamo specialises, and every scale compiled each block
    again (about 12 s per scale on an H200 at 1024², reports/bench/speed.md). Same arithmetic as a float."""
    import math

    from peft.tuners.lora import LoraLayer

    for module in transformer.modules():
        if not isinstance(module, LoraLayer) or adapter not in module.scaling:
            continue
        rank = module.r[adapter]
        value = scale * module.lora_alpha[adapter] / (math.sqrt(rank) if module.use_rslora.get(adapter) else rank)
        current = module.scaling[adapter]
        if isinstance(current, torch.Tensor):
            current.fill_(value)
        else:
            module.scaling[adapter] = torch.tensor(value, device=module.lora_A[adapter].weight.device)


@torch.no_grad()
def denoise(pipe, embeds: torch.Tensor, pooled: torch.Tensor, seeds: list[int], *, steps: int,
            guidance: float, height: int, width: int, batch_size: int = 1,
            progress: Optional[callable] = None) -> list[torch.Tensor]:
    """Packed latents (1, seq, C) for every (embedding row, seed) pair ``embeds[k], seeds[k]``."""
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    out = []
    for i in range(0, len(seeds), batch_size):
        sl = slice(i, i + batch_size)
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[sl]]
        latents = pipe(prompt_embeds=embeds[sl].to(device, dtype), pooled_prompt_embeds=pooled[sl].to(device, dtype),
                       num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                       generator=gens, output_type="latent", return_dict=False)[0]
        out += [x[None].cpu() for x in latents]
        if progress is not None:
            progress(len(out))
    return out


def to_pil(images: torch.Tensor) -> list:
    """RGB PIL images from VAE output in [-1, 1] (``(n, 3, H, W)``), the very bytes of diffusers'
    ``VaeImageProcessor.postprocess(..., output_type="pil")``: the same denormalisation in the
    VAE's dtype, then ``round(255 x)`` in float32 (ties to even, as numpy). The arithmetic runs
    where the tensor is (on the GPU: ~1 ms per 1024² image, against 0.1 s for numpy on the host)
    and only uint8 pixels are copied back."""
    from PIL import Image

    pixels = (images * 0.5 + 0.5).clamp(0, 1).float().mul(255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in pixels.permute(0, 2, 3, 1).cpu().numpy()]


@torch.no_grad()
def decode(vae, latents: list[torch.Tensor], height: int, width: int, batch: int = 1) -> list:
    """PIL images from packed latents (each (1, seq, C)), as FluxPipeline decodes them, ``batch``
    latents per VAE call (the card's plan: stages.models.memory.Plan.vae_batch)."""
    from diffusers import FluxPipeline

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    images = []
    for i in range(0, len(latents), batch):
        packed = torch.cat(latents[i:i + batch]).to(vae.device, vae.dtype)
        x = FluxPipeline._unpack_latents(packed, height, width, factor)
        x = x / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images += to_pil(vae.decode(x, return_dict=False)[0])
    return images

