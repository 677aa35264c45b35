"""Base images once: the sample stage's LoRA-scale-0 images, kept between experiments.

The base images of an experiment (the base model without the adapter) are the same in every
experiment that shares the base, prompts, seeds and sampler settings; rendering them again in
each ``dvc exp run -S lora.rank=...`` costs a third of the sample stage at the default three
scales. They are kept as PNG bytes (exactly the file the stage writes) in the content-addressed
stage cache (stages.core.stagecache, kind ``base-images``), one entry per image, under a key of
everything the image is a function of (:func:`run_fields` + :func:`image_fields`):

- the base: ``model.base``, ``model.revision``, ``model.quantization`` and the identity of the
  transformer, VAE and scheduler files that were resolved (content hashes; stagecache.folder_identity);
- the prompt: the full text (with the trigger), ``train.max_sequence_length`` and the sha256 of its
  T5 and CLIP embeddings (so the text encoders and their quantization count too);
- the seed, ``sample.steps``, ``sample.guidance``, the resolution, the scheduler's config,
  ``sample.compile`` (compiled renders agree within a grey level, not bit for bit), the attention
  kernel (stages.models.attention) and the VAE batch of the card's plan;
- the compute dtype, the device class (``cpu``, or ``cuda:<card name>``: GPU models differ in the
  last bits), the torch, diffusers and peft versions, the source of the code that renders
  (:data:`CODE`: an edit there, e.g. a faster sampler, renders again); and
- the number of images in the pipeline call that renders it (:func:`batches`): a batch of one
  differs from a batch of several in the last bit even on the CPU, so an image is only reused
  from a call of the same size, and a miss re-renders its whole batch, exactly as a cold run would.

Not the adapter, nor anything about the experiment. So a warm cache gives the very bytes a cold
run writes, and any change of a key field renders again. The keys go into ``index.json`` (each
base image's ``base_key``) whether or not the cache was used: the index says which render it
shows and never depends on the cache's state. ``sample.base_cache: false`` renders every base
image (and neither reads nor writes the cache); to clear it, delete
``<stagecache.root()>/base-images`` (by default ``~/.cache/flux-impressionism/stage-cache/base-images``).
"""
from __future__ import annotations

import hashlib
import json
import logging

import torch

from stages.core import stagecache
from stages.core.device import default_dtype

log = logging.getLogger(__name__)
KIND = "base-images"
VERSION = 1
# the code an image's pixels come from (any edit there renders again)
# (the sample stage and the grid render them with stages.models.sampler and encode their PNGs with
# images.encode_png: their own modules only choose what to render, which the key's fields say)
CODE = ("stages/models/sampler.py", "stages/models/render.py", "stages/models/flux.py", "stages/models/streaming.py",
        "stages/models/quant.py", "stages/models/quant_cache.py", "stages/models/fp8.py",
        "stages/models/compiling.py", "stages/models/attention.py", "stages/models/base_cache.py",
        "stages/core/images.py")


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def run_fields(p, device) -> dict:
    """The key fields shared by every base image of a sample run."""
    import diffusers
    import peft

    from stages.models import attention, compiling, flux, memory

    source = flux.resolve_base(p.model)
    folders = {sub: flux.local_folder(source, p.model.revision, sub) for sub in ("transformer", "vae", "scheduler")}
    files = {sub: stagecache.folder_identity(folder) for sub, folder in folders.items()}
    scheduler_config = json.loads((folders["scheduler"] / "scheduler_config.json").read_text())
    return {"version": VERSION, "base": p.model.base, "revision": p.model.revision,
            "quantization": p.model.quantization, "files": files,
            "scheduler": {k: v for k, v in dict(scheduler_config).items() if k != "_diffusers_version"},
            "steps": p.sample.steps, "guidance": p.sample.guidance,
            # compiled images differ from eager ones within a grey level ("auto" = on CUDA)
            "compile": compiling.enabled(p.sample.compile, torch.device(device)),
            "height": p.sample.resolution, "width": p.sample.resolution,
            # the attention kernel (cuDNN or flash: they agree within 0.3 %, not bit for bit) and the VAE batch
            "attention": attention.choose(p.model, device, memory.tokens(p.sample.resolution,
                                                                         p.train.max_sequence_length), backward=False),
            "vae_batch": memory.plan(p.model, device).vae_batch,
            "max_sequence_length": p.train.max_sequence_length,
            "dtype": str(default_dtype(torch.device(device))), "device": stagecache.device_class(device),
            "code": stagecache.code_identity(*CODE),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__}


def image_fields(common: dict, prompt: str, seed: int, batch: int, embeds: torch.Tensor,
                 pooled: torch.Tensor) -> dict:
    """One image's key fields: the run's plus its prompt (text and embeddings), seed and batch size."""
    return {**common, "prompt": prompt, "seed": seed, "batch": batch,
            "prompt_embeds_sha256": tensor_sha256(embeds), "pooled_sha256": tensor_sha256(pooled)}


def batches(n: int, batch_size: int) -> list[range]:
    """The job indices of each pipeline call of stages.models.render.denoise over ``n`` jobs."""
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def keys(common: dict, prompts: list[str], seeds: list[int], embeds: torch.Tensor, pooled: torch.Tensor,
         batch_size: int) -> list[tuple[str, dict]]:
    """(key, fields) of every job ``k`` (``prompts[k]``, ``seeds[k]``, embedding rows ``k``)."""
    out = []
    for chunk in batches(len(seeds), batch_size):
        for k in chunk:
            fields = image_fields(common, prompts[k], seeds[k], len(chunk), embeds[k], pooled[k])
            out.append((stagecache.digest(fields), fields))
    return out


def lookup(keyed: list[tuple[str, dict]], batch_size: int) -> tuple[dict[int, bytes], list[int]]:
    """(PNG bytes of the jobs read from the cache, the jobs to render): every job of a batch in
    which one image misses is rendered, so the batches are those of a cold run."""
    found, render = {}, []
    for chunk in batches(len(keyed), batch_size):
        got = {k: stagecache.get(KIND, keyed[k][0]) for k in chunk}
        if all(v is not None for v in got.values()):
            found.update(got)
        else:
            render += list(chunk)
    log.info("base images: %d from the cache (%s), %d to render", len(found), stagecache.root() / KIND, len(render))
    return found, render


def store(key: str, fields: dict, png: bytes) -> None:
    stagecache.put(KIND, key, fields, png)
