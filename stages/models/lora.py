"""LoRA on the Flux transformer: which modules get adapters, with which rank, and saving them.

Targets are resolved to an explicit list of module names, so what gets an adapter is exactly
what the params say:

- ``lora.targets`` picks the kinds of layers in every selected block:
  ``attention`` = the image stream's attention projections (double blocks: to_q/k/v/out.0,
  single blocks: to_q/k/v) — the usual style LoRA, 18.7M parameters at rank 16 on FLUX.1-dev;
  ``attention+ff`` adds the text stream's attention projections and every feed-forward
  (single blocks: proj_mlp, proj_out); ``all`` adds the modulation (AdaLN) linears.
  (The text-stream projections are in the second tier because with an nf4 base they cost ~35%
  more step time for little style gain: 0.68 -> 0.91 s/step at 1024² on an H100, reports/bench.)
- ``lora.double_blocks`` / ``lora.single_blocks`` select blocks by index (None = all, [] = none),
  the block-wise LoRA used to steer style while preserving the base's content;
- ``lora.rank_map`` gives some modules another rank: ``{pattern: rank}`` where a pattern is a
  module-name prefix (``single_transformer_blocks.3``, ``transformer_blocks.0.attn``) or a full
  regular expression; the first matching pattern wins. It becomes peft's ``rank_pattern``.
  ``lora.alpha`` None keeps alpha = rank everywhere (scale 1, what ComfyUI assumes);
  a number keeps that alpha for every module (kohya convention).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

# module-name suffixes inside one block, per preset part
DOUBLE = {
    "attention": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"],
    "ff": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
    "mod": ["norm1.linear", "norm1_context.linear"],
}
SINGLE = {
    "attention": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "ff": ["proj_mlp", "proj_out"],
    "mod": ["norm.linear"],
}
PRESETS = {"attention": ["attention"], "attention+ff": ["attention", "ff"], "all": ["attention", "ff", "mod"]}


def _select(which: Optional[list[int]], count: int, key: str) -> list[int]:
    if which is None:
        return list(range(count))
    bad = [i for i in which if not 0 <= i < count]
    if bad:
        raise ValueError(f"{key}={which}: block indices {bad} out of range (the model has {count}: 0..{count - 1})")
    return sorted(set(which))


def target_modules(transformer, lora_params) -> list[str]:
    """Full names of the linear layers that get an adapter, in model order."""
    modules = dict(transformer.named_modules())
    parts = PRESETS[lora_params.targets]
    cfg = transformer.config
    names = []
    for i in _select(lora_params.double_blocks, cfg.num_layers, "lora.double_blocks"):
        names += [f"transformer_blocks.{i}.{s}" for p in parts for s in DOUBLE[p]]
    for i in _select(lora_params.single_blocks, cfg.num_single_layers, "lora.single_blocks"):
        names += [f"single_transformer_blocks.{i}.{s}" for p in parts for s in SINGLE[p]]
    missing = [n for n in names if not isinstance(modules.get(n), torch.nn.Linear)]
    if missing:
        raise ValueError(f"LoRA targets not found as linear layers in the transformer: {missing[:5]}")
    if not names:
        raise ValueError("no LoRA targets: lora.double_blocks and lora.single_blocks select no block")
    order = {n: k for k, n in enumerate(modules)}
    return sorted(names, key=order.__getitem__)


def rank_of(name: str, lora_params) -> int:
    for pattern, rank in lora_params.rank_map.items():
        if name == pattern or name.startswith(pattern + ".") or re.fullmatch(pattern, name):
            return rank
    return lora_params.rank


def lora_config(transformer, lora_params):
    """The peft LoraConfig for these params (explicit targets, per-module rank/alpha patterns)."""
    from peft import LoraConfig

    names = target_modules(transformer, lora_params)
    ranks = {n: rank_of(n, lora_params) for n in names}
    unused = [p for p in lora_params.rank_map
              if not any(n == p or n.startswith(p + ".") or re.fullmatch(p, n) for n in names)]
    if unused:
        raise ValueError(f"lora.rank_map patterns {unused} match no targeted module "
                         f"(targets look like {names[0]!r})")
    rank_pattern = {n: r for n, r in ranks.items() if r != lora_params.rank}
    alpha = lora_params.alpha if lora_params.alpha is not None else lora_params.rank
    alpha_pattern = {} if lora_params.alpha is not None else {n: float(r) for n, r in rank_pattern.items()}
    return LoraConfig(r=lora_params.rank, lora_alpha=alpha, lora_dropout=lora_params.dropout,
                      init_lora_weights="gaussian", target_modules=names,
                      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def add_lora(transformer, lora_params, dtype: torch.dtype = torch.float32):
    """Freeze the base, add the adapter, keep the trainable LoRA weights in ``dtype`` (fp32).
    Returns the list of trainable parameters."""
    transformer.requires_grad_(False)
    config = lora_config(transformer, lora_params)
    transformer.add_adapter(config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.to(dtype)
    return params


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The adapter's tensors with peft/diffusers keys (``transformer_blocks.0.attn.to_q.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in get_peft_model_state_dict(transformer).items()}


def set_lora_state_dict(transformer, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(transformer, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA state does not fit the adapter: unexpected keys {unexpected[:3]}")


def adapter_config(transformer) -> dict:
    """The adapter's LoraConfig as a JSON-able dict (what diffusers reads back from metadata)."""
    cfg = transformer.peft_config["default"].to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"])
    return {k: v for k, v in cfg.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}


