"""Which attention kernel the Flux transformer runs on a GPU: cuDNN's fused attention where it works.

Flux spends a third of a 1024² training step in attention (57 blocks, 4,608 tokens). Measured on an
H200 (torch 2.11.0+cu130, reports/bench/speed.md, `benchmarks/bench_fp8.py`): one attention call of
FLUX.1-dev's 1024² shape forward + backward takes 1.9 ms with cuDNN against 5.1 ms with the flash
kernel torch picks by default, and the compiled fp8 train step goes from 0.529 to 0.447 s.

But cuDNN's attention backward once crashed the whole process for Flux's shapes (an H100 with
torch 2.11: ../shared/DESIGN.md), and a crash cannot be caught. So the choice is made by a probe:
the exact shape (heads, tokens, head size; forward and backward when the stage trains) runs in a
child process with cuDNN and with flash; cuDNN is used only when the child exits cleanly, agrees
with flash (relative error < 2 % of the output, < 5 % of the gradient: both are bf16 kernels) and
is faster. The verdict is cached per GPU, torch, cuDNN version and shape next to the compiled graphs
(stages.models.compiling.cache_dir), so only the first run on a machine pays the probe (seconds).

The choice is applied to the transformer alone, through diffusers' attention backends
(``set_attention_backend("_native_cudnn")``): the VAE and the text encoders keep torch's default
kernels, and a checkpointed block recomputes with the kernel its forward used.
``FLUXIMP_ATTENTION=flash`` or ``=cudnn`` overrides the probe. On the CPU nothing changes.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 300  # a hung probe counts as a failure
MAX_OUT_REL, MAX_GRAD_REL = 0.02, 0.05
PROBE_ROUTE = "cudnn_attention v2"  # what the probe runs: a new route needs new verdicts


def set_backend(transformer, kind: str) -> None:
    """``cudnn``: diffusers' ``_native_cudnn`` attention backend for this transformer only (the VAE and
    the text encoders keep torch's default order), served by :func:`cudnn_attention`; ``flash``: leave
    diffusers' native SDPA, which picks the flash kernel for bf16 on these GPUs (cuDNN is off globally:
    stages.models.flux.setup_backends)."""
    if kind == "cudnn":
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_CUDNN] = cudnn_attention
        quiet = logging.getLogger("diffusers.models.modeling_utils")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its one line: "attention backends are an experimental feature"
        try:
            transformer.set_attention_backend("_native_cudnn")
        finally:
            quiet.setLevel(level)


class _GradInOutputLayout(torch.autograd.Function):
    """Identity on attention's output whose backward hands the gradient on contiguous: in the layout of
    the output, which is what cuDNN's attention backward needs."""

    @staticmethod
    def forward(ctx, out: torch.Tensor) -> torch.Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def cudnn_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                    scale=None, enable_gqa: bool = False, return_lse: bool = False, _parallel_config=None):
    """diffusers' ``_native_cudnn`` backend (inputs in (batch, tokens, heads, dim), made contiguous per
    head for the kernel), with the output's gradient handed back in the output's layout, and the cuDNN
    op called directly rather than inside ``sdpa_kernel`` (which AOTAutograd's cache cannot key: every
    run would trace the compiled blocks' joint graph again, seconds of each first step).

    Flux's processor flattens the heads of the permuted output, so the gradient would reach cuDNN's
    backward with other strides than the output's. With bf16 inputs (the bf16 base, or fp8 products in
    bf16) diffusers' route gave the compiled train step a NaN at its first step on an H200 (torch 2.11,
    cuDNN 9.19) where flash attention trained; this route trains (fp8 0.407 s/step, bf16 0.480:
    reports/bench/speed.md, 2026-12-03). Which of its two changes (gradient layout, op called directly)
    cures the NaN was not isolated. Context-parallel calls keep diffusers' route."""
    if _parallel_config is not None or return_lse:
        from diffusers.models.attention_dispatch import _native_cudnn_attention  # (the registry entry is ours)

        return _native_cudnn_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                       is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                                       return_lse=return_lse, _parallel_config=_parallel_config)
    kind = query.device.type  # the op is called directly, so autocast's cast to bf16 is ours to do
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else query.dtype
    q, k, v = (x.permute(0, 2, 1, 3).to(dtype).contiguous() for x in (query, key, value))
    if q.is_cuda:  # the cuDNN op itself: an ``sdpa_kernel`` block in the graph keeps it out of AOTAutograd's cache
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, attn_mask, grad, dropout_p, is_causal,
                                                                 False, scale=scale)[0]
    else:  # (the CPU, in the tests: torch's own kernel)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                               is_causal=is_causal, scale=scale,
                                                               enable_gqa=enable_gqa)
    return _GradInOutputLayout.apply(out).permute(0, 2, 1, 3)


def probe_key(device: torch.device, heads: int, tokens: int, head_dim: int, backward: bool) -> str:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return (f"{torch.cuda.get_device_name(device)}|torch {torch.__version__}|cudnn {cudnn}|"
            f"{heads}x{tokens}x{head_dim}|{'fwd+bwd' if backward else 'fwd'}|{PROBE_ROUTE}")


def cache_file() -> Path:
    from stages.models import compiling

    return compiling.cache_dir() / "attention-probe.json"


