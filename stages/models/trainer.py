"""The LoRA training step for Flux: what the train stage runs and what the GPU benchmark times.

:class:`Trainer` owns the transformer with its adapter, the optimizer and the lr schedule.
``Trainer.step(batches, step)`` does one optimizer step over ``len(batches)`` micro-batches
(gradient accumulation): flow-matching loss (stages.models.flow), caption dropout, guidance
embedding, backward, grad-norm clipping, optimizer and scheduler steps. Every random draw of a
step (σ, noise, caption dropout, LoRA dropout) comes from generators seeded by (seed, step,
rank, micro-batch), so a resumed run repeats an uninterrupted one exactly.

A step is two halves, so that the host need not wait for the GPU at every step:
``launch(batches, step)`` queues the step's work on the device and returns a :class:`Pending`
without any host sync (the loss and grad norm stay on the device, copied back asynchronously);
``resolve(pending)`` waits for that step alone and returns its metrics. ``step`` is
``resolve(launch(...))``; the train stage launches step N+1 before it resolves step N
(:class:`StepPipeline`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Callable, Optional

import torch

from stages.models import compiling, flow, lora
from stages.models import offload as offload_lib
from stages.models.cache import Batch

log = logging.getLogger(__name__)
SCHEDULERS = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def step_seed(seed: int, step: int, rank: int = 0, micro: int = 0) -> int:
    return (seed * 1_000_003 + step * 1009 + rank * 101 + micro) % (2 ** 63)


def make_optimizer(params, train_params):
    """The optimizer ``train.optimizer`` names, with its ``train.<optimizer>`` settings:
    ``adamw`` (torch, fused on GPU), ``adamw8bit`` (bitsandbytes), ``prodigy`` (prodigyopt: lr 1.0,
    bias correction, safeguarded warm-up) or ``adafactor`` (transformers, fixed lr by default)."""
    tp = train_params
    if tp.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=tp.lr, weight_decay=tp.weight_decay)
    if tp.optimizer == "prodigy":
        from prodigyopt import Prodigy

        o = tp.prodigy
        return Prodigy(params, lr=tp.lr, betas=tuple(o.betas), weight_decay=tp.weight_decay, decouple=o.decouple,
                       use_bias_correction=o.use_bias_correction, safeguard_warmup=o.safeguard_warmup,
                       d_coef=o.d_coef)
    if tp.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        o = tp.adafactor
        return Adafactor(params, lr=None if o.relative_step else tp.lr, weight_decay=tp.weight_decay,
                         relative_step=o.relative_step, scale_parameter=o.scale_parameter,
                         warmup_init=o.warmup_init)
    fused = all(p.is_cuda for p in params)  # one kernel for the whole update on GPU
    return torch.optim.AdamW(params, lr=tp.lr, weight_decay=tp.weight_decay, fused=fused)


def make_ema(params, train_params):
    """diffusers' EMAModel over the LoRA parameters when ``train.ema_decay`` is set (else None)."""
    if train_params.ema_decay is None:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=train_params.ema_decay, foreach=True)


@dataclasses.dataclass
class Pending:
    """A launched step (:meth:`Trainer.launch`) whose loss and grad norm are not read back yet."""

    step: int
    values: torch.Tensor  # [loss, grad norm], float64; on CUDA a pinned host copy that lands with ``done``
    done: Optional[torch.cuda.Event]  # recorded after the step's last kernel (CUDA only)
    lr: float
    samples: int  # over all processes
    launched: float  # time.perf_counter() when the launch began
    peak_mem_gib: Optional[float]  # CUDA only: the allocator's peak while launching (host bookkeeping)
    finished: Optional[float] = None  # when its work was seen done: the end of launch off CUDA, else resolve


