"""train: LoRA on the Flux transformer from the encode cache -> ``models/lora/``.

- Loads only the transformer (quantized per ``model.quantization``), adds the LoRA
  (stages.models.lora) and runs ``train.steps`` optimizer steps of stages.models.trainer.
- Checkpoints every ``train.checkpoint_every`` steps into ``models/checkpoints/`` (atomic, last
  ``train.keep_checkpoints`` kept, checksummed). Killed at any moment, rerunning the stage resumes
  from the last checkpoint at the right step and ends with the same adapter as an uninterrupted
  run; a finished run is never resumed (``dvc repro -f`` trains again), except to train more steps
  with a constant lr schedule. What may resume what: stages.models.checkpoint.
- Steps run one ahead of their bookkeeping (stages.models.trainer.StepPipeline): step N+1 is
  queued on the GPU before step N's loss and grad norm are read back, checked and logged, so the GPU
  does not wait for the host between steps. Before a checkpoint, a validation render, a snapshot, a
  stop and the export, the pending step is read back first.
- Stops at the first non-finite loss or gradient norm, naming the step; never exports NaN weights.
- Checkpoints of another run (other params, data or code) are removed only once this run has saved its
  first checkpoint, so a run that fails early loses nothing.
- Logs loss, lr and grad norm per step to ``reports/train/loss.tsv`` (a DVC plot: the same on every
  run). The tracked reports (loss.tsv, validation/ with index.json) are written while training into
  ``models/checkpoints/progress/`` (kept with the checkpoints, for a resume) and replace the tracked ones
  only when the run has finished: a failed or stopped run leaves them byte-identical. Step time,
  samples/s and peak GPU memory, which differ run to run, go to ``reports/train/timings.tsv``
  (gitignored, never hashed). Every metric also goes to MLflow (stages.core.tracking) and to any
  ``callbacks`` passed to :func:`run`; a progress bar (a log line off a terminal) shows the ETA.
- Validation images every ``train.validate_every`` steps (stages.models.validation: the user's prompts,
  seeds, guidance and resolution; embedded before the transformer loads), also logged to MLflow.
- ``train.save_every``: a loadable adapter every N steps in ``models/snapshots/step-<N>/`` (the last
  ``train.keep_last``; stages.models.snapshots), logged to MLflow; not a DVC output.
- ``train.num_processes > 1``: re-launches itself with ``accelerate launch`` (DDP, one process per
  GPU; gloo on CPU). A single process never needs accelerate's launcher.
- Exports (stages.models.snapshots): diffusers ``pytorch_lora_weights.safetensors``, a kohya/ComfyUI
  copy ``lora_kohya.safetensors`` and ``adapter.json``; with ``train.ema_decay`` the EMA of the LoRA
  weights as its own adapter in ``models/lora/ema/``.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from stages.core import gpus, lifecycle, log as logs, params, registry, tracking
from stages.core.device import default_device
from stages.core.io import atomic_dir, no_space_errors, write_json, write_text
from stages.core.paths import Train
from stages.models import checkpoint as ckpt, divergence, snapshots, validation
from stages.models.cache import Cache
from stages.models.trainer import StepPipeline, Trainer, step_seed

COLUMNS = ["step", "loss", "lr", "grad_norm"]                   # loss.tsv: deterministic
TIMING_COLUMNS = ["step", "step_time", "samples_per_s", "peak_mem_gib"]  # timings.tsv: not
Callback = Callable[[dict, int], None]  # a per-step metric sink: fn(metrics, step)
log = logging.getLogger("stages.train")


class LossLog:
    """A per-step TSV (``reports/train/loss.tsv`` by default): one row per step, appended as the
    run goes; on resume, rows after the checkpoint go (the kept rows are rewritten atomically)."""

    def __init__(self, path: Path, start: int, columns: list[str] = COLUMNS, fallback: Path | None = None):
        self.path, self.columns = path, columns
        path.parent.mkdir(parents=True, exist_ok=True)
        source = path if path.exists() or fallback is None else fallback  # fallback: the finished run's
        rows = source.read_text().splitlines()[1:] if source.exists() and start > 0 else []
        # a row cut short by a kill (steps are appended) is dropped with the rows past the checkpoint
        rows = [r for r in rows if len(r.split("\t")) == len(columns) and int(r.split("\t")[0]) <= start]
        write_text(path, "\t".join(columns) + "\n" + "".join(r + "\n" for r in rows))
        self.kept = [dict(zip(columns, map(float, r.split("\t")))) for r in rows]

    def replay(self, sinks) -> None:
        """Send the kept rows (steps before a resume) to ``sinks``, so a resumed run's MLflow
        history is whole."""
        for row in self.kept:
            for sink in sinks:
                sink({k: v for k, v in row.items() if k != "step"}, int(row["step"]))

    def __call__(self, metrics: dict, step: int) -> None:
        vals = [str(step)] + [f"{metrics.get(c, float('nan')):.6g}" for c in self.columns[1:]]
        with open(self.path, "a") as fh:
            fh.write("\t".join(vals) + "\n")


def launch_distributed(p) -> int:
    """Re-run this stage under ``accelerate launch`` with ``train.num_processes`` processes."""
    gpus = torch.cuda.device_count()
    if 0 < gpus < p.train.num_processes:
        raise SystemExit(f"train.num_processes={p.train.num_processes} but this machine has {gpus} GPU(s): "
                         "one process per GPU (set CUDA_VISIBLE_DEVICES or lower train.num_processes)")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(p.train.num_processes),
           "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no"]
    config = os.environ.get("FLUXIMP_ACCELERATE_CONFIG")  # an `accelerate config` file: FSDP, DeepSpeed
    # --multi_gpu = torchrun-style workers; without CUDA each worker's Accelerator(cpu=True) uses gloo
    cmd += ["--config_file", config] if config else ["--multi_gpu"]
    cmd += ["-m", "stages.train"]
    log.info("launching %d processes: %s", p.train.num_processes, " ".join(cmd))
    return lifecycle.call(cmd, env={**os.environ, "FLUXIMP_TRAIN_CHILD": "1"})  # signals passed on


def export(trainer: Trainer, cache: Cache, p, steps: int, lora_dir: Path) -> None:
    """The final adapter in ``lora_dir`` (and its EMA in ``lora_dir/ema/`` with train.ema_decay)."""
    info = snapshots.adapter_info(p, trainer, steps, cache.index["data_hash"], cache.index["key"])
    with no_space_errors(lora_dir), atomic_dir(lora_dir) as tmp:
        snapshots.write_adapter(trainer.transformer, tmp, info)
        if trainer.ema is not None:
            with trainer.ema_weights():
                snapshots.write_adapter(trainer.transformer, tmp / "ema", {**info, "ema": True})
    log.info("adapter exported to %s", lora_dir)


def save_snapshot(trainer: Trainer, cache: Cache, p, step: int, root: Path) -> None:
    """``train.save_every``: a loadable adapter in ``root``/step-<N>/, logged to MLflow."""
    info = snapshots.adapter_info(p, trainer, step, cache.index["data_hash"], cache.index["key"])
    folder = snapshots.save_snapshot(trainer.transformer, step, info, p.train.keep_last, root)
    tracking.log_artifacts([folder], artifact_path="snapshots")
    tracking.log_metrics({"snapshot_step": step}, step=step, prefix="train/")


def check_batch_fits(p, cache: Cache) -> None:
    """A batch larger than the training set would silently repeat images within the batch."""
    if p.train.batch_size * p.train.num_processes > len(cache):
        raise params.ParamsError(
            f"train.batch_size = {p.train.batch_size} (x {p.train.num_processes} processes) is larger than "
            f"the {len(cache)} training images in {cache.folder}: set train.batch_size to at most "
            f"{max(1, len(cache) // p.train.num_processes)} (or add images)")


def prepare(p, paths: Train, accelerator, main_proc: bool):
    """Everything a run trains with: the cache, the trainer (transformer + LoRA, restored from a
    checkpoint when one may be resumed: stages.models.checkpoint), the validator, the checkpoint
    identity and the resume plan (its step to start at, the stale checkpoints to remove)."""
    from stages.models import attention, flux, memory, offload

    device = accelerator.device if accelerator else default_device()
    cache = Cache(paths.cache)
    check_batch_fits(p, cache)
    plan = memory.plan(p.model, device)
    if main_proc:
        log.info("memory plan: %s", plan.describe())
    need = flux.preflight("train", p, device, plan, check=main_proc)
    kept = need.kept_blocks if need is not None else 0
    if main_proc and kept:
        log.info("gradient checkpointing: %d blocks keep their activations (no recompute), the card has room", kept)
    # validation prompts are embedded (and the text encoders freed) before the transformer loads
    validator = validation.prepare(p, device, plan) if main_proc and p.train.validate_every else None
    # cuDNN attention where a probe of this shape passes (run before the load; set before compiling)
    kernel = attention.choose(p.model, device, memory.tokens(p.train.resolution, p.train.max_sequence_length),
                              backward=True)
    transformer = flux.load_transformer(p.model, device=device)
    attention.set_backend(transformer, kernel)
    trainer = Trainer(transformer, p.lora, p.train, seed=p.seed, device=device, accelerator=accelerator,
                      empty_prompt=cache.empty,
                      offloader=offload.Offloader() if plan.offload_activations else None, kept_blocks=kept)
    ident = ckpt.identity(p, cache.index["key"])
    resume = ckpt.plan(paths.checkpoints, ident, p.train) if main_proc else None
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        if not main_proc:  # rank 0 has removed what is stale; the others only read
            resume = ckpt.plan(paths.checkpoints, ident, p.train, cleanup=False)
    ckpt.restore(resume, trainer)
    log.info("%s", resume.reason)
    if trainer.world > 1:
        log.info("process %d of %d on %s", trainer.rank, trainer.world, device)
    return cache, trainer, validator, ident, resume


def progress_dir(paths: Train) -> Path:
    """The run's loss.tsv and validation/ while it trains (gitignored, with the checkpoints)."""
    return paths.checkpoints / "progress"


