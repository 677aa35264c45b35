"""fp8 compute for a frozen base (stages/models/fp8.py) on the CPU: the scaling maths against a float
reference (``_scaled_mm`` has no CPU kernel: the same maths runs emulated), the autograd rule (input
gradient only), the quantize-once cache round trip and LoRA training on an fp8 tiny base."""
import pytest
import torch
from torch import nn

from stages.models import fp8, quant, quant_cache


def test_rows_scale_to_e4m3_without_saturating():
    x = torch.randn(64, 96, dtype=torch.float64) * torch.logspace(-3, 3, 64, dtype=torch.float64)[:, None]
    q, s = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 1) and s.dtype == torch.float32
    assert q.is_contiguous()
    # each row's largest magnitude maps to e4m3's largest finite value: nothing clips, nothing is inf
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((64,), fp8.E4M3_MAX))
    back = q.double() * s.double()
    rel = (back - x).abs() / x.abs().amax(dim=1, keepdim=True)
    assert rel.max() <= 2 ** -4 + 1e-6  # 3 mantissa bits: half an ulp at the row's scale at most
    assert torch.isfinite(back).all()


def test_zero_rows_stay_zero():
    q, s = fp8.quantize_rows(torch.zeros(3, 32))
    assert torch.equal(q.float(), torch.zeros(3, 32)) and torch.all(s > 0)


def test_scaled_matmul_matches_a_float_reference():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(48, 64, generator=g), torch.randn(64, 32, generator=g)
    aq, sa = fp8.quantize_rows(a)
    bq, sb = fp8.quantize_rows(b.t())  # column scales of b = row scales of b^T
    out = fp8.scaled_mm(aq, sa, bq.t(), sb.view(1, -1), torch.float32)
    ref = (aq.double() * sa.double()) @ (bq.double() * sb.double()).t()  # the dequantized product
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    exact = a.double() @ b.double()
    assert float((out.double() - exact).norm() / exact.norm()) < 0.06  # e4m3 on both sides


def test_fp8_linear_forward_and_input_gradient_against_float64():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).double()
    q = fp8.Fp8Linear.from_linear(lin.float(), torch.float32)
    assert q.weight.dtype == torch.float8_e4m3fn and not q.weight.requires_grad and q.weight_scale.shape == (48,)
    w = q.dequantized(torch.float64)
    assert float((w - lin.weight.double()).norm() / lin.weight.double().norm()) < 0.05
    x = torch.randn(2, 20, 64, requires_grad=True)  # 40 rows: the fp8 path's row count
    y = q(x)
    assert y.shape == (2, 20, 48)
    ref = x.detach().double() @ w.t() + q.bias.double()
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-5  # CPU: dequantized weight, exact input
    y.square().sum().backward()
    xr = x.detach().double().requires_grad_()
    (xr @ w.t() + q.bias.double()).square().sum().backward()
    assert float((x.grad.double() - xr.grad).norm() / xr.grad.norm()) < 1e-5


def test_autograd_rule_quantizes_both_products_and_gives_no_weight_gradient():
    """The custom backward (what the GPU runs) on the emulated kernel: dx = (dy * s_W) W_q with dy
    scaled per row to e4m3; close to the float gradient, and the frozen weight gets none."""
    torch.manual_seed(1)
    lin = fp8.Fp8Linear.from_linear(nn.Linear(64, 32), torch.float32)
    x = torch.randn(40, 64, requires_grad=True)
    y = fp8._Fp8Matmul.apply(x, lin.weight, lin.weight_scale, torch.float32)
    w = lin.dequantized(torch.float64)
    ref_y = x.detach().double() @ w.t()
    assert 1e-4 < float((y.double() - ref_y).norm() / ref_y.norm()) < 0.06  # the input is quantized too
    dy = torch.randn(40, 32)
    y.backward(dy)
    ref_dx = dy.double() @ w
    assert 1e-4 < float((x.grad.double() - ref_dx).norm() / ref_dx.norm()) < 0.06
    assert lin.weight.grad is None