class Trainer:
    def __init__(self, transformer, lora_params, train_params, *, seed: int, device=None,
                 accelerator=None, empty_prompt: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                 offloader=None, kept_blocks: int = 0):
        from diffusers.optimization import get_scheduler

        self.device = torch.device(device) if device is not None else next(transformer.parameters()).device
        self.train_params, self.seed = train_params, seed
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        self.base_dtype = next(p for p in transformer.parameters() if p.is_floating_point()).dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the adapter's initial A matrices depend on the seed only
            self.params = lora.add_lora(transformer, lora_params, torch.float32)
        self.guidance = bool(transformer.config.guidance_embeds)
        self.compiled = compiling.enabled(train_params.compile, self.device)  # on CUDA by default
        if train_params.gradient_checkpointing:  # the first kept_blocks blocks (double ones first) not recomputed
            kept = compiling.repeated_blocks(transformer)[:kept_blocks]
            transformer.enable_gradient_checkpointing(compiling.checkpointing(self.compiled, kept))
        if self.compiled:
            compiling.compile_blocks(transformer)
        self.transformer = transformer
        self.model = transformer  # DDP-wrapped under accelerate
        self.optimizer = make_optimizer(self.params, train_params)
        self.ema = make_ema(self.params, train_params)
        self.scheduler = get_scheduler(SCHEDULERS[train_params.lr_scheduler], self.optimizer,
                                       num_warmup_steps=train_params.warmup_steps,
                                       num_training_steps=train_params.steps)
        if accelerator is not None and accelerator.num_processes > 1:
            self.model = accelerator.prepare_model(transformer)
        self.empty = empty_prompt
        self.offloader = offloader  # stages.models.offload: saved activations in host memory
        self.autocast = self.device.type == "cuda" and self.base_dtype != torch.float32

    # ------------------------------------------------------------------ one micro-batch
    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device without a host sync: on CUDA pinned, then copied asynchronously
        (a copy from pageable memory waits for the work already queued on the GPU)."""
        if self.device.type != "cuda" or t.device.type != "cpu":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        tp = self.train_params
        b = batch.latents.shape[0]
        latents = self.to_device(batch.latents).float()
        _, _, h, w = latents.shape
        x0 = flow.pack(latents)
        prompt, pooled = batch.prompt_embeds, batch.pooled
        if tp.caption_dropout > 0 and self.empty is not None:
            drop = torch.rand(b, generator=generator) < tp.caption_dropout
            if drop.any():
                prompt = torch.where(drop[:, None, None], self.empty[0].to(prompt.dtype).expand_as(prompt), prompt)
                pooled = torch.where(drop[:, None], self.empty[1].to(pooled.dtype).expand_as(pooled), pooled)
        sigmas = flow.sample_sigmas(b, tp.sigma_sampling, generator=generator, logit_mean=tp.logit_mean,
                                    logit_std=tp.logit_std, shift=tp.shift)
        noise = self.to_device(torch.randn(x0.shape, generator=generator))
        sigmas = self.to_device(sigmas)
        xt, target = flow.noisy_and_target(x0, noise, sigmas)
        dtype = self.base_dtype
        hidden, text = xt.to(dtype), self.to_device(prompt).to(dtype)
        if self.compiled:  # the first block's inputs need a gradient like every later block's: one graph
            hidden, text = hidden.detach().requires_grad_(), text.detach().requires_grad_()
        kwargs = dict(
            hidden_states=hidden, encoder_hidden_states=text,
            pooled_projections=self.to_device(pooled).to(dtype), timestep=sigmas.to(dtype),
            img_ids=self.to_device(flow.image_ids(h, w)), txt_ids=flow.text_ids(prompt.shape[1], self.device),
            guidance=torch.full((b,), tp.guidance, device=self.device) if self.guidance else None,
            return_dict=False)
        offload = offload_lib.activations(self.offloader) if self.offloader else contextlib.nullcontext()
        with offload, torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast):
            pred = self.model(**kwargs)[0]
        return flow.flow_loss(pred, target)

    # ------------------------------------------------------------------ one optimizer step
    def accumulate(self, batches: list[Batch], step: int) -> torch.Tensor:
        """Forward and backward over the micro-batches (gradients summed); returns the mean loss as a
        float64 tensor on the device (summed there: reading it back would wait for the GPU)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro, batch in enumerate(batches):
            seed = step_seed(self.seed, step, self.rank, micro)
            torch.manual_seed(seed)  # LoRA dropout
            gen = torch.Generator().manual_seed(seed)
            last = micro == len(batches) - 1
            sync = contextlib.nullcontext() if last or self.model is self.transformer else self.model.no_sync()
            with sync:
                loss = self.loss(batch, gen) / len(batches)
                loss.backward()
            total = total + loss.detach().double()
        return total

    def launch(self, batches: list[Batch], step: int) -> Pending:
        """Queue one optimizer step over the micro-batches on the device; no host sync (the loss and
        grad norm are read back by :meth:`resolve`)."""
        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.model.train()
        compiling.step_begin(self.transformer)
        # the first call of compiled blocks builds them; if that fails the step reruns eager
        total = compiling.run_first(lambda: self.accumulate(batches, step), self.transformer,
                                    on_fallback=lambda: self.optimizer.zero_grad(set_to_none=True))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.train_params.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        if self.world > 1:  # the mean loss over processes (queued like the rest)
            total = total.reshape(1)
            torch.distributed.all_reduce(total)
            total = total[0] / self.world
        values = torch.stack([total, grad_norm.to(total.device, torch.float64)])
        done = peak = None
        if cuda:
            values = values.to("cpu", non_blocking=True)  # into pinned memory, behind the step's kernels
            done = torch.cuda.Event()
            done.record()
            peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        samples = sum(b.latents.shape[0] for b in batches) * self.world
        finished = None if cuda else time.perf_counter()  # off CUDA the work ran in this call
        return Pending(step, values, done, lr, samples, t0, peak, finished)

    def resolve(self, pending: Pending, since: Optional[float] = None) -> dict:
        """Wait for a launched step and return its metrics; ``step_time`` runs to ``pending.finished``
        from ``since`` (a ``time.perf_counter()``: when the step before finished) or else from its launch."""
        if pending.done is not None:
            pending.done.synchronize()  # this step's work only, not the steps launched after it
        if pending.finished is None:
            pending.finished = time.perf_counter()
        dt = pending.finished - (pending.launched if since is None else since)
        loss, grad_norm = pending.values.tolist()
        metrics = {"loss": loss, "lr": pending.lr, "grad_norm": grad_norm, "step_time": dt,
                   "samples_per_s": pending.samples / dt}
        if pending.peak_mem_gib is not None:
            metrics["peak_mem_gib"] = pending.peak_mem_gib
        return metrics

    def step(self, batches: list[Batch], step: int) -> dict:
        """One optimizer step over the micro-batches, waited for; returns the step's metrics."""
        return self.resolve(self.launch(batches, step))

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        state = {"lora": lora.lora_state_dict(self.transformer), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        lora.set_lora_state_dict(self.transformer, state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])

    @contextlib.contextmanager
    def ema_weights(self):
        """The transformer's LoRA holds the EMA weights inside the block (for exporting them)."""
        if self.ema is None:
            raise ValueError("no EMA: train.ema_decay is not set")
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)


