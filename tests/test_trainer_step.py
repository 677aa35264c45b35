"""One optimizer step of stages.models.trainer.Trainer, pinned piece by piece on the tiny model (fast,
no train stage): the per-(seed, step, rank, micro-batch) seeds, gradient accumulation (mean loss,
summed gradients, DDP's no_sync on all but the last micro-batch), clipping, the lr schedules, the
optimizers and their settings, EMA, caption dropout, multi-process bookkeeping, and a state
round trip that continues exactly. (The objective itself: tests/test_objective.py.)"""
import contextlib
import copy
import math
import time

import pytest
import torch

from stages.core.params import Lora, Train
from stages.models import compiling
from stages.models.trainer import StepPipeline, Trainer, make_ema, make_optimizer, step_seed
from tests.test_objective import B, D, L, Oracle, draws, make_batch, ref_pack, tiny_transformer  # noqa: F401


def make(transformer, *, seed=0, lora=None, accelerator=None, empty=None, device="cpu", **train) -> Trainer:
    tp = Train(**{"resolution": 32, "steps": 4, "warmup_steps": 0, "caption_dropout": 0.0, **train})
    return Trainer(copy.deepcopy(transformer), lora or Lora(rank=4), tp, seed=seed, device=device,
                   accelerator=accelerator, empty_prompt=empty)


def lora_tensors(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.params]