def run_probe(device: torch.device, heads: int, tokens: int, head_dim: int, backward: bool) -> dict:
    """The probe in a child process (a crash or a hang there is a verdict, not our crash)."""
    # -P: the script's folder (stages/models: cache.py, checkpoint.py, ...) is not put first on sys.path
    cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--probe", str(device), str(heads), str(tokens),
           str(head_dim), "1" if backward else "0"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"ok": False, "why": f"the probe did not finish in {PROBE_TIMEOUT_S} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return {"ok": False, "why": f"the probe exited with {proc.returncode}: {tail[0][:200]}"}
    return verdict(json.loads(lines[-1]))


def verdict(m: dict) -> dict:
    """cuDNN is used when it agrees with flash and is faster (``m``: the probe's measurements)."""
    if not (m["out_rel"] <= MAX_OUT_REL and m.get("grad_rel", 0.0) <= MAX_GRAD_REL):  # (a NaN fails too)
        return {**m, "ok": False, "why": f"cuDNN differs from flash (output {m['out_rel']:.3g}, "
                                          f"gradient {m.get('grad_rel', 0.0):.3g})"}
    if m["cudnn_ms"] >= m["flash_ms"]:
        return {**m, "ok": False, "why": f"cuDNN is not faster ({m['cudnn_ms']} vs {m['flash_ms']} ms)"}
    return {**m, "ok": True, "why": f"{m['cudnn_ms']} vs {m['flash_ms']} ms per call"}


def shape(model_params) -> tuple[int, int]:
    """Heads and head size of ``model.base``'s transformer, from its config (nothing loaded)."""
    from stages.models import flux

    source = flux.resolve_base(model_params)
    if Path(source).exists():
        config = Path(source) / "transformer" / "config.json"
    else:  # a hub id: the config file alone (the weights come with the load)
        from huggingface_hub import hf_hub_download

        config = Path(hf_hub_download(source, "transformer/config.json", revision=model_params.revision))
    cfg = json.loads(config.read_text())
    return int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])


def choose(model_params, device, tokens: int, backward: bool) -> str:
    """The attention kernel for ``model.base``'s transformer at ``tokens`` tokens on ``device``:
    ``cudnn`` or ``flash`` on a GPU, ``default`` on the CPU (torch's own choice). Call it before the
    transformer loads: the probe's child process then has the card to itself."""
    device = torch.device(device)
    if device.type != "cuda":
        return "default"
    forced = os.environ.get("FLUXIMP_ATTENTION", "auto")
    if forced in ("flash", "cudnn"):
        log.info("attention: %s (FLUXIMP_ATTENTION)", forced)
        return forced
    heads, head_dim = shape(model_params)
    key = probe_key(device, heads, tokens, head_dim, backward)
    from stages.core import io

    path = cache_file()
    known = io.read_json(path) if path.is_file() else {}
    result = known.get(key)
    if result is None:
        t0 = time.perf_counter()
        result = run_probe(device, heads, tokens, head_dim, backward)
        result["probe_s"] = round(time.perf_counter() - t0, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = io.read_json(path) if path.is_file() else {}  # another process may have added its verdict
        io.write_json(path, {**fresh, key: result})
    kind = "cudnn" if result["ok"] else "flash"
    log.info("attention: %s at %d tokens (cuDNN probe: %s; verdict cached in %s; FLUXIMP_ATTENTION=flash|cudnn "
             "overrides)", "cuDNN" if kind == "cudnn" else "flash", tokens, result["why"], path)
    return kind


def measure(device: str, heads: int, tokens: int, head_dim: int, backward: bool, repeats: int = 10) -> dict:
    """The probe itself (child process): the route the stages use (:func:`cudnn_attention`) and flash on
    the same random bf16 inputs, laid out and flattened as Flux's processor does."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, device=device, dtype=torch.bfloat16, generator=g)
               .requires_grad_(backward) for _ in range(3))

    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                *(x.permute(0, 2, 1, 3) for x in (q, k, v))).permute(0, 2, 1, 3)

    out: dict = {}
    results = {}
    for name, attend in (("flash", flash), ("cudnn", cudnn_attention)):
        def call():
            o = attend(q, k, v)
            if backward:
                q.grad = None
                o.flatten(2, 3).float().square().mean().backward()
            return o
        o = call()  # first call: plans and workspaces out of the timing
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            o = call()
        torch.cuda.synchronize(device)
        out[f"{name}_ms"] = round((time.perf_counter() - t0) * 1000 / repeats, 3)
        results[name] = (o.detach().float(), q.grad.float() if backward else None)
    (o_f, g_f), (o_c, g_c) = results["flash"], results["cudnn"]
    out["out_rel"] = float((o_c - o_f).norm() / o_f.norm())
    if backward:
        out["grad_rel"] = float((g_c - g_f).norm() / g_f.norm())
    return out


if __name__ == "__main__":
    if len(sys.argv) != 7 or sys.argv[1] != "--probe":
        sys.exit("usage: attention.py --probe DEVICE HEADS TOKENS HEAD_DIM BACKWARD(0|1)")
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    _, _, dev, h, t, d, b = sys.argv
    print(json.dumps(measure(dev, int(h), int(t), int(d), b == "1")), flush=True)
