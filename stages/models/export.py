"""LoRA exports for other tools: kohya / ComfyUI keys, and back.

diffusers keys name the diffusers modules (``transformer_blocks.0.attn.to_q``); kohya's
sd-scripts and ComfyUI name the original BFL modules with ``lora_unet_`` and underscores
(``lora_unet_double_blocks_0_img_attn_qkv``), where q, k, v (and, in single blocks, the MLP input)
are one fused linear layer. A fused module gets a block-diagonal LoRA: ``lora_down`` stacks the
parts' A matrices, ``lora_up`` places each B on the diagonal (a part without adapter gets zero
rows), so it is exact and diffusers' own kohya reader splits it back without loss. ComfyUI
ignores alpha kept in metadata, so every module carries an ``.alpha`` tensor with
``alpha / rank`` equal to the diffusers scale (a fused module's rank is the sum of its parts').
Parts of one fused module with different ranks or scales (``lora.rank_map`` on ``to_q`` only, say)
are exported exactly too: each part is zero-padded to the group's largest rank and its scale is
folded into its ``lora_up`` (the module's alpha then equals its rank: scale 1), so ΔW is unchanged.
"""
from __future__ import annotations

import re

import torch

# diffusers suffix inside a block -> (kohya name, part index) ; fused parts share a kohya name
DOUBLE_MAP = {
    "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", 0),
    "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2), "attn.to_add_out": ("txt_attn_proj", 0),
    "ff.net.0.proj": ("img_mlp_0", 0), "ff.net.2": ("img_mlp_2", 0),
    "ff_context.net.0.proj": ("txt_mlp_0", 0), "ff_context.net.2": ("txt_mlp_2", 0),
    "norm1.linear": ("img_mod_lin", 0), "norm1_context.linear": ("txt_mod_lin", 0),
}
SINGLE_MAP = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3), "proj_out": ("linear2", 0), "norm.linear": ("modulation_lin", 0),
}
_KEY = re.compile(r"^(?:transformer\.)?(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def _groups(mapping: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for suffix, (name, part) in sorted(mapping.items(), key=lambda kv: kv[1][1]):
        out.setdefault(name, []).append(suffix)
    return out


def _part_dims(config: dict, kind: str, name: str) -> list[int]:
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    if kind == "single" and name == "linear1":
        return [inner, inner, inner, int(inner * config.get("mlp_ratio", 4.0))]
    return [inner] * 3


def to_kohya(state: dict[str, torch.Tensor], config: dict, alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """diffusers/peft LoRA tensors -> kohya tensors. ``alphas`` maps module names
    (``transformer_blocks.0.attn.to_q``) to alpha (default: its rank); ``config`` is the
    transformer's config (for the fused parts' widths)."""
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = _KEY.match(key)
        if not m:
            raise ValueError(f"not a Flux transformer LoRA key: {key}")
        mods.setdefault(f"{m[1]}.{m[2]}.{m[3]}", {})[m[4]] = t.float()
    out: dict[str, torch.Tensor] = {}
    for blocks, kind, mapping in (("transformer_blocks", "double", DOUBLE_MAP),
                                  ("single_transformer_blocks", "single", SINGLE_MAP)):
        prefix = "lora_unet_" + ("double_blocks" if kind == "double" else "single_blocks")
        indices = sorted({int(n.split(".")[1]) for n in mods if n.startswith(blocks + ".")})
        for i in indices:
            for kname, suffixes in _groups(mapping).items():
                parts = [mods.get(f"{blocks}.{i}.{s}") for s in suffixes]
                if not any(parts):
                    continue
                names = [f"{blocks}.{i}.{s}" for s in suffixes]
                scale = {n: alphas.get(n, p["A"].shape[0]) / p["A"].shape[0] for n, p in zip(names, parts) if p}
                if len(suffixes) == 1:
                    down, up, alpha = parts[0]["A"], parts[0]["B"], scale[names[0]] * parts[0]["A"].shape[0]
                else:
                    down, up, alpha = _fused(parts, names, scale, _part_dims(config, kind, kname))
                base = f"{prefix}_{i}_{kname}"
                out[base + ".lora_down.weight"] = down.contiguous()
                out[base + ".lora_up.weight"] = up.contiguous()
                out[base + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def _fused(parts: list, names: list[str], scale: dict[str, float], dims: list[int]):
    """A fused module's block-diagonal (down, up, alpha); a part without adapter gets zeros. With one
    rank and scale for every part, alpha keeps that scale; otherwise each part is padded to the
    largest rank and its scale folded into its up matrix (alpha = rank: scale 1)."""
    present = [p for p in parts if p]
    r = max(p["A"].shape[0] for p in present)
    uniform = all(p["A"].shape[0] == r for p in present) and max(scale.values()) - min(scale.values()) <= 1e-6
    down = torch.zeros(r * len(parts), present[0]["A"].shape[1])
    up = torch.zeros(sum(dims), r * len(parts))
    row = 0
    for j, (p, d, name) in enumerate(zip(parts, dims, names)):
        if p:
            k = p["A"].shape[0]
            down[j * r:j * r + k] = p["A"]
            up[row:row + d, j * r:j * r + k] = p["B"] if uniform else p["B"] * scale[name]
        row += d
    alpha = next(iter(scale.values())) * down.shape[0] if uniform else float(down.shape[0])
    return down, up, alpha


def from_kohya(state: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """kohya tensors -> (diffusers/peft LoRA tensors, alphas per module). Block-diagonal fused
    modules split back exactly; all-zero parts (no adapter there originally) are dropped."""
    out: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    pat = re.compile(r"^lora_unet_(double|single)_blocks_(\d+)_(.+)\.lora_down\.weight$")
    for key in state:
        m = pat.match(key)
        if not m:
            continue
        kind, i, kname = m[1], int(m[2]), m[3]
        base = key[: -len(".lora_down.weight")]
        down, up = state[key].float(), state[base + ".lora_up.weight"].float()
        alpha = float(state[base + ".alpha"]) if base + ".alpha" in state else float(down.shape[0])
        scale = alpha / down.shape[0]
        mapping = DOUBLE_MAP if kind == "double" else SINGLE_MAP
        blocks = "transformer_blocks" if kind == "double" else "single_transformer_blocks"
        suffixes = _groups(mapping)[kname]
        if len(suffixes) == 1:
            pieces = [(suffixes[0], down, up)]
        else:
            dims = _part_dims(config, kind, kname)
            n, ups = len(suffixes), torch.split(up, dims, dim=0)
            r = down.shape[0] // n
            block_diag = down.shape[0] % n == 0 and all(
                not ups[j][:, k * r:(k + 1) * r].any() for j in range(n) for k in range(n) if j != k)
            if block_diag:
                pieces = [(s, down[j * r:(j + 1) * r], ups[j][:, j * r:(j + 1) * r]) for j, s in enumerate(suffixes)]
            else:  # one shared down (as kohya trains fused layers): each part gets it whole
                pieces = [(s, down, ups[j]) for j, s in enumerate(suffixes)]
        for suffix, a, b in pieces:
            if not a.any() and not b.any():
                continue
            used = a.any(dim=1) | b.any(dim=0)  # drop the zero padding of a part with a smaller rank
            a, b = a[used], b[:, used]
            name = f"{blocks}.{i}.{suffix}"
            out[f"{name}.lora_A.weight"] = a.contiguous()
            out[f"{name}.lora_B.weight"] = b.contiguous()
            alphas[name] = scale * a.shape[0]
    return out, alphas
