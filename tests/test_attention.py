"""The attention kernel choice (stages/models/attention.py) on the CPU: the probe's verdict, its cache,
the override and the scoping to the transformer. The probe's kernels themselves need a GPU
(benchmarks/bench_fp8.py measures them); here the child process is faked or fails for lack of CUDA."""
import logging
import subprocess

import pytest
import torch
from diffusers import FluxTransformer2DModel

from stages.core.params import Model
from stages.models import attention, flux

GOOD = {"flash_ms": 5.1, "cudnn_ms": 1.9, "out_rel": 0.003, "grad_rel": 0.005}


@pytest.fixture
def tiny():
    folder = flux.local_folder(flux.resolve_base(Model(base="tiny-random")), None, "transformer")
    return FluxTransformer2DModel.from_pretrained(folder)


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A pretend GPU: the probe's key without CUDA, the cache in tmp, every probe and backend call recorded."""
    monkeypatch.setenv("FLUXIMP_COMPILE_CACHE", str(tmp_path / "compiled"))
    monkeypatch.delenv("FLUXIMP_ATTENTION", raising=False)
    monkeypatch.setattr(attention, "probe_key", lambda device, h, t, d, b: f"GPU X|{h}x{t}x{d}|{b}")
    calls = {"probes": [], "result": GOOD}
    monkeypatch.setattr(attention, "run_probe", lambda device, h, t, d, b: calls["probes"].append((h, t, d, b))
                        or attention.verdict(dict(calls["result"])))
    return calls


TINY = Model(base="tiny-random")
CUDA = torch.device("cuda")


def test_the_cpu_keeps_torchs_choice_and_probes_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUXIMP_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(attention, "run_probe", lambda *a: pytest.fail("probed on the CPU"))
    assert attention.choose(TINY, "cpu", 4608, backward=True) == "default"
    assert not list(tmp_path.iterdir())


def test_the_probe_runs_the_base_models_shape(tiny, gpu):
    assert attention.shape(TINY) == (tiny.config.num_attention_heads, tiny.config.attention_head_dim)
    attention.choose(TINY, CUDA, 4608, backward=True)
    assert gpu["probes"] == [(tiny.config.num_attention_heads, 4608, tiny.config.attention_head_dim, True)]


def test_a_passing_probe_picks_cudnn_once_per_shape_and_is_cached(gpu):
    from stages.core import io

    assert attention.choose(TINY, CUDA, 4608, backward=True) == "cudnn"
    assert attention.choose(TINY, CUDA, 4608, backward=True) == "cudnn"  # read from the cache
    assert len(gpu["probes"]) == 1
    assert attention.choose(TINY, CUDA, 1536, backward=False) == "cudnn"  # another shape: probed
    assert len(gpu["probes"]) == 2
    cached = io.read_json(attention.cache_file())
    assert len(cached) == 2 and all(v["ok"] and "probe_s" in v for v in cached.values())


@pytest.mark.parametrize("result,why", [
    ({**GOOD, "out_rel": 0.3}, "differs from flash"),
    ({**GOOD, "grad_rel": 0.2}, "differs from flash"),
    ({**GOOD, "grad_rel": float("nan")}, "differs from flash"),  # a NaN gradient (compares false) fails
    ({**GOOD, "cudnn_ms": 6.0}, "not faster"),
])
def test_a_wrong_or_slower_cudnn_keeps_flash(gpu, result, why, caplog):
    gpu["result"] = result
    with caplog.at_level(logging.INFO, logger="stages.models.attention"):
        assert attention.choose(TINY, CUDA, 4608, backward=True) == "flash"
    assert why in caplog.text and "FLUXIMP_ATTENTION" in caplog.text


def test_the_environment_overrides_the_probe(gpu, monkeypatch):
    for kind in ("flash", "cudnn"):
        monkeypatch.setenv("FLUXIMP_ATTENTION", kind)
        assert attention.choose(TINY, CUDA, 4608, backward=True) == kind
    assert gpu["probes"] == []


def test_a_probe_that_crashes_or_hangs_is_a_verdict_not_a_crash(monkeypatch):
    # a real child: without CUDA it exits non-zero, as a crashing cuDNN would
    out = attention.run_probe(torch.device("cuda"), 24, 4608, 128, True)
    assert out["ok"] is False and "exited with 1" in out["why"] and "no CUDA" in out["why"]

    def hang(*a, **k):
        raise subprocess.TimeoutExpired(a[0], attention.PROBE_TIMEOUT_S)
    monkeypatch.setattr(attention.subprocess, "run", hang)
    out = attention.run_probe(torch.device("cuda"), 24, 4608, 128, True)
    assert out == {"ok": False, "why": f"the probe did not finish in {attention.PROBE_TIMEOUT_S} s"}


