"""Flux base models: resolve ``model.base``, build the tiny random pipeline, load by id or path.

``model.base`` is one of
- ``tiny-random``: a tiny FluxPipeline built from configs (random weights, offline tokenizers),
  saved once to ``.cache/tiny-random-flux-v<N>`` and then loaded by path like any other folder;
- a local diffusers folder (``model_index.json`` inside);
- a Hugging Face hub id such as ``black-forest-labs/FLUX.1-dev`` (with ``model.revision``).

All three go through ``FluxPipeline.from_pretrained`` / ``FluxTransformer2DModel.from_pretrained``:
the smoke profile exercises the same loading code as the real run. The HF token comes from the
environment (``HF_TOKEN``) or the login cache (``hf auth login``); it is never read from params
and never logged. Failures that users hit most (gated model without token, no network, not enough
memory) are checked before any weight is read and raise :class:`ModelLoadError` with a message
that says what is missing.
"""
from __future__ import annotations

import logging
import os
import re
import string
from pathlib import Path
from typing import Optional

import torch

from stages.core import hub
from stages.core.device import default_device, default_dtype
from stages.core.io import atomic_dir

log = logging.getLogger(__name__)

TINY = "tiny-random"
TINY_VERSION = 1  # bump when the tiny architecture changes: a new cache folder is built
TINY_BLOCKS = (2, 2)     # (double, single) transformer blocks of tiny-random
FLUX_BLOCKS = (19, 38)   # FLUX.1-dev / FLUX.1-schnell
ROOT = Path(__file__).resolve().parents[2]
T5_BLOCKS = ("encoder.block",)


class ModelLoadError(SystemExit):
    """A clear, early failure to load the base model (exits the stage with the message)."""


# ----------------------------------------------------------------------------- tiny-random
def _tiny_tokenizers():
    """CLIP (BPE) and T5 (Unigram) tokenizers built from a fixed character vocabulary."""
    from transformers import CLIPTokenizer, T5Tokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,;:!?'-()")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in chars] + [("▁" + c, -1.5) for c in chars]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    return clip, t5


