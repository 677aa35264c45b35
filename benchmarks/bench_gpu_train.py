"""GPU benchmark of the project's own LoRA train step on a FLUX.1-dev-shaped transformer.

Builds ``FluxTransformer2DModel(guidance_embeds=True)`` from its default config (the FLUX.1-dev
shape, 11.9B parameters) directly on the GPU with random weights — no download — quantizes it with
``stages.models.quant``, adds the LoRA with ``stages.models.lora`` and times
``stages.models.trainer.Trainer.step`` (the very step the train stage runs) on cached-style random
latents and text embeddings (512 T5 tokens). Batch 1, LoRA rank 16 on the ``attention`` preset,
gradient checkpointing on, AdamW.

    python benchmarks/bench_gpu_train.py --mode nf4 --res 512 1024 [--compile] [--steps 5] [--pipelined]

``--pipelined`` times the steps as the train stage runs them (stages.models.trainer.StepPipeline:
step N+1 launched before step N is resolved; step_s is then the time from one step's end to the next's);
``--check-syncs`` runs one ``Trainer.launch`` on a host-side batch under
``torch.cuda.set_sync_debug_mode("error")`` and reports the first host sync in it (``launch_syncs``).

One JSON line per (mode, resolution) on stdout (and appended to ``--out`` if given); the
resolutions of one mode share the built model. Run each mode in its own process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.core.params import Lora, Train  # noqa: E402
from stages.models import flux, quant  # noqa: E402
from stages.models.cache import Batch  # noqa: E402
from stages.models.trainer import StepPipeline, Trainer  # noqa: E402


SMALL = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
             joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))  # --small: a CPU dry run


def build(mode: str, device: str, small: bool):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    t0 = time.time()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = FluxTransformer2DModel(guidance_embeds=True, **(SMALL if small else {}))  # default = FLUX.1-dev
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    built = time.time() - t0
    t0 = time.time()
    model = quant.quantize(model, mode, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return model, built, time.time() - t0


def gib_allocated(device: str) -> float:
    return torch.cuda.memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")


def batch(res: int, cfg, device: str, dtype) -> Batch:
    lat = res // 8
    return Batch(latents=torch.randn(1, cfg.in_channels // 4, lat, lat, device=device),
                 prompt_embeds=torch.randn(1, 512, cfg.joint_attention_dim, device=device, dtype=dtype),
                 pooled=torch.randn(1, cfg.pooled_projection_dim, device=device, dtype=dtype), ids=["x"])


def timed_steps(trainer, b, first: int, n: int, pipelined: bool) -> list[dict]:
    """The metrics of ``n`` steps from step ``first``: each resolved at once, or pipelined as in the stage."""
    if not pipelined:
        return [trainer.step([b], first + k) for k in range(n)]
    got: list[dict] = []
    steps = StepPipeline(trainer, lambda metrics, done: got.append(metrics))
    for k in range(n):
        steps.launch([b], first + k)
    steps.flush()
    return got


def launch_syncs(trainer, b, step: int) -> str:
    """One launch on a host-side batch (as the cache gives it) with CUDA syncs made errors: 'none' or
    the first sync's message."""
    host = Batch(latents=b.latents.cpu(), prompt_embeds=b.prompt_embeds.cpu(), pooled=b.pooled.cpu(), ids=b.ids)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = trainer.launch([host], step)
    except RuntimeError as err:
        trainer.optimizer.zero_grad(set_to_none=True)
        return str(err).strip().splitlines()[0][:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.resolve(pending)
    return "none"


def profile(trainer, b, step: int) -> None:
    """GPU busy time vs wall time of 3 steps, and the ops that take it (is the step GPU- or CPU-bound?)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.time()
        for k in range(3):
            trainer.step([b], step + k)
        wall = (time.time() - t0) / 3
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / 1e6 / 3
    print(f"# profile: wall {wall:.3f} s/step, GPU busy {gpu:.3f} s/step", flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60), flush=True)
    print(events.table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="none", choices=quant.MODES)
    ap.add_argument("--res", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="attention")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-gc", action="store_true")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--image-attention-only", action="store_true",
                    help="LoRA on to_q/k/v/out.0 only, as the bare reference loop (for comparison)")
    ap.add_argument("--profile", action="store_true", help="print the top kernels/ops of 3 extra steps")
    ap.add_argument("--pipelined", action="store_true", help="launch step N+1 before resolving step N (the stage)")
    ap.add_argument("--check-syncs", action="store_true", help="report the first host sync inside Trainer.launch")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a tiny config (CPU dry run of this script)")
    args = ap.parse_args()
    flux.setup_backends()  # cuDNN SDPA off (see stages.models.flux.setup_backends)
    if args.image_attention_only:
        from stages.models import lora

        lora.DOUBLE["attention"] = lora.DOUBLE["attention"][:4]
    model, built_s, quant_s = build(args.mode, args.device, args.small)
    weights_gib = gib_allocated(args.device)
    print(f"# {args.mode}: built in {built_s:.1f}s, quantized in {quant_s:.1f}s, weights {weights_gib:.2f} GiB",
          flush=True)
    train_params = Train(resolution=max(args.res), batch_size=1, steps=10_000, lr=1e-4, warmup_steps=0,
                         caption_dropout=0.0, gradient_checkpointing=not args.no_gc, compile=args.compile,
                         optimizer=args.optimizer, sigma_sampling="logit_normal")
    trainer = Trainer(model, Lora(rank=args.rank, targets=args.targets), train_params, seed=0, device=args.device)
    lora_m = sum(p.numel() for p in trainer.params) / 1e6
    step = 0
    for res in args.res:
        b = batch(res, model.config, args.device, trainer.base_dtype)
        row = {"mode": args.mode, "res": res, "compile": args.compile, "gc": not args.no_gc,
               "targets": args.targets + ("(image)" if args.image_attention_only else ""), "rank": args.rank, "lora_m": round(lora_m, 1),
               "weights_gib": round(weights_gib, 2), "pipelined": args.pipelined}
        try:
            t0 = time.time()
            for _ in range(args.warmup):
                trainer.step([b], step)
                step += 1
            row["warmup_s"] = round(time.time() - t0, 1)
            if args.check_syncs and args.device == "cuda":
                row["launch_syncs"] = launch_syncs(trainer, b, step)
                step += 1
            measured = timed_steps(trainer, b, step, args.steps, args.pipelined)
            step += args.steps
            times = [m["step_time"] for m in measured]
            peaks = [m.get("peak_mem_gib", float("nan")) for m in measured]
            losses = [m["loss"] for m in measured]
            row.update(step_s=round(statistics.median(times), 3), min_s=round(min(times), 3),
                       peak_gib=round(max(peaks), 2), loss=round(losses[-1], 4))
        except torch.cuda.OutOfMemoryError:
            row["error"] = "OOM"
            torch.cuda.empty_cache()
        except Exception as err:  # report and go on with the next resolution
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        if args.profile and "error" not in row:
            profile(trainer, b, step)
            step += 3
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")


if __name__ == "__main__":
    main()