def test_cudnn_is_set_on_the_transformer_alone(tiny):
    from diffusers.models.attention_dispatch import AttentionBackendName

    other = FluxTransformer2DModel.from_config(tiny.config)
    level = logging.getLogger("diffusers.models.modeling_utils").level
    attention.set_backend(tiny, "cudnn")
    backends = {m.processor._attention_backend for m in tiny.modules() if hasattr(getattr(m, "processor", None),
                                                                                 "_attention_backend")}
    assert backends == {AttentionBackendName._NATIVE_CUDNN}
    assert all(m.processor._attention_backend != AttentionBackendName._NATIVE_CUDNN
               for m in other.modules() if hasattr(getattr(m, "processor", None), "_attention_backend"))
    assert logging.getLogger("diffusers.models.modeling_utils").level == level
    attention.set_backend(other, "flash")  # flash: diffusers' native SDPA stays
    assert all(m.processor._attention_backend != AttentionBackendName._NATIVE_CUDNN
               for m in other.modules() if hasattr(getattr(m, "processor", None), "_attention_backend"))


def test_a_kernel_scoped_per_call_compiles_and_recomputes_like_eager(tiny):
    """The cuDNN route puts ``sdpa_kernel(...)`` inside each attention call; the same route with the
    math kernel (the one the CPU has) traces without a graph break, and checkpointed compiled blocks
    give eager's gradients."""
    import torch._dynamo

    from stages.models import compiling

    tiny.set_attention_backend("_native_math")
    cfg, h = tiny.config, 4
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, h * h, cfg.in_channels, generator=g),
              encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g), timestep=torch.tensor([0.5]),
              img_ids=torch.zeros(h * h, 3), txt_ids=torch.zeros(8, 3),
              guidance=torch.tensor([1.0]) if cfg.guidance_embeds else None, return_dict=False)
    with torch.no_grad():
        assert torch._dynamo.explain(tiny)(**kw).graph_break_count == 0
    tiny.enable_gradient_checkpointing()

    def grads():
        tiny.zero_grad(set_to_none=True)
        tiny(**kw)[0].square().mean().backward()
        return [p.grad.clone() for p in tiny.parameters() if p.grad is not None]

    eager = grads()
    compiling.compile_blocks(tiny, backend="aot_eager")
    try:
        compiled = grads()
    finally:
        compiling.uncompile(tiny)
    assert len(eager) == len(compiled) > 0
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(eager, compiled))


def test_cudnn_route_hands_the_output_gradient_back_in_the_outputs_layout(tiny, monkeypatch):
    """cuDNN's attention backward needs the output's gradient in the output's layout; Flux's processor
    flattens the permuted output, so attention.cudnn_attention restores it (the CPU runs the route with
    torch's own kernel). Same outputs and gradients as diffusers' native SDPA."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    attention.set_backend(tiny, "cudnn")
    assert _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_CUDNN] is attention.cudnn_attention
    layouts = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        out = real(*a, **k)
        out.register_hook(lambda g: layouts.append(g.stride() == out.stride()))
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 24, 2, 8, generator=g, requires_grad=True) for _ in range(3))  # (batch, tokens, heads, dim)

    def run(fn):
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v)
        out.flatten(2, 3).square().sum().backward()  # as Flux's processor uses it
        return out.detach(), [t.grad.clone() for t in (q, k, v)]

    ours = run(attention.cudnn_attention)
    assert layouts == [True]
    plain = run(lambda q, k, v: real(*(x.permute(0, 2, 1, 3) for x in (q, k, v))).permute(0, 2, 1, 3))
    assert layouts == [True]  # (the spy sees our route only)
    assert torch.allclose(ours[0], plain[0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours[1], plain[1]))
    monkeypatch.setattr(attention._GradInOutputLayout, "backward", staticmethod(lambda ctx, grad: grad))
    run(attention.cudnn_attention)
    assert layouts == [True, False]  # without the fix the gradient comes back permuted


def test_cudnn_route_casts_float32_inputs_to_autocasts_dtype(monkeypatch):
    """The nf4 base's products come out in float32 under autocast; the cuDNN op, called directly, gets
    no cast from autocast, so the route casts (fed float32, cuDNN's kernel gave a NaN loss on an H200)."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q.dtype, k.dtype, v.dtype)) or real(q, k, v, **kw))
    q, k, v = (torch.randn(1, 16, 2, 8) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention.cudnn_attention(q, k, v)
    assert seen == [(torch.bfloat16,) * 3] and out.dtype == torch.bfloat16
    assert attention.cudnn_attention(q, k, v).dtype == torch.float32 and seen[-1] == (torch.float32,) * 3