def scales(transformer) -> dict[str, float]:
    """Each adapted module's ``alpha / rank`` as peft applies it (``cfg["target_modules"]`` may be
    peft's shortened suffix list, so the modules themselves are asked)."""
    return {n: float(m.scaling["default"]) for n, m in transformer.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "scaling", {})}


def module_alphas(transformer) -> dict[str, float]:
    """Each adapted module's alpha (scale x rank), as the kohya export wants it."""
    ranks = {n: m.r["default"] for n, m in transformer.named_modules() if hasattr(m, "lora_A") and "default" in m.r}
    return {n: s * ranks[n] for n, s in scales(transformer).items()}


def fold_alpha(state: dict[str, torch.Tensor], scale: dict[str, float], cfg: dict) -> tuple[dict, dict]:
    """(state, config) with every module's ``alpha / rank`` multiplied into its ``lora_B`` and alpha
    set to the rank: the same ΔW at scale 1. ComfyUI (and any reader that ignores the metadata)
    loads a diffusers-format file at scale 1, so unfolded, a file with alpha != rank would be off
    by alpha/rank there (twice as strong with alpha 8, rank 16)."""
    out = {}
    for key, t in state.items():
        s = scale[key.rsplit(".lora_", 1)[0]]
        out[key] = t * s if ".lora_B." in key and s != 1.0 else t
    ranks = cfg.get("rank_pattern") or {}
    return out, {**cfg, "lora_alpha": cfg["r"], "alpha_pattern": {n: float(r) for n, r in ranks.items()}}


def save_diffusers(transformer, out_dir) -> None:
    """``pytorch_lora_weights.safetensors`` with diffusers keys and the LoraConfig in its metadata,
    so ``FluxPipeline.load_lora_weights`` restores rank patterns exactly. alpha is folded into the
    weights (:func:`fold_alpha`): the file means the same at scale 1 in diffusers and ComfyUI. diffusers also writes
    ``format: pt``; that second metadata key is dropped so the bytes are the same on every save
    (stages/core/tensorfiles.py)."""
    from diffusers import FluxPipeline
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    from stages.core import tensorfiles
    from stages.core.io import umask_mode

    state, cfg = fold_alpha(lora_state_dict(transformer), scales(transformer), adapter_config(transformer))
    FluxPipeline.save_lora_weights(out_dir, transformer_lora_layers=state,
                                   transformer_lora_adapter_metadata=cfg, safe_serialization=True)
    tensorfiles.keep_one_key(Path(out_dir) / "pytorch_lora_weights.safetensors", LORA_ADAPTER_METADATA_KEY)
    umask_mode(Path(out_dir) / "pytorch_lora_weights.safetensors")  # diffusers' safetensors file is 0600