def test_under_autocast_the_fp8_product_comes_out_in_autocasts_dtype_and_the_gradient_in_the_inputs():
    """As nn.Linear under autocast: a float32 input (what a LayerNorm hands on under autocast) gives a
    bf16 output, not a float32 one; the input's gradient stays float32."""
    torch.manual_seed(2)
    lin = fp8.Fp8Linear.from_linear(nn.Linear(64, 32), torch.bfloat16)
    lin.kernels = True  # the kernel path (emulated on the CPU)
    x = torch.randn(40, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
        plain = nn.functional.linear(x, lin.dequantized(torch.float32))
    assert y.dtype == plain.dtype == torch.bfloat16
    assert lin(x).dtype == torch.float32  # without autocast: the input's dtype
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    ref = (x.detach().double() @ lin.dequantized(torch.float64).t() + lin.bias.double())
    assert float((y.double() - ref).norm() / ref.norm()) < 0.06


def test_swap_keeps_lora_layers_and_counts_linears():
    block = nn.Sequential(nn.Linear(32, 32), nn.ModuleDict({"lora_A": nn.Linear(32, 4)}), nn.Linear(32, 16))
    assert fp8.swap_linears(block, torch.float32) == 2
    assert isinstance(block[0], fp8.Fp8Linear) and isinstance(block[2], fp8.Fp8Linear)
    assert type(block[1]["lora_A"]) is nn.Linear  # (lora_* children are skipped by name)
    assert fp8.swap_linears(block, torch.float32) == 0  # already fp8


def test_fp8_refused_without_fp8_tensor_cores():
    with pytest.raises(quant.QuantizationError, match="compute capability"):
        quant.check_supported("fp8", torch.device("cpu"))


def test_fp8_blocks_round_trip_through_the_quantize_once_cache(tmp_path):
    from diffusers import FluxTransformer2DModel

    from stages.core.params import Model
    from stages.models import flux

    folder = flux.local_folder(flux.resolve_base(Model(base="tiny-random")), None, "transformer")
    model = FluxTransformer2DModel.from_pretrained(folder)
    for block in quant.blocks(model):
        quant.quantize_block(block, "fp8", torch.device("cpu"), torch.float32)
    assert quant.quantized_linears(model) == sum(isinstance(m, fp8.Fp8Linear) for m in model.modules()) > 0
    prefix, block = "transformer_blocks.0.", model.transformer_blocks[0]
    quant_cache.save_block(tmp_path, prefix, block)
    fresh = FluxTransformer2DModel.from_config(model.config)
    quant_cache.load_block(tmp_path, prefix, fresh.transformer_blocks[0], torch.device("cpu"), torch.float32, "fp8")
    a, b = block.state_dict(), fresh.transformer_blocks[0].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == fp8.E4M3 else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == fp8.E4M3 else b[k]) for k in a)


def test_lora_trains_on_an_fp8_base_and_stays_float32():
    """peft keeps the adapter in the base's compute dtype (Fp8Linear.compute_dtype), never in e4m3;
    gradients reach the LoRA through the quantized layers."""
    from diffusers import FluxTransformer2DModel

    from stages.core.params import Lora, Model
    from stages.models import flux, lora

    folder = flux.local_folder(flux.resolve_base(Model(base="tiny-random")), None, "transformer")
    model = FluxTransformer2DModel.from_pretrained(folder)
    for block in quant.blocks(model):
        quant.quantize_block(block, "fp8", torch.device("cpu"), torch.float32)
    params = lora.add_lora(model, Lora(rank=4, targets="all"), torch.float32)
    assert params and all(p.dtype == torch.float32 for p in params)
    wrapped = [m for m in model.modules() if hasattr(m, "base_layer") and isinstance(m.base_layer, fp8.Fp8Linear)]
    assert wrapped
    for p in params:  # a non-zero B so that every LoRA tensor gets a gradient
        torch.nn.init.normal_(p, std=0.02)
    cfg = model.config
    h = w = 4
    out = model(hidden_states=torch.randn(1, h * w, cfg.in_channels),
                encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(h * w, 3), txt_ids=torch.zeros(8, 3),
                guidance=torch.tensor([1.0]) if cfg.guidance_embeds else None, return_dict=False)[0]
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
