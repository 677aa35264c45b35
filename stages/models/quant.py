"""Quantized Flux bases for LoRA training (``model.quantization``: none | nf4 | int8 | fp8).

- ``nf4``: every linear layer of the double/single blocks becomes a bitsandbytes ``Linear4bit``
  (NF4 weights, compute in the model's dtype: bf16 on GPU) — QLoRA. This is a module swap
  rather than diffusers' ``BitsAndBytesConfig``, which refuses to run without a GPU: the same code
  runs the tiny model on CPU in the tests and FLUX.1-dev on a GPU.
- ``int8``: torchao int8 weight-only (bitsandbytes' LLM.int8 trains ~2.4x slower: docs/training.md).
- ``fp8``: e4m3 weights with per-row scales, the forward and grad-input products on the fp8 tensor
  cores (stages.models.fp8); needs a GPU with FP8 (compute capability >= 8.9).
- ``auto`` is resolved before loading to one of these per card class and GPU (stages.models.memory).

Embedders, the final norm and projection stay in full precision (they are small and sensitive).
The blocks are quantized one at a time on the target device, so peak memory stays near the
quantized size plus one block.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from stages.models import fp8

log = logging.getLogger(__name__)
MODES = ("none", "nf4", "int8", "fp8")
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


class QuantizationError(SystemExit):
    """A quantization mode that cannot run here (clear message, clean exit)."""


def check_supported(mode: str, device: torch.device) -> None:
    if mode not in MODES:
        raise QuantizationError(f"model.quantization={mode!r}: allowed {MODES}")
    if mode == "fp8":
        if device.type != "cuda" or not torch.cuda.is_available():
            raise QuantizationError("model.quantization=fp8 needs a CUDA GPU with FP8 support "
                                    "(compute capability >= 8.9: Ada, Hopper); use nf4 or int8 here")
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise QuantizationError(f"model.quantization=fp8 needs compute capability >= 8.9; "
                                    f"this GPU has {cap[0]}.{cap[1]}: use nf4 or int8")
    if mode == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise QuantizationError(f"model.quantization=nf4 needs bitsandbytes ({err})") from None
    if mode == "int8":
        try:
            import torchao  # noqa: F401
        except ImportError as err:
            raise QuantizationError(f"model.quantization={mode} needs torchao ({err})") from None


def _nf4_linear(child: nn.Linear, compute_dtype: torch.dtype):
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                          compute_dtype=compute_dtype, quant_type="nf4", device="meta")
    if child.in_features % 64:  # bitsandbytes' CPU inference repacking needs whole 64-wide blocks
        q.support_avx512bf16_for_cpu = False
    return q


def _swap_nf4(module: nn.Module, device: torch.device, compute_dtype: torch.dtype) -> int:
    import bitsandbytes as bnb

    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and not isinstance(child, bnb.nn.Linear4bit):
            q = _nf4_linear(child, compute_dtype)
            weight = child.weight.data.to(dtype=compute_dtype)  # quantized on its way to ``device``
            q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4").to(device)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.to(device, compute_dtype), requires_grad=False)
            setattr(module, name, q)
            count += 1
        else:
            count += _swap_nf4(child, device, compute_dtype)
    return count


def empty_nf4(module: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` below ``module`` by an empty (meta) nf4 ``Linear4bit``: the shell
    that a saved quantized state (stages.models.quant_cache) is loaded into."""
    import bitsandbytes as bnb

    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and not isinstance(child, bnb.nn.Linear4bit):
            setattr(module, name, _nf4_linear(child, compute_dtype))
            count += 1
        else:
            count += empty_nf4(child, compute_dtype)
    return count


def empty_linears(module: nn.Module, mode: str, compute_dtype: torch.dtype) -> int:
    """Empty (meta) quantized shells for every linear below ``module``: what a saved quantized
    state (stages.models.quant_cache) is loaded into."""
    if mode == "fp8":
        return fp8.swap_linears(module, compute_dtype, empty=True)
    return empty_nf4(module, compute_dtype)


def compute_dtype(model: nn.Module) -> torch.dtype:
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16


def quantize_block(block: nn.Module, mode: str, device: torch.device, compute: torch.dtype) -> int:
    """Quantize one block's linear layers per ``mode`` and move the block to ``device``; returns how
    many layers were quantized. Peak memory: the quantized model so far plus this one block."""
    if mode == "nf4":
        count = _swap_nf4(block, device, compute)
        block.to(device)
    elif mode == "fp8":
        block.to(device)
        count = fp8.swap_linears(block, compute)
    else:
        import torchao.quantization as tq

        block.to(device)
        tq.quantize_(block, tq.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
        count = sum(isinstance(m, nn.Linear) for m in block.modules())
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return count


def blocks(model: nn.Module, block_lists=BLOCK_LISTS) -> list[nn.Module]:
    """The repeated blocks whose linears are quantized (``a.b`` paths name nested lists)."""
    out = []
    for path in block_lists:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        out += list(obj or [])
    return out


def quantize(model: nn.Module, mode: str, device=None, block_lists=BLOCK_LISTS) -> nn.Module:
    """Quantize the model's blocks in place per ``mode`` and move them to ``device`` (the model's
    current device by default). The rest of the model is left where it is."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    check_supported(mode, device)
    if mode == "none":
        return model
    compute = compute_dtype(model)
    count = sum(quantize_block(b, mode, device, compute) for b in blocks(model, block_lists))
    model.requires_grad_(False)
    log.info("quantized %d linear layers to %s on %s", count, mode, device)
    return model


def quantized_linears(model: nn.Module) -> int:
    """How many linear layers hold quantized weights (for tests and logs)."""
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, fp8.Fp8Linear) or type(m).__name__ == "Linear4bit" or (w is not None and type(w).__name__ not in ("Parameter", "Tensor", "Params4bit")):
            n += 1
    return n