def open_sinks(paths: Train, start: int, callbacks: Sequence[Callback]) -> list[Callback]:
    """loss.tsv (in progress_dir), timings.tsv and the callbacks (which first get the steps kept from
    before a resume), with the outputs of an earlier run cleared: its progress, snapshots past ``start``.
    The tracked reports are not touched here (publish_reports, at the end)."""
    work = progress_dir(paths)
    if start == 0:
        shutil.rmtree(work, ignore_errors=True)  # an earlier run's curve and images
    loss_log = LossLog(work / "loss.tsv", start, fallback=paths.reports / "loss.tsv")
    loss_log.replay(callbacks)
    tracked = paths.reports / "validation"
    if start > 0 and not (work / "validation").exists() and tracked.is_dir():  # continuing a finished run
        shutil.copytree(tracked, work / "validation")
    (work / "validation").mkdir(parents=True, exist_ok=True)
    snapshots.discard_after(start, paths.snapshots)  # snapshots of an earlier run, or of steps to be redone
    return [loss_log, LossLog(paths.timings, start, TIMING_COLUMNS), *callbacks]


class Checkpoints:
    """This run's checkpoints (stages.models.checkpoint): written by the main process while the others
    wait; an earlier run's stale ones go with the first. ``last``: the newest one's step (None: none)."""

    def __init__(self, paths: Train, trainer: Trainer, ident: dict, resume: ckpt.Resume, keep: int, accelerator):
        self.folder, self.trainer, self.ident, self.keep = paths.checkpoints, trainer, ident, keep
        self.stale, self.accelerator = resume.stale, accelerator
        self.last = resume.start or None

    def save(self, done: int) -> None:
        if self.accelerator is None or self.accelerator.is_main_process:
            ckpt.save(self.folder, self.trainer, done, self.ident, self.keep, stale=self.stale)
            self.stale = []
        if self.trainer.world > 1:
            self.accelerator.wait_for_everyone()
        self.last = done