class StepPipeline:
    """Training steps one ahead of their bookkeeping: :meth:`launch` queues a step on the device
    (Trainer.launch), then resolves the step before it (Trainer.resolve, the one host sync) and hands
    its metrics to ``report(metrics, done)``, so the GPU runs step N+1 while the host checks and logs
    step N and loads the next batches. :meth:`flush` resolves the pending step: call it before
    anything that needs the run settled (a checkpoint, validation, a snapshot, a stop, the export).
    Every step is reported once, in order. ``step_time``: from when the step before was seen finished
    (in a steady run, the GPU's time per step), or from its own launch after a flush."""

    def __init__(self, trainer: Trainer, report: Callable[[dict, int], None]):
        self.trainer, self.report = trainer, report
        self.pending = None
        self.since: float | None = None  # when the step before finished (None: after a flush)
        self.last: dict = {}  # the metrics of the last step resolved

    def launch(self, batches: list[Batch], step: int) -> None:
        try:
            launched = self.trainer.launch(batches, step)
        except BaseException:
            self.flush()  # the step before still gets its check and its row
            raise
        self.resolve_pending()
        self.pending = launched

    def flush(self) -> None:
        self.resolve_pending()
        self.since = None

    def resolve_pending(self) -> None:
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        self.last = self.trainer.resolve(pending, since=self.since)
        self.since = pending.finished
        self.report(self.last, pending.step + 1)