def build_tiny_random(path: os.PathLike | str, seed: int = 0) -> Path:
    """Build the tiny random FluxPipeline (same weights for the same seed) and save it to ``path``.

    Shapes follow FLUX.1-dev's wiring: guidance embeds, 2x2 packing (transformer in_channels =
    4 x VAE latent channels), joint_attention_dim = T5 hidden, pooled_projection_dim = CLIP
    hidden, sum(axes_dims_rope) = attention head dim, VAE downsampling x8.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, t5_tok = _tiny_tokenizers()
    hidden = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=TINY_BLOCKS[0], num_single_layers=TINY_BLOCKS[1],
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=hidden, pooled_projection_dim=hidden,
            guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 16, 16),
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=1, norm_num_groups=8, sample_size=64, shift_factor=0.0609,
            scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)
        torch.manual_seed(seed + 2)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id))
        torch.manual_seed(seed + 3)
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=hidden, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=t5_tok.pad_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def tiny_random_path() -> Path:
    cache = Path(os.environ.get("FLUXIMP_CACHE", ROOT / ".cache"))
    return cache / f"tiny-random-flux-v{TINY_VERSION}"


def resolve_base(model_params) -> str:
    """``model.base`` -> what ``from_pretrained`` takes: a local folder path or a hub id.
    ``tiny-random`` is built once into the cache folder (atomically) and reused."""
    base = model_params.base
    if base == TINY:
        path = tiny_random_path()
        if not (path / "model_index.json").exists():
            log.info("building the tiny random Flux pipeline into %s", path)
            with atomic_dir(path) as tmp:
                build_tiny_random(tmp)
        return str(path)
    local = Path(base).expanduser()
    if local.exists():
        if not (local / "model_index.json").exists() and not (local / "config.json").exists():
            raise ModelLoadError(f"model.base={base!r} is a folder but holds no diffusers model "
                                 "(no model_index.json): point it at a FluxPipeline.save_pretrained folder")
        return str(local.resolve())
    if base.startswith((".", "/", "~")):
        raise ModelLoadError(f"model.base={base!r}: no such folder")
    return base


def block_counts(model_params) -> Optional[tuple[int, int]]:
    """(double, single) transformer blocks of ``model.base`` without loading it: known for tiny-random
    and FLUX.1, else read from transformer/config.json (local folder or the Hugging Face cache);
    None when that is not at hand."""
    import json

    base = model_params.base
    if base == TINY:
        return TINY_BLOCKS
    if base.startswith("black-forest-labs/FLUX.1-"):
        return FLUX_BLOCKS
    from huggingface_hub import try_to_load_from_cache

    config: Optional[Path] = Path(base).expanduser() / "transformer" / "config.json"
    try:
        if not config.is_file():
            found = try_to_load_from_cache(base, "transformer/config.json", revision=model_params.revision)
            config = Path(found) if isinstance(found, str) else None
        cfg = json.loads(config.read_text()) if config else {}
        return int(cfg["num_layers"]), int(cfg["num_single_layers"])
    except Exception:  # noqa: BLE001 - not a hub id, not cached, a broken config: the loader will say
        return None


# ----------------------------------------------------------------------------- checks
def check_access(repo: str, revision: Optional[str]) -> None:
    """Fail early and clearly when a hub model cannot be read (gated, offline, unknown)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    cached = try_to_load_from_cache(repo, "model_index.json", revision=revision)
    if isinstance(cached, str):
        return  # in the local HF cache: from_pretrained can read it offline
    what = f"{repo}" + (f"@{revision}" if revision else "")
    if hub.offline():
        raise ModelLoadError(
            f"model.base={what} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
            f"download it first (`hf download {repo}`) or point model.base at a local folder")
    try:
        hf_hub_download(repo, "model_index.json", revision=revision)
    except GatedRepoError:
        raise ModelLoadError(
            f"{repo} is gated: accept its licence on huggingface.co and provide a token "
            "(HF_TOKEN environment variable or `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"model.base={repo!r}: no such model on the hub (or it is private "
                             "and no token was found: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"model.revision={revision!r} does not exist for {repo}") from None
    except Exception as err:  # connection errors come in several types
        raise ModelLoadError(f"cannot reach the Hugging Face hub for {what} ({type(err).__name__}): "
                             "no network? Download the model beforehand or set model.base to a local "
                             "folder") from None


def component_bytes(source: str, revision: Optional[str], components: list[str]) -> dict[str, int]:
    """Bytes of each component's weight files (local folder or hub metadata), without loading."""
    sizes: dict[str, int] = {}
    local = Path(source)
    if local.exists():
        for comp in components:
            files = list((local / comp).glob("*.safetensors")) + list((local / comp).glob("*.bin"))
            sizes[comp] = sum(f.stat().st_size for f in files)
        return sizes
    from huggingface_hub import HfApi

    info = HfApi().model_info(source, revision=revision, files_metadata=True)
    for comp in components:
        sizes[comp] = sum(s.size or 0 for s in info.siblings
                          if s.rfilename.startswith(comp + "/") and s.rfilename.endswith((".safetensors", ".bin")))
    return sizes


def available_bytes(device: torch.device) -> int:
    from stages.models.memory import host_available

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return host_available()


def check_memory(source: str, revision: Optional[str], components: list[str], quantization: str,
                 device: torch.device, dtype: torch.dtype, margin: float = 1.15,
                 text_quantization: str = "none") -> int:
    """Estimate the bytes the chosen components need on ``device``; fail before loading if the
    device has less free memory. Returns the estimate."""
    from stages.models.memory import QUANT_FACTOR

    sizes = component_bytes(source, revision, components)
    scale = torch.finfo(dtype).bits / 16  # checkpoints are stored in bf16
    need = 0
    for comp, size in sizes.items():
        mode = quantization if comp == "transformer" else text_quantization if comp == "text_encoder_2" else "none"
        need += int(size * (QUANT_FACTOR[mode] if mode != "none" else scale))
    need = int(need * margin)
    free = available_bytes(device)
    if need > free:
        gib = 2 ** 30
        hint = "" if quantization == "nf4" else " Try model.quantization=nf4 (about 7 GiB for FLUX.1-dev)."
        raise ModelLoadError(
            f"not enough {device.type.upper()} memory for {', '.join(components)} of {source} with "
            f"quantization={quantization}: need about {need / gib:.1f} GiB, {free / gib:.1f} GiB free.{hint}")
    return need


# ----------------------------------------------------------------------------- loading
def setup_backends() -> None:
    """Known-good backend settings (the cuDNN SDPA backward crashed for Flux shapes on an H100 with torch 2.11)."""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.matmul.allow_tf32 = True


def _prepare(model_params, device, dtype, components, text_quantization: str = "none"):
    from stages.models import memory

    setup_backends()
    source = resolve_base(model_params)
    if not Path(source).exists():
        check_access(source, model_params.revision)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    memory.configure_allocator(device)
    check_memory(source, model_params.revision, components, memory.quantization(model_params, device), device,
                 dtype, text_quantization=text_quantization)
    return source, device, dtype


def local_folder(source: str, revision: Optional[str], subfolder: str) -> Path:
    """The folder holding ``subfolder``'s files: inside a local base, or its hub snapshot
    (downloaded once into the Hugging Face cache, read from there offline)."""
    if Path(source).exists():
        return Path(source) / subfolder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, revision=revision, allow_patterns=[f"{subfolder}/*"])) / subfolder


def _cache_name(source: str, subfolder: str) -> str:
    return (re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("_")[-80:] or "model") + "-" + subfolder


