"""fp8 compute for the frozen base (stages/models/fp8.py) at real size, against the bf16 base (needs a GPU
with fp8 tensor cores: compute capability >= 8.9).

On one FLUX.1-dev-shaped transformer with random weights (built on the GPU; the shape is what costs time)
with the project's LoRA (rank 16, attention targets) and gradient checkpointing:

1. accuracy: the transformer's output and the LoRA gradients of the fp8 base against the bf16 base on the
   same inputs (relative L2 error of the output; cosine of all LoRA gradients together and the median
   per tensor), at 1024²;
2. speed: one training step (forward with recomputation, backward, AdamW), compiled blocks, median of
   ``--steps`` after 3 warm-ups, for each of ``--variants`` (the bf16 or the fp8 base, ``+cudnn``: cuDNN
   attention as stages.models.attention sets it, after the same probe) at each of ``--res``;
   ``--profile`` adds a torch.profiler table per run (GPU seconds per kernel kind, top kernels);
3. a loss curve: ``--curve-steps`` steps of the same LoRA from the same start on the same 8 random cached
   batches in the same order (same σ and noise per step), fp8 vs bf16 base, at ``--curve-res``.

    python benchmarks/bench_fp8.py --out $OUT        # writes fp8.json, fp8_curve.tsv, fp8_curve.png
    python benchmarks/bench_fp8.py --out $OUT --curve-steps 0 --profile --variants bf16,fp8,fp8+cudnn
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(rank: int):
    import torch
    from diffusers import FluxTransformer2DModel

    from stages.core import compat
    from stages.core.params import Lora
    from stages.models import lora, quant

    compat.ensure_torchvision()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        bf16 = FluxTransformer2DModel(guidance_embeds=True)
    torch.set_default_dtype(torch.float32)
    fp8 = copy.deepcopy(bf16)
    for block in quant.blocks(fp8):
        quant.quantize_block(block, "fp8", torch.device("cuda"), torch.bfloat16)
    torch.cuda.empty_cache()
    params = {}
    for name, model in (("bf16", bf16), ("fp8", fp8)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            params[name] = lora.add_lora(model, Lora(rank=rank), torch.float32)
        model.enable_gradient_checkpointing()
    with torch.no_grad():  # a trained-looking adapter: B != 0, so A gets gradients too
        g = torch.Generator("cuda").manual_seed(1)
        for a, b in zip(params["bf16"], params["fp8"]):
            a.copy_(torch.randn(a.shape, generator=g, device="cuda") * 0.02)
            b.copy_(a)
    return {"bf16": (bf16, params["bf16"]), "fp8": (fp8, params["fp8"])}


def batch(res: int, seed: int, step: int = 0):
    import torch

    g = torch.Generator("cuda").manual_seed(seed)
    h = w = res // 16
    x0 = torch.randn(1, h * w, 64, device="cuda", generator=g)
    enc = torch.randn(1, 512, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    pooled = torch.randn(1, 768, device="cuda", generator=g, dtype=torch.bfloat16)
    g2 = torch.Generator("cuda").manual_seed(10_000 + step)
    sigma = torch.sigmoid(torch.randn(1, device="cuda", generator=g2))
    noise = torch.randn(x0.shape, device="cuda", generator=g2)
    ids = torch.zeros(h, w, 3, device="cuda")
    ids[..., 1] = torch.arange(h, device="cuda")[:, None]
    ids[..., 2] = torch.arange(w, device="cuda")[None, :]
    xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    return dict(hidden_states=xt.bfloat16(), encoder_hidden_states=enc, pooled_projections=pooled, timestep=sigma,
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(512, 3, device="cuda"),
                guidance=torch.ones(1, device="cuda"), return_dict=False), noise - x0


def loss_of(model, kwargs, target):
    import torch

    with torch.autocast("cuda", dtype=torch.bfloat16):
        pred = model(**kwargs)[0]
    return torch.nn.functional.mse_loss(pred.float(), target), pred


def accuracy(models, res: int) -> dict:
    import torch

    out, preds, grads = {}, {}, {}
    kwargs, target = batch(res, 0)
    for name, (model, params) in models.items():
        for p in params:
            p.grad = None
        loss, pred = loss_of(model, kwargs, target)
        loss.backward()
        preds[name] = pred.float().flatten()
        grads[name] = [p.grad.float().flatten() for p in params]
        out[f"{name}_loss"] = round(loss.item(), 6)
    cos = torch.nn.functional.cosine_similarity
    out["output_rel_l2"] = round(float((preds["fp8"] - preds["bf16"]).norm() / preds["bf16"].norm()), 5)
    all8, all16 = torch.cat(grads["fp8"]), torch.cat(grads["bf16"])
    out["lora_grad_cosine"] = round(float(cos(all8, all16, dim=0)), 5)
    per = [float(cos(a, b, dim=0)) for a, b in zip(grads["fp8"], grads["bf16"]) if b.norm() > 0]
    out["lora_grad_cosine_median"] = round(statistics.median(per), 5)
    out["lora_grad_cosine_min"] = round(min(per), 5)
    out["lora_grad_rel_l2"] = round(float((all8 - all16).norm() / all16.norm()), 5)
    for name in models:
        models[name][0].zero_grad(set_to_none=True)
    return out


def speed(model, params, res: int, steps: int, profile_to: Path | None = None) -> dict:
    import torch

    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    kwargs, target = batch(res, 0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times = []
    t_first = None
    for i in range(3 + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = loss_of(model, kwargs, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i == 0:
            t_first = dt
        if i >= 3:
            times.append(dt)
    out = {"s_per_step": round(statistics.median(times), 3), "first_step_s": round(t_first, 1),
           "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
           "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2 ** 30, 2)}
    if profile_to is not None:
        out.update(profile(lambda: train_step(model, opt, kwargs, target), profile_to))
    return out


def train_step(model, opt, kwargs, target) -> None:
    loss, _ = loss_of(model, kwargs, target)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# kernel name -> kind (first match), for the per-kind time of a profiled step
KINDS = (("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")), ("fused (triton)", ("triton_",)),
         ("fp8 matmul", ("_qq", "f8", "e4m3")), ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90")),
         ("copy", ("copy", "memcpy", "memset")))


def profile(step, path: Path, count: int = 2) -> dict:
    """Profile ``count`` calls of ``step``: wall and GPU-busy seconds per step, GPU time per kernel
    kind, and the top kernels written to ``path``."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(count):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / count
    events = [e for e in prof.key_averages()  # the kernels: not the aten ops and runtime calls that launched them
              if e.self_device_time_total > 0 and not e.key.startswith(("aten::", "cuda"))]
    kinds: dict = {}
    for e in events:
        name = e.key.lower()
        kind = next((k for k, words in KINDS if any(w in name for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / 1e6 / count
    busy = sum(kinds.values())
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:40]
    lines = [f"wall {wall:.3f} s/step, GPU busy {busy:.3f} s/step"] + [
        f"{k:16s} {v:.4f} s" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])] + [""] + [
        f"{e.self_device_time_total / 1e3 / count:9.2f} ms {e.count // count:6d}x  {e.key[:150]}" for e in top]
    path.write_text("\n".join(lines) + "\n")
    return {"profile_wall_s": round(wall, 4), "gpu_busy_s": round(busy, 4),
            "gpu_s_by_kind": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}}


