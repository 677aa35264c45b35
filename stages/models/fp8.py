"""fp8 compute for a frozen base (``model.quantization: fp8``): e4m3 weights, fp8 tensor cores.

A LoRA trains only its adapter, so the base's linear layers need two matrix products per step —
the forward (run again when a checkpointed block is recomputed) and the gradient of the input —
and never a weight gradient. :class:`Fp8Linear` keeps each weight once as ``float8_e4m3fn`` with
one float32 scale per output row (quantized when the base is loaded, stored in the quantize-once
cache) and does both products on the fp8 tensor cores (``torch._scaled_mm``, compute capability
>= 8.9: Ada, Hopper, Blackwell):

- forward: ``y = x W^T``: ``x`` is scaled per row to e4m3 (``amax / 448``), the product runs with
  the row scales of ``x`` and ``W`` and comes out in bf16 (the input's dtype, or autocast's, as for
  ``nn.Linear``);
- backward: ``dx = dy W = (dy * s_W) W_q``: the weight's row scales move onto ``dy``'s columns,
  ``dy`` is scaled per row to e4m3, and ``W_q`` is read transposed (a copy of one layer at a time).

Off-the-shelf float8 *training* (torchao's ``convert_to_float8_training``) casts the bf16 weights
every step and computes the weight gradient of the frozen base: measured no faster than bf16 on
an H200 (ANCHORS.md). torchao's fp8 weight-only mode dequantizes to bf16 and gains nothing either.

Products with fewer than :data:`MIN_ROWS` rows (the modulation layers see one row per image) and
machines without ``_scaled_mm`` (the CPU) dequantize the weight and multiply in the input's dtype:
the same function, so the tests check the scaling maths on the CPU against a float reference.
"""
from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
MIN_ROWS = 16  # fewer rows: dequantize (the fp8 kernels need 16-aligned shapes and gain nothing there)


def quantize_rows(x: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (rows, cols) as e4m3 with one float32 scale per row: ``x ≈ q * scale``. Each row's
    largest magnitude maps to 448, e4m3's largest finite value, so nothing saturates."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=eps)
    scale = amax / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).contiguous()  # row-major for _scaled_mm
    return q, scale


def fp8_kernels(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` runs on ``device``: CUDA with compute capability >= 8.9."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """``(a * sa) @ (b * sb)`` for e4m3 ``a`` (M, K) with row scales ``sa`` (M, 1) and e4m3 ``b``
    (K, N) with column scales ``sb`` (1, N): on the fp8 tensor cores where they exist, else
    emulated in float32 (same maths, for the CPU and the tests)."""
    if a.is_cuda:  # (callers only pass fp8 operands on the GPU where the kernels exist)
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    return ((a.float() * sa) @ (b.float() * sb)).to(out_dtype)


class _Fp8Matmul(torch.autograd.Function):
    """``x W^T`` with fp8 products forward and backward, no gradient for the frozen ``W``."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)  # parameters and a tiny buffer: never offloaded
        ctx.in_dtype = x2.dtype
        xq, sx = quantize_rows(x2)
        return scaled_mm(xq, sx, weight.t(), scale.view(1, -1), out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scale = ctx.saved_tensors
        gq, sg = quantize_rows(grad.float() * scale.view(1, -1))  # (M, N): W's row scales on dy's columns
        w_t = weight.t().contiguous().t()  # (N, K) column-major, as the second operand must be
        ones = torch.ones(1, weight.shape[1], device=weight.device, dtype=torch.float32)
        return scaled_mm(gq, sg, w_t, ones, ctx.in_dtype), None, None, None


class Fp8Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is e4m3 with a float32 scale per output row.

    ``compute_dtype`` is the dtype of inputs and outputs (bf16); peft reads it to keep a LoRA added
    on top in that dtype rather than in the weight's (as for bitsandbytes' ``Linear4bit``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=E4M3, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
                     if bias else None)
        self.kernels = False  # fp8 tensor cores where the weight lives (set by use_device: no check per call)

    def use_device(self, device: torch.device) -> "Fp8Linear":
        self.kernels = fp8_kernels(torch.device(device))
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype) -> "Fp8Linear":
        """Quantize ``linear``'s weight per output row where it lives (no copy in another dtype kept)."""
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                compute_dtype=compute_dtype)
        data, scale = quantize_rows(w)
        q.weight = nn.Parameter(data, requires_grad=False)
        q.weight_scale = scale.view(-1)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
        return q.use_device(w.device)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale.view(-1, 1)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else self.compute_dtype
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] < MIN_ROWS or not self.kernels:
            y = nn.functional.linear(x2.to(dtype), self.dequantized(dtype))
        else:  # under autocast the product comes out in autocast's dtype, as nn.Linear's does (not float32
            # because a LayerNorm before it ran in float32): half the bytes for what follows and is saved
            kind = x.device.type
            out = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else dtype
            y = _Fp8Matmul.apply(x2.to(dtype), self.weight, self.weight_scale, out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 per-row scales"


def swap_linears(module: nn.Module, compute_dtype: torch.dtype, empty: bool = False) -> int:
    """Replace every ``nn.Linear`` below ``module`` by an :class:`Fp8Linear` (quantized from its
    weight, or an empty meta shell with ``empty=True`` for loading a saved state); returns the count."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, Fp8Linear) or name.startswith("lora_"):  # a LoRA's own layers stay trainable
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, Fp8Linear(child.in_features, child.out_features, child.bias is not None,
                                            device="meta", compute_dtype=compute_dtype)
                    if empty else Fp8Linear.from_linear(child, compute_dtype))
            count += 1
        else:
            count += swap_linears(child, compute_dtype, empty)
    return count


def use_device(module: nn.Module, device: torch.device) -> None:
    """After loading saved fp8 blocks onto ``device``: let their layers use its fp8 kernels."""
    for m in module.modules():
        if isinstance(m, Fp8Linear):
            m.use_device(device)