def load_transformer(model_params, *, device=None, dtype=None):
    """Only the transformer (what training and sampling need once embeddings exist), its blocks
    quantized per ``model.quantization`` while loading (stages.models.streaming: never the whole
    bf16 model on the host); nf4 blocks come from the quantize-once cache after the first run
    (stages.models.quant_cache). Frozen, on ``device``."""
    from diffusers import FluxTransformer2DModel

    from stages.models import memory, quant, quant_cache

    source, device, dtype = _prepare(model_params, device, dtype, ["transformer"])
    mode = memory.quantization(model_params, device)
    log.info("loading transformer from %s (revision %s, quantization %s)", source, model_params.revision, mode)
    folder = local_folder(source, model_params.revision, "transformer")
    return quant_cache.load(FluxTransformer2DModel, folder, _cache_name(source, "transformer"),
                            mode=mode, device=device, dtype=dtype,
                            block_lists=quant.BLOCK_LISTS)


def load_text_encoders(model_params, *, device=None, dtype=None, text_quantization: str = "none"):
    """A FluxPipeline holding only the tokenizers and text encoders (CLIP, T5), for
    ``encode_prompt``. ``text_quantization="nf4"`` quantizes T5's blocks while loading (small
    cards, stages.models.memory); nf4 T5 blocks are cached like the transformer's."""
    from diffusers import FluxPipeline
    from transformers import T5EncoderModel

    from stages.models import quant_cache

    source, device, dtype = _prepare(model_params, device, dtype, ["text_encoder", "text_encoder_2"],
                                     text_quantization=text_quantization)
    log.info("loading text encoders from %s (revision %s, T5 %s)", source, model_params.revision,
             text_quantization)
    folder = local_folder(source, model_params.revision, "text_encoder_2")
    t5 = quant_cache.load(T5EncoderModel, folder, _cache_name(source, "text_encoder_2"), mode=text_quantization,
                          device=device, dtype=dtype, block_lists=T5_BLOCKS)
    pipe = FluxPipeline.from_pretrained(source, revision=model_params.revision, dtype=dtype, transformer=None,
                                        vae=None, text_encoder_2=t5)
    return pipe.to(device)


def load_vae(model_params, *, device=None, dtype=None):
    from diffusers import AutoencoderKL

    source, device, dtype = _prepare(model_params, device, dtype, ["vae"])
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", revision=model_params.revision, dtype=dtype)
    return vae.requires_grad_(False).eval().to(device)


def load_pipeline(model_params, *, device=None, dtype=None, lora: Optional[str] = None):
    """The whole FluxPipeline (text encoders, VAE, transformer) on ``device``, for interactive use
    (the app, notebooks) on cards that hold it all; the stages load one model at a time instead.
    The transformer comes from :func:`load_transformer` (quantized while loading)."""
    from diffusers import FluxPipeline

    transformer = load_transformer(model_params, device=device, dtype=dtype)
    source, device, dtype = _prepare(model_params, device, dtype, ["text_encoder", "text_encoder_2", "vae"])
    log.info("loading FluxPipeline from %s (revision %s, %s, %s)", source, model_params.revision, device, dtype)
    pipe = FluxPipeline.from_pretrained(source, revision=model_params.revision, dtype=dtype,
                                        transformer=transformer)
    pipe.to(device)
    if lora:
        pipe.load_lora_weights(lora)
    return pipe


def preflight(stage: str, p, device, plan, check: bool = True):
    """Estimate ``stage``'s peak GPU memory and host RAM from the base's file sizes and stop
    before loading anything when they do not fit (the message names ``model.vram_gb``). Returns the
    estimate (``None`` when the sizes cannot be read); ``check=False`` only estimates (the other
    processes of a multi-GPU run)."""
    import json

    from stages.models import memory

    source = resolve_base(p.model)
    comps = ["transformer", "text_encoder", "text_encoder_2", "vae"]
    try:
        sizes = component_bytes(source, p.model.revision, comps)
    except Exception as err:  # no network for the hub's file list: the loaders check again
        log.debug("memory preflight skipped: %s", err)
        return None
    config = Path(source) / "transformer" / "config.json"
    cfg = json.loads(config.read_text()) if config.exists() else {}
    hidden = cfg.get("num_attention_heads", 24) * cfg.get("attention_head_dim", 128)
    blocks = cfg.get("num_layers", 19) + cfg.get("num_single_layers", 38)
    need = memory.estimate(stage, sizes, hidden, blocks, memory.resolve(p, device), plan)
    if check:
        log.info("%s needs about %.1f GiB of GPU memory and %.1f GiB of host RAM (%s)", stage,
                 need.vram / memory.GIB, need.host / memory.GIB, plan.describe())
        memory.check(need, stage, plan, torch.device(device))
    return need