def halt_if_stopped(stop: lifecycle.StopSignals | None, checkpoints: Checkpoints, done: int,
                    steps: StepPipeline) -> None:
    """At a step boundary (``done`` steps launched): after SIGTERM/SIGINT, resolve the pending step,
    save a checkpoint of step ``done`` (unless there is one), print one line and exit."""
    if not stop_requested(stop, checkpoints.trainer):
        return
    steps.flush()
    if done and checkpoints.last != done:
        checkpoints.save(done)
    if stop.signal is None:  # another process was signalled
        raise SystemExit(1)
    raise stop.exit(f"at step {done}; checkpoint saved; rerun to resume" if done
                    else "before the first step; nothing to save")


def publish_reports(paths: Train, validator) -> None:
    """Replace the tracked reports by this finished run's, each in one step."""
    work = progress_dir(paths)
    with atomic_dir(paths.reports / "validation") as tmp:
        images = sorted(x.name for x in (work / "validation").glob("*.png"))
        for name in images:
            shutil.copy2(work / "validation" / name, tmp / name)
        write_json(tmp / "index.json", {**(validator.index() if validator else {"prompts": []}), "images": images})
    write_text(paths.reports / "loss.tsv", (work / "loss.tsv").read_text())


def stop_requested(stop: lifecycle.StopSignals | None, trainer: Trainer) -> bool:
    """Whether SIGTERM/SIGINT asked to stop; with several processes, whether any one was asked (all
    stop at the same step)."""
    flag = stop is not None and stop.signal is not None
    if trainer.world > 1:
        t = torch.tensor([int(flag)], device=trainer.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        flag = bool(t.item())
    return flag


def run(p: params.Params, paths: Train = Train(), accelerator=None, callbacks: Sequence[Callback] = (),
        stop: lifecycle.StopSignals | None = None) -> dict:
    """The training loop (one process of it); returns the last step's metrics. ``callbacks`` get
    every step's metrics on the main process (MLflow, tests). With ``stop`` (main()), SIGTERM/SIGINT
    end the run at the next step boundary with a checkpoint of it (exit status 128 + signal)."""
    from stages.models import memory

    main_proc = accelerator is None or accelerator.is_main_process
    # model.quantization: auto becomes the base this card trains on, in the checkpoints and adapter.json too
    p = memory.resolve(p, accelerator.device if accelerator else default_device())
    cache, trainer, validator, ident, resume = prepare(p, paths, accelerator, main_proc)
    start = resume.start
    checkpoints = Checkpoints(paths, trainer, ident, resume, p.train.keep_checkpoints, accelerator)
    sinks = open_sinks(paths, start, callbacks) if main_proc else []
    val_dir = progress_dir(paths) / "validation"
    rank, world = trainer.rank, trainer.world
    bar = logs.progress(range(start, p.train.steps), initial=start, total=p.train.steps, desc="train",
                        unit="step", disable=not main_proc)

    def report(metrics: dict, done: int) -> None:  # step ``done``, resolved (StepPipeline)
        divergence.check_step(metrics, done, checkpoints.last)
        for sink in sinks:
            sink(metrics, done)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        log.debug("step %d %s", done, metrics)

    steps = StepPipeline(trainer, report)
    for step in bar:
        halt_if_stopped(stop, checkpoints, step, steps)
        batches = []
        for micro in range(p.train.grad_accum):
            gen = torch.Generator().manual_seed(step_seed(p.seed, step, rank, 1000 + micro))
            batches.append(cache.batch(p.seed, step * p.train.grad_accum + micro, p.train.batch_size,
                                       rank=rank, world=world, flip=p.train.flip, generator=gen))
        steps.launch(batches, step)  # and resolves, checks and logs the step before
        done = step + 1
        validate = validator is not None and validator.due(done)
        snapshot = main_proc and p.train.save_every and done % p.train.save_every == 0
        checkpoint = done % p.train.checkpoint_every == 0 or done == p.train.steps
        if validate or snapshot or checkpoint:
            steps.flush()  # step ``done`` checked and logged before it is rendered or saved
        if validate:
            validator.render(trainer, done, val_dir)
        if snapshot:
            save_snapshot(trainer, cache, p, done, paths.snapshots)
        if checkpoint:
            checkpoints.save(done)
    steps.flush()
    halt_if_stopped(stop, checkpoints, p.train.steps, steps)
    if main_proc:
        export(trainer, cache, p, p.train.steps, paths.lora)
        publish_reports(paths, validator)
        ckpt.mark_finished(paths.checkpoints, p.train.steps)  # a rerun trains again instead of resuming it
    return steps.last


def main() -> None:
    p = params.load()
    logs.setup("train")
    gpus.claim("train", n=p.train.num_processes)  # free GPUs, before CUDA starts (stages/core/gpus.py)
    if p.train.num_processes > 1 and os.environ.get("FLUXIMP_TRAIN_CHILD") != "1":
        sys.exit(launch_distributed(p))
    accelerator = None
    if os.environ.get("FLUXIMP_TRAIN_CHILD") == "1":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    paths = Train()
    with lifecycle.StopSignals("train") as stop:
        if accelerator is not None and not accelerator.is_main_process:  # rank 0 alone talks to MLflow
            run(p, paths, accelerator, stop=stop)
            return
        with tracking.run("train", p, new=True, reads={"cache": paths.cache}):
            run(p, paths, accelerator, callbacks=[lambda m, s: tracking.log_metrics(m, step=s, prefix="train/")],
                stop=stop)
            tracking.log_artifacts([paths.reports / "loss.tsv", paths.lora / "adapter.json"])
            if stop.signal is not None:  # stopped while exporting (DVC may be gone): register nothing
                raise stop.exit("after the export; not registered; rerun to train and register again")
            registry.register_adapter(paths.lora, p, final_step=p.train.steps)  # refused without its metrics


if __name__ == "__main__":
    main()