def curve(models, res: int, steps: int) -> dict:
    import torch

    losses = {}
    for name, (model, params) in models.items():
        start = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        losses[name] = []
        for step in range(steps):
            kw, target = batch(res, 100 + step % 8, step)  # same x0/prompt, σ and noise drawn per step
            loss, _ = loss_of(model, kw, target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
    return losses


def set_variant(model, tokens: set) -> None:
    """Apply a variant: ``cudnn`` = cuDNN attention through the project's route
    (stages.models.attention.set_backend), else diffusers' native SDPA (flash); then compile the blocks."""
    from stages.models import attention, compiling

    compiling.uncompile(model)
    model.reset_attention_backend()
    if "cudnn" in tokens:
        attention.set_backend(model, "cudnn")
    compiling.compile_blocks(model)


def main() -> None:
    import subprocess

    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench")
    ap.add_argument("--res", default="1024,512")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--curve-steps", type=int, default=200)
    ap.add_argument("--curve-res", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--variants", default="bf16,fp8",
                    help="speed runs: base (bf16|fp8) and tokens joined by '+' (cudnn: cuDNN attention); "
                         "'@512' limits one to a resolution")
    ap.add_argument("--profile", action="store_true", help="profile 2 steps of each speed run (fp8_profile_*.txt)")
    ap.add_argument("--no-accuracy", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rank": a.rank}

    def save():
        (a.out / "fp8.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result), flush=True)

    variants = a.variants.split(",")
    if any("cudnn" in v for v in variants):  # the train stage's own probe (a child process), at 1024²
        from stages.models import attention

        result["attention_probe_1024"] = attention.run_probe(torch.device("cuda"), 24, 4608, 128, True)
        save()
        if not result["attention_probe_1024"]["ok"]:
            variants = [v for v in variants if "cudnn" not in v]
    torch.backends.cuda.enable_cudnn_sdp(False)
    t0 = time.perf_counter()
    models = build(a.rank)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    if not a.no_accuracy:
        result["accuracy_1024"] = accuracy(models, 1024)
        save()
    for res in map(int, a.res.split(",")):
        for v in variants:
            v, _, only = v.partition("@")
            if only and int(only) != res:
                continue
            base, *rest = v.split("+")
            model, params = models[base]
            set_variant(model, set(rest))
            try:
                result[f"speed_{v}_{res}"] = speed(model, params, res, a.steps,
                                                   a.out / f"fp8_profile_{v.replace('+', '_')}_{res}.txt" if a.profile else None)
            except torch.cuda.OutOfMemoryError as err:
                result[f"speed_{v}_{res}"] = {"error": str(err)[:200]}
            save()
    for model, _ in models.values():
        set_variant(model, set())
    if a.curve_steps:
        losses = curve(models, a.curve_res, a.curve_steps)
        rows = ["step\tbf16\tfp8"] + [f"{i + 1}\t{b:.6f}\t{f:.6f}" for i, (b, f) in
                                      enumerate(zip(losses["bf16"], losses["fp8"]))]
        (a.out / "fp8_curve.tsv").write_text("\n".join(rows) + "\n")
        diffs = [abs(b - f) / max(abs(b), 1e-9) for b, f in zip(losses["bf16"], losses["fp8"])]
        result["curve"] = {"res": a.curve_res, "steps": a.curve_steps,
                           "mean_rel_loss_diff": round(statistics.mean(diffs), 5),
                           "max_rel_loss_diff": round(max(diffs), 5),
                           "bf16_last10": round(statistics.mean(losses["bf16"][-10:]), 5),
                           "fp8_last10": round(statistics.mean(losses["fp8"][-10:]), 5)}
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(7, 3.5))
            ax.plot(losses["bf16"], label="bf16 base", lw=1)
            ax.plot(losses["fp8"], label="fp8 base (stages/models/fp8.py)", lw=1, alpha=0.8)
            ax.set_xlabel("step")
            ax.set_ylabel("flow-matching loss")
            ax.set_title(f"LoRA r{a.rank}, {a.curve_res}², same batches, σ and noise per step")
            ax.legend()
            fig.tight_layout()
            fig.savefig(a.out / "fp8_curve.png", dpi=110)
        except ImportError:
            pass
    save()


if __name__ == "__main__":
    main()