class Wrapper(torch.nn.Module):
    """What accelerate's DDP wrapper looks like to the trainer: forward, and no_sync()."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.syncing = inner, True

    def forward(self, **kw):
        return self.inner(**kw)

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True


class Accelerator:
    def __init__(self, index: int, processes: int):
        self.process_index, self.num_processes, self.prepared = index, processes, []

    def prepare_model(self, model):
        self.prepared.append(model)
        return Wrapper(model)


def spy_loss(trainer, values):
    """Replace Trainer.loss: micro-batch i's loss is ``values[i] * sum(first LoRA tensor)``; records
    the seeds of the generator and of torch's global RNG it was called with, and whether the
    (wrapped) model was syncing gradients."""
    calls = []

    def loss(batch, generator):
        calls.append({"gen": generator.initial_seed(), "global": torch.initial_seed(),
                      "syncing": getattr(trainer.model, "syncing", True)})
        return values[len(calls) - 1] * trainer.params[0].sum()

    trainer.loss = loss
    return calls


def test_step_seeds_are_distinct_valid_seeds_for_every_seed_step_rank_and_micro_batch():
    seeds = [step_seed(s, t, r, m) for s in (0, 1, 2 ** 32 - 1) for t in range(2000) for r in range(4) for m in range(4)]
    assert len(set(seeds)) == len(seeds)
    assert all(type(x) is int and 0 <= x < 2 ** 63 for x in seeds)
    torch.Generator().manual_seed(max(seeds))  # within torch's seed range


def test_accumulation_means_the_loss_sums_the_gradients_and_seeds_each_micro_batch(tiny_transformer):
    t = make(tiny_transformer, seed=5)
    calls = spy_loss(t, [1.0, 2.0, 6.0])
    total = t.params[0].sum().item()
    got = t.accumulate([make_batch(0), make_batch(1), make_batch(2)], step=7)
    assert got.dtype == torch.float64 and got.shape == ()  # summed on the device, read back by resolve
    assert got.item() == pytest.approx(3.0 * total, rel=1e-6)  # mean of 1, 2, 6 times the sum
    assert torch.allclose(t.params[0].grad, torch.full_like(t.params[0], 3.0))
    want = [step_seed(5, 7, 0, micro) for micro in range(3)]
    assert [c["gen"] for c in calls] == want and [c["global"] for c in calls] == want  # LoRA dropout too
    assert len(set(want)) == 3


def test_ddp_syncs_gradients_on_the_last_micro_batch_only(tiny_transformer):
    acc = Accelerator(1, 2)
    t = make(tiny_transformer, accelerator=acc)
    assert isinstance(t.model, Wrapper) and acc.prepared == [t.transformer]
    assert (t.rank, t.world) == (1, 2)
    calls = spy_loss(t, [1.0, 1.0, 1.0])
    t.accumulate([make_batch()] * 3, step=2)
    assert [c["syncing"] for c in calls] == [False, False, True]
    assert [c["gen"] for c in calls] == [step_seed(0, 2, 1, micro) for micro in range(3)]  # this process's rank


def test_one_process_is_not_wrapped(tiny_transformer):
    acc = Accelerator(0, 1)
    t = make(tiny_transformer, accelerator=acc)
    assert t.model is t.transformer and acc.prepared == [] and (t.rank, t.world) == (0, 1)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_the_step_reports_the_mean_loss_the_unclipped_norm_and_the_lr_and_clips(tiny_transformer, monkeypatch):
    batches = [make_batch(0), make_batch(1)]
    ref = make(tiny_transformer, max_grad_norm=1e-4, warmup_steps=2)
    loss = ref.accumulate(batches, 0).item()
    norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.params])))
    assert norm > 1e-3  # so clipping to 1e-4 does something

    t = make(tiny_transformer, max_grad_norm=1e-4, warmup_steps=2)
    seen = []
    real_step = t.optimizer.step
    monkeypatch.setattr(t.optimizer, "step", lambda: seen.append(
        float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.params])))) or real_step())
    before = lora_tensors(t)
    t0 = time.perf_counter()
    m = t.step(batches, 0)
    wall = time.perf_counter() - t0
    assert set(m) == {"loss", "lr", "grad_norm", "step_time", "samples_per_s"}  # no peak_mem_gib on CPU
    assert m["loss"] == loss and m["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert seen == [pytest.approx(1e-4, rel=1e-3)]  # the optimizer got the clipped gradients
    assert m["lr"] == 0.0 and t.scheduler.get_last_lr()[0] == pytest.approx(0.5e-2)  # warm-up 0/2, then 1/2
    assert all(p.grad is None for p in t.params)
    assert 0 < m["step_time"] <= wall and m["samples_per_s"] == pytest.approx(2 * B / m["step_time"])
    # lr 0 at the first warm-up step: AdamW's weight decay and update are both 0
    assert all(torch.equal(a, b) for a, b in zip(before, lora_tensors(t)))
    t.step(batches, 1)
    assert any(not torch.equal(a, b) for a, b in zip(before, lora_tensors(t)))


@pytest.mark.parametrize("schedule,want", [
    ("constant", [1.0, 1.0, 1.0, 1.0]),
    ("linear", [1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]),
])
def test_lr_schedules(tiny_transformer, schedule, want):
    t = make(tiny_transformer, lr_scheduler=schedule, steps=4, lr=0.1)
    t.loss = lambda batch, generator: t.params[0].sum()
    lrs = [t.step([make_batch()], step)["lr"] for step in range(4)]
    assert lrs == pytest.approx([0.1 * w for w in want])


def test_other_processes_average_the_reported_loss(tiny_transformer, monkeypatch):
    """The reported loss is the mean over processes (all_reduce sums: here another process adds 1.0)."""
    t = make(tiny_transformer, accelerator=Accelerator(0, 2))
    t.loss = lambda batch, generator: 3.0 * t.params[0].sum() / t.params[0].sum().detach()
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda x: x.add_(1.0))
    m = t.step([make_batch()], 0)
    assert m["loss"] == pytest.approx((3.0 + 1.0) / 2)
    assert m["samples_per_s"] == pytest.approx(2 * B / m["step_time"])  # both processes' samples


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "prodigy", "adafactor", "adafactor-relative"])
def test_each_optimizer_gets_its_settings(name):
    params = [torch.nn.Parameter(torch.zeros(4))]
    if name == "adamw":
        opt = make_optimizer(params, Train(lr=0.03, weight_decay=0.2))
        assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is False  # fused on GPU only
    elif name == "adamw8bit":
        import bitsandbytes as bnb

        opt = make_optimizer(params, Train(optimizer="adamw8bit", lr=0.03, weight_decay=0.2))
        assert type(opt) is bnb.optim.AdamW8bit
    elif name == "prodigy":
        from prodigyopt import Prodigy

        opt = make_optimizer(params, Train(optimizer="prodigy", lr=1.0, weight_decay=0.2, prodigy=dict(
            betas=[0.8, 0.95], decouple=False, use_bias_correction=False, safeguard_warmup=False, d_coef=2.5)))
        assert type(opt) is Prodigy
        assert {k: opt.defaults[k] for k in ("lr", "betas", "decouple", "use_bias_correction", "safeguard_warmup",
                                             "d_coef")} == dict(lr=1.0, betas=(0.8, 0.95), decouple=False,
                                                                use_bias_correction=False, safeguard_warmup=False,
                                                                d_coef=2.5)
    else:
        from transformers.optimization import Adafactor

        relative = name == "adafactor-relative"
        opt = make_optimizer(params, Train(optimizer="adafactor", lr=0.03, weight_decay=0.2, adafactor=dict(
            relative_step=relative, scale_parameter=not relative, warmup_init=relative)))
        assert type(opt) is Adafactor
        assert {k: opt.defaults[k] for k in ("lr", "relative_step", "scale_parameter", "warmup_init")} == dict(
            lr=None if relative else 0.03, relative_step=relative, scale_parameter=not relative, warmup_init=relative)
        return
    assert opt.defaults["weight_decay"] == 0.2 and opt.defaults["lr"] == (1.0 if name == "prodigy" else 0.03)


def test_ema_follows_train_ema_decay():
    params = [torch.nn.Parameter(torch.zeros(4))]
    assert make_ema(params, Train()) is None
    ema = make_ema(params, Train(ema_decay=0.7))
    assert ema.decay == 0.7 and ema.foreach is True


def test_the_adapter_init_depends_on_the_seed_only_and_leaves_the_global_rng_alone(tiny_transformer):
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = lora_tensors(make(tiny_transformer, seed=3))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    assert all(torch.equal(x, y) for x, y in zip(a, lora_tensors(make(tiny_transformer, seed=3))))
    assert any(not torch.equal(x, y) for x, y in zip(a, lora_tensors(make(tiny_transformer, seed=4))))


def test_device_settings_checkpointing_and_compile_on_cpu(tiny_transformer):
    t = make(tiny_transformer, device=None, gradient_checkpointing=True)
    assert t.device == torch.device("cpu") and t.transformer.is_gradient_checkpointing
    assert not make(tiny_transformer).transformer.is_gradient_checkpointing
    assert not compiling.is_compiled(t.transformer)  # train.compile auto: CUDA only
    bf16 = make(copy.deepcopy(tiny_transformer).to(torch.bfloat16))
    assert bf16.base_dtype == torch.bfloat16 and bf16.autocast is False  # autocast on CUDA only
    seen = {}
    bf16.model.register_forward_pre_hook(lambda mod, args, kw: seen.update(kw), with_kwargs=True)
    assert torch.isfinite(bf16.loss(make_batch(), torch.Generator().manual_seed(0)))  # inputs cast to the base's dtype
    assert {k: seen[k].dtype for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")} \
        == dict.fromkeys(("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"), torch.bfloat16)


def test_caption_dropout_swaps_in_the_empty_prompt_from_the_step_generator(tiny_transformer):
    empty = (torch.full((1, L, D), 7.0), torch.full((1, D), 9.0))
    batch = make_batch()

    def seen(p, with_empty=True):
        t = make(tiny_transformer, sigma_sampling="uniform", caption_dropout=p, empty=empty if with_empty else None)
        t.model = oracle = Oracle(ref_pack(batch.latents))
        t.loss(batch, torch.Generator().manual_seed(4))
        return oracle.seen

    g = torch.Generator().manual_seed(4)
    drop = torch.rand(B, generator=g) < 0.5  # the step's first draw
    assert 0 < drop.sum() < B
    half = seen(0.5)
    for i in range(B):
        want = (empty[0][0], empty[1][0]) if drop[i] else (batch.prompt_embeds[i], batch.pooled[i])
        assert torch.equal(half["encoder_hidden_states"][i], want[0])
        assert torch.equal(half["pooled_projections"][i], want[1])
    assert torch.equal(half["timestep"], torch.rand(B, generator=g).clamp(1e-4, 1 - 1e-4))  # then σ
    for p, with_empty in ((0.0, True), (0.5, False)):  # no dropout: no draw, the prompts untouched
        s = seen(p, with_empty)
        assert torch.equal(s["encoder_hidden_states"], batch.prompt_embeds)
        assert torch.equal(s["timestep"], draws(4, B, (1,))[0])
    assert torch.equal(seen(1.0)["pooled_projections"], empty[1].expand(B, D))


def test_state_round_trip_continues_exactly_with_ema(tiny_transformer):
    batches = [make_batch(0)]
    a = make(tiny_transformer, ema_decay=0.5, lr_scheduler="linear")
    for step in range(2):
        a.step(batches, step)
    assert a.ema.optimization_step == 2
    state = a.state_dict()
    assert set(state) == {"lora", "optimizer", "scheduler", "ema"}
    b = make(tiny_transformer, ema_decay=0.5, lr_scheduler="linear")
    b.load_state_dict(copy.deepcopy(state))
    ma, mb = a.step(batches, 2), b.step(batches, 2)
    assert (ma["loss"], ma["lr"], ma["grad_norm"]) == (mb["loss"], mb["lr"], mb["grad_norm"])
    assert all(torch.equal(x, y) for x, y in zip(lora_tensors(a), lora_tensors(b)))
    assert all(torch.equal(x, y) for x, y in zip(a.ema.shadow_params, b.ema.shadow_params))
    # a state without EMA (saved before train.ema_decay was set) loads; without EMA there is none to save
    plain = make(tiny_transformer)
    assert "ema" not in plain.state_dict()
    make(tiny_transformer, ema_decay=0.5).load_state_dict(plain.state_dict())


def test_ema_weights_are_swapped_in_and_back(tiny_transformer):
    with pytest.raises(ValueError, match=r"^no EMA: train.ema_decay is not set$"):
        with make(tiny_transformer).ema_weights():
            pass
    t = make(tiny_transformer, ema_decay=0.5)
    for step in range(3):
        t.step([make_batch()], step)
    trained, shadow = lora_tensors(t), [s.clone() for s in t.ema.shadow_params]
    assert any(not torch.equal(x, y) for x, y in zip(trained, shadow))
    with pytest.raises(RuntimeError, match="boom"):
        with t.ema_weights():
            assert all(torch.equal(x, y) for x, y in zip(lora_tensors(t), shadow))
            raise RuntimeError("boom")
    assert all(torch.equal(x, y) for x, y in zip(lora_tensors(t), trained))



def test_the_forward_pass_saves_its_activations_through_the_offloader(tiny_transformer):
    """train.offload_activations: the tensors autograd saves go through the offloader's hooks and the
    gradients are those of the plain step (tests/test_memory.py trains a whole adapter this way)."""
    from stages.models import offload

    off = offload.Offloader(min_bytes=0)
    plain = make(tiny_transformer)
    hooked = Trainer(copy.deepcopy(tiny_transformer), Lora(rank=4), plain.train_params, seed=0, device="cpu",
                     offloader=off)
    for t in (plain, hooked):
        t.accumulate([make_batch()], step=0)
    assert off.packed > 0
    assert all(torch.allclose(a.grad, b.grad, atol=1e-6) for a, b in zip(plain.params, hooked.params))


# ----------------------------------------------------------------------------- launch / resolve (issue 23)
@pytest.mark.parametrize("settings", [{}, {"ema_decay": 0.5, "lr_scheduler": "linear", "caption_dropout": 0.5}])
def test_launch_and_resolve_pipelined_are_the_step(tiny_transformer, settings):
    """Launching step k+1 before resolving step k (what the train stage does) gives the metrics, the
    adapter, the optimizer and the EMA of plain steps, exactly."""
    empty = (torch.zeros(1, L, D), torch.zeros(1, D))
    plain, piped = (make(tiny_transformer, seed=3, empty=empty, **settings) for _ in range(2))
    batches = [[make_batch(k), make_batch(k + 10)] for k in range(4)]  # 2 micro-batches a step
    want = [plain.step(b, k) for k, b in enumerate(batches)]
    got, pending = [], None
    for k, b in enumerate(batches):
        launched = piped.launch(b, k)
        assert launched.step == k and launched.samples == 2 * B and launched.peak_mem_gib is None  # CPU
        if pending is not None:
            got.append(piped.resolve(pending))
        pending = launched
    got.append(piped.resolve(pending))
    deterministic = ("loss", "lr", "grad_norm")
    assert [{k: m[k] for k in deterministic} for m in got] == [{k: m[k] for k in deterministic} for m in want]
    assert all(set(m) == set(w) and type(m["loss"]) is float for m, w in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(lora_tensors(plain), lora_tensors(piped)))
    assert str(plain.optimizer.state_dict()) == str(piped.optimizer.state_dict())
    if plain.ema is not None:
        assert all(torch.equal(a, b) for a, b in zip(plain.ema.shadow_params, piped.ema.shadow_params))


def test_resolve_times_the_step_to_its_finish_from_its_launch_or_from_since(tiny_transformer):
    t = make(tiny_transformer)
    before = time.perf_counter()
    pending = t.launch([make_batch()], 0)
    assert before <= pending.launched <= pending.finished <= time.perf_counter()  # on CPU: done in launch
    end = pending.finished
    time.sleep(0.01)  # resolving later does not move the finish: off CUDA the work was done in launch
    m = t.resolve(pending, since=before - 100.0)  # e.g. when the step before finished
    assert pending.finished == end
    assert m["step_time"] == end - (before - 100.0) and m["samples_per_s"] == B / m["step_time"]
    pending = t.launch([make_batch()], 1)
    m = t.resolve(pending)
    assert m["step_time"] == pending.finished - pending.launched > 0


def test_the_step_pipeline_reports_every_step_once_in_order_one_step_behind(tiny_transformer):
    t = make(tiny_transformer)
    events, pendings = [], []
    real_launch, real_resolve = t.launch, t.resolve
    t.launch = lambda b, step: events.append(f"L{step}") or pendings.append(real_launch(b, step)) or pendings[-1]
    t.resolve = lambda p, since=None: events.append(f"R{p.step}") or real_resolve(p, since)
    reported = []
    steps = StepPipeline(t, lambda metrics, done: reported.append((done, metrics["step_time"])))
    assert steps.last == {}  # nothing resolved yet: what train.run returns when there is no step to train
    for step in range(3):
        steps.launch([make_batch()], step)
    steps.flush()
    steps.launch([make_batch()], 3)
    steps.launch([make_batch()], 4)
    assert events == ["L0", "L1", "R0", "L2", "R1", "R2", "L3", "L4", "R3"]
    assert [done for done, _ in reported] == [1, 2, 3, 4] and steps.pending is pendings[4]
    finished = [p.finished for p in pendings]
    assert [dt for _, dt in reported] == [finished[0] - pendings[0].launched, finished[1] - finished[0],
                                          finished[2] - finished[1], finished[3] - pendings[3].launched]
    assert steps.last["step_time"] == reported[-1][1]

    def broken(b, step):
        raise RuntimeError("out of memory")

    t.launch = broken  # a failing launch still checks and reports the step before it
    with pytest.raises(RuntimeError, match="out of memory"):
        steps.launch([make_batch()], 5)
    assert [done for done, _ in reported] == [1, 2, 3, 4, 5] and steps.pending is None


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_launch_reads_nothing_back_from_the_device(tiny_transformer, monkeypatch):
    """No host sync in launch: reading a tensor's value (item, float, tolist, bool, numpy) or
    synchronizing CUDA fails inside it; the CPU optimizer alone may read its own step counter (a host
    tensor there; fused AdamW on CUDA keeps it on the device)."""
    t = make(tiny_transformer, ema_decay=0.5, accelerator=Accelerator(0, 2))
    t.model = t.transformer  # two processes' bookkeeping (the loss all_reduce) on one process
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda x: x.mul_(2.0))
    armed = [False]

    def trap(owner, name):
        real = getattr(owner, name)

        def read(*a, **k):
            if armed[0]:
                raise AssertionError(f"launch called {name}")
            return real(*a, **k)
        monkeypatch.setattr(owner, name, read)

    for name in ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "cpu"):
        trap(torch.Tensor, name)
    for owner in (torch.cuda, torch.cuda.Event, torch.cuda.Stream):
        trap(owner, "synchronize")
    real_opt_step = t.optimizer.step

    def optimizer_step(*a, **k):
        armed[0] = False
        try:
            return real_opt_step(*a, **k)
        finally:
            armed[0] = True

    monkeypatch.setattr(t.optimizer, "step", optimizer_step)
    ref = make(tiny_transformer, ema_decay=0.5)
    want = ref.step([make_batch(0), make_batch(1)], 0)
    armed[0] = True
    pending = t.launch([make_batch(0), make_batch(1)], 0)
    armed[0] = False
    m = t.resolve(pending)
    assert m["loss"] == want["loss"] and m["grad_norm"] == want["grad_norm"]  # (2 x loss) / 2 processes
    assert all(torch.equal(a, b) for a, b in zip(lora_tensors(ref), lora_tensors(t)))


@pytest.mark.parametrize("setting,compiled", [(True, True), (False, False), ("auto", False)])  # auto: CUDA only
def test_train_compile_decides_whether_the_blocks_are_compiled(tiny_transformer, setting, compiled):
    from stages.models import compiling

    t = make(tiny_transformer, compile=setting)
    assert t.compiled is compiled and compiling.is_compiled(t.transformer) is compiled


def test_kept_blocks_skip_checkpointing_double_blocks_first_with_the_same_gradients(tiny_transformer, monkeypatch):
    """train.gradient_checkpointing with ``kept_blocks`` (what a card with room gets, stages.models.memory):
    the first blocks (the double ones first) run without checkpointing, the rest are checkpointed,
    and the gradients are those of checkpointing every block."""
    real = torch.utils.checkpoint.checkpoint
    checkpointed = []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda fn, *a, **k: checkpointed.append(fn.__self__) or real(fn, *a, **k))
    n = len(compiling.repeated_blocks(tiny_transformer))
    doubles = len(tiny_transformer.transformer_blocks)
    assert 0 < doubles < n
    grads = {}
    for keep in (0, doubles + 1, n):
        checkpointed.clear()
        tp = Train(resolution=32, steps=4, warmup_steps=0, caption_dropout=0.0, gradient_checkpointing=True)
        t = Trainer(copy.deepcopy(tiny_transformer), Lora(rank=4), tp, seed=0, device="cpu", kept_blocks=keep)
        t.accumulate([make_batch()], step=0)
        blocks = compiling.repeated_blocks(t.transformer)
        assert blocks[:doubles] == list(t.transformer.transformer_blocks)  # double blocks come first
        assert [id(b) for b in checkpointed] == [id(b) for b in blocks[keep:]]
        grads[keep] = [p.grad.clone() for p in t.params]
    for keep in (doubles + 1, n):
        assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(grads[0], grads[keep]))
    assert any(g.abs().sum() > 0 for g in grads[0])
    checkpointed.clear()  # by default (the CPU, offload, no room) every block is checkpointed
    t = make(tiny_transformer, gradient_checkpointing=True)
    t.accumulate([make_batch()], step=0)
    assert [id(b) for b in checkpointed] == [id(b) for b in compiling.repeated_blocks(t.transformer)]
