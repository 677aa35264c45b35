"""train stage on the tiny model: loss falls, exports load and change the pipeline's output,
quantized bases train, and an interrupted + resumed run ends with the same adapter."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stages.core.params import Model
from stages.core.prompts import read_prompts
from tests import trainkit

FAST = trainkit.FAST
run_train = trainkit.run_train


def test_loss_falls_and_exports_work(workdir):
    log = run_train(workdir, train__steps=40, lora__targets="all", lora__rank=8, train__checkpoint_every=20)
    assert [int(r["step"]) for r in log] == list(range(1, 41))
    first, last = (sum(r["loss"] for r in part) / 10 for part in (log[:10], log[-10:]))
    assert last < 0.85 * first, (first, last)
    assert all(r["lr"] > 0 and r["grad_norm"] >= 0 for r in log)
    assert list(log[0]) == ["step", "loss", "lr", "grad_norm"]  # timings are not in the hashed curve
    timings = (workdir / "reports/train/timings.tsv").read_text().splitlines()
    assert timings[0].split("\t")[:3] == ["step", "step_time", "samples_per_s"] and len(timings) == 41
    assert all(float(r.split("\t")[2]) > 0 for r in timings[1:])
    out = workdir / "models/lora"
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["rank"] == 8 and meta["steps"] == 40 and meta["targets"] == "all"
    assert meta["data_hash"] == json.loads((workdir / "data/cache/index.json").read_text())["data_hash"]
    state = load_file(out / "pytorch_lora_weights.safetensors")
    assert {t.shape[0] for k, t in state.items() if "lora_A" in k} == {8}
    kohya = load_file(out / "lora_kohya.safetensors")
    assert any(k.endswith(".alpha") for k in kohya) and all(k.startswith("lora_unet_") for k in kohya)
    assert sorted(p.name for p in (workdir / "models/checkpoints").glob("step-*")) == ["step-000020", "step-000040"]

    from stages.models import flux

    pipe = flux.load_pipeline(Model(base="tiny-random"), device="cpu")
    kw = dict(num_inference_steps=2, height=32, width=32, guidance_scale=3.5, max_sequence_length=16,
              output_type="np")
    base = pipe("a striped field", generator=torch.Generator().manual_seed(0), **kw).images[0]
    pipe.load_lora_weights(str(out))
    tuned = pipe("a striped field", generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert abs(tuned - base).mean() > 1e-3


@pytest.mark.parametrize("quantization,optimizer", [("nf4", "adamw8bit"), ("int8", "adamw")])
def test_quantized_bases_train(workdir, monkeypatch, quantization, optimizer):
    from stages.models import flux

    loaded = []
    real_load = flux.load_transformer
    monkeypatch.setattr(flux, "load_transformer", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    log = run_train(workdir, model__quantization=quantization, train__optimizer=optimizer, train__steps=4,
                    train__checkpoint_every=4)
    # the base that trained really was quantized: every linear layer of its blocks (LoRA's own aside)
    (transformer,) = loaded
    blocks = [m for name in ("transformer_blocks", "single_transformer_blocks") for m in getattr(transformer, name)]
    base = [(n, m) for b in blocks for n, m in b.named_modules()
            if type(m).__name__ in ("Linear", "Linear4bit") and "lora_" not in n and not hasattr(m, "base_layer")]
    assert len(base) > 10
    for n, m in base:
        if quantization == "nf4":
            assert type(m).__name__ == "Linear4bit" and m.weight.dtype == torch.uint8, n
        else:  # torchao int8 weight-only: a quantized tensor subclass holding int8 data
            assert type(m.weight).__name__ not in ("Parameter", "Tensor"), n
            assert "int8" in repr(m.weight).lower() or "Int8" in type(m.weight).__name__, n
        assert not m.weight.requires_grad, n
    lora_params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    assert lora_params and all(p.requires_grad and p.dtype == torch.float32 for p in lora_params)
    assert len(log) == 4 and all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in log)
    state = load_file(workdir / "models/lora/pytorch_lora_weights.safetensors")
    assert any(t.abs().sum() > 0 for k, t in state.items() if "lora_B" in k)  # B moved off its zero init
    assert json.loads((workdir / "models/lora/adapter.json").read_text())["quantization"] == quantization


class Interrupt(Exception):
    pass


def test_interrupted_and_resumed_run_matches_uninterrupted(workdir, tmp_path_factory, monkeypatch):
    params = dict(train__steps=10, train__checkpoint_every=3, train__keep_checkpoints=2, lora__dropout=0.1,
                  train__caption_dropout=0.3, train__sigma_sampling="shift", train__lr_scheduler="cosine",
                  train__warmup_steps=2)
    run_train(workdir, **params)
    reference = load_file(workdir / "models/lora/pytorch_lora_weights.safetensors")

    other = tmp_path_factory.mktemp("resumed")
    shutil.copytree(workdir / "data/cache", other / "data/cache")

    def crash(metrics, step):
        if step == 7:  # after the step-6 checkpoint: steps 7.. must be redone on resume
            raise Interrupt

    with pytest.raises(Interrupt):
        run_train(other, callbacks=[crash], **params)
    assert not (other / "models/lora").exists()
    assert sorted(p.name for p in (other / "models/checkpoints").glob("step-*")) == ["step-000003", "step-000006"]
    (other / "models/checkpoints/.step-000009.x.tmp").mkdir()  # a save killed half-way
    from stages import train

    trained = []
    real_launch = train.Trainer.launch
    monkeypatch.setattr(train.Trainer, "launch", lambda self, batches, step: trained.append(step) or
                        real_launch(self, batches, step))
    log = run_train(other, **params)
    assert trained == [6, 7, 8, 9]  # the resumed process trained steps 7-10 only, from the step-6 checkpoint
    resumed = load_file(other / "models/lora/pytorch_lora_weights.safetensors")
    assert [int(r["step"]) for r in log] == list(range(1, 11))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert not (other / "models/checkpoints/.step-000009.x.tmp").exists()


def test_changed_lora_params_do_not_resume_stale_checkpoints(workdir):
    run_train(workdir, train__steps=3, train__checkpoint_every=3)
    log = run_train(workdir, train__steps=3, train__checkpoint_every=3, lora__rank=2)
    assert [int(r["step"]) for r in log] == [1, 2, 3]
    state = load_file(workdir / "models/lora/pytorch_lora_weights.safetensors")
    assert {t.shape[0] for k, t in state.items() if "lora_A" in k} == {2}


def test_validation_prompts_seeds_and_resolution_from_config(workdir):
    prompts = workdir / "val.txt"
    prompts.write_text("# mine\na harbour\na bowl of pears\n")
    run_train(workdir, train__steps=4, train__validate_every=2, train__validation_steps=2, train__checkpoint_every=4,
              train__validation_prompts=str(prompts), train__validation_seeds=[3, 5], train__validation_resolution=48,
              train__validation_guidance=2.0)
    val = workdir / "reports/train/validation"
    index = json.loads((val / "index.json").read_text())
    assert index["prompts"] == ["a harbour, impressionism style", "a bowl of pears, impressionism style"]
    assert (index["seeds"], index["resolution"], index["guidance"], index["every"]) == ([3, 5], 48, 2.0, 2)
    assert index["images"] == sorted(f"step-{s:06d}-p{k}-s{seed}.png" for s in (2, 4) for k in (0, 1) for seed in (3, 5))
    from PIL import Image

    assert Image.open(val / index["images"][0]).size == (48, 48)
    a, b = (np.asarray(Image.open(val / f"step-000004-p0-s{seed}.png")) for seed in (3, 5))
    assert np.abs(a.astype(int) - b).mean() > 0  # the seeds differ


def test_validation_renders_the_plans_batch_per_call_with_the_same_images(workdir, monkeypatch):
    """The 80 GiB class renders its validation images 4 per call (room beside training); the images are
    those of one per call within float noise, and every (prompt, seed) keeps its file."""
    import dataclasses

    from PIL import Image

    from stages.models import memory, render

    prompts = workdir / "val.txt"
    prompts.write_text("a harbour\na bowl of pears\na poplar row\n")
    settings = dict(train__steps=2, train__validate_every=2, train__validation_steps=2, train__checkpoint_every=2,
                    train__validation_prompts=str(prompts), train__validation_resolution=32)
    val = workdir / "reports/train/validation"

    def images():
        return {p.name: np.asarray(Image.open(p), dtype=int) for p in sorted(val.glob("step-*.png"))}

    run_train(workdir, **settings)
    one = images()
    calls = []
    real = render.denoise
    monkeypatch.setattr(render, "denoise", lambda pipe, embeds, *a, **k: calls.append(
        (len(embeds), k.get("batch_size"))) or real(pipe, embeds, *a, **k))
    monkeypatch.setattr(memory, "UNCONSTRAINED", dataclasses.replace(memory.UNCONSTRAINED, validation_batch=2))
    shutil.rmtree(workdir / "models")
    run_train(workdir, **settings)
    assert calls == [(3, 2)]  # 3 images, 2 per call
    two = images()
    assert sorted(two) == sorted(one) == [f"step-000002-p{k}-s0.png" for k in range(3)]
    assert all(np.abs(two[n] - one[n]).max() <= 2 for n in one)
    assert memory.PLANS[80].validation_batch == 4 and all(memory.PLANS[c].validation_batch == 1 for c in (8, 24, 40))


def test_validation_defaults_to_the_sample_prompt_file(workdir):
    smoke = trainkit.params.ROOT / "conf/prompts/smoke.txt"
    run_train(workdir, train__steps=1, train__validate_every=1, train__validation_steps=1, train__checkpoint_every=1,
              sample__prompts=str(smoke))
    index = json.loads((workdir / "reports/train/validation/index.json").read_text())
    assert len(index["prompts"]) == len([ln for ln in smoke.read_text().splitlines() if ln.strip()])
    assert len(index["images"]) == len(index["prompts"])  # one seed by default


def test_validation_embeds_prompts_before_the_transformer_loads(workdir, monkeypatch):
    from stages.models import flux, render

    order = []
    for module, name in ((render, "embed_prompts"), (flux, "load_text_encoders"), (flux, "load_transformer")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: order.append(_name) or _real(*a, **k))
    monkeypatch.setenv("FLUXIMP_QUANT_CACHE", str(workdir / "fresh-cache"))  # no cached prompt embeddings
    smoke = trainkit.params.ROOT / "conf/prompts/smoke.txt"
    run_train(workdir, train__steps=1, train__validate_every=1, train__validation_steps=1, train__checkpoint_every=1,
              sample__prompts=str(smoke))
    assert order == ["embed_prompts", "load_text_encoders", "load_transformer"]


@pytest.mark.parametrize("optimizer,steps,settings", [
    # Prodigy grows its step size from d0 = 1e-6: on the tiny model the loss starts falling after ~50 steps
    ("prodigy", 100, dict(train__lr=1.0, train__weight_decay=0.01)),
    ("adafactor", 40, dict(train__lr=1e-2)),
])
def test_prodigy_and_adafactor_train_the_tiny_model(workdir, optimizer, steps, settings):
    log = run_train(workdir, train__optimizer=optimizer, train__steps=steps, lora__targets="all", lora__rank=8,
                    train__checkpoint_every=steps, **settings)
    first, last = (sum(r["loss"] for r in part) / 10 for part in (log[:10], log[-10:]))
    assert last < 0.85 * first, (optimizer, first, last)
    meta = json.loads((workdir / "models/lora/adapter.json").read_text())
    assert meta["optimizer"]["name"] == optimizer
    assert meta["optimizer"]["lr"] == settings["train__lr"]
    if optimizer == "prodigy":
        assert meta["optimizer"]["prodigy"] == {"d_coef": 1.0, "use_bias_correction": True, "safeguard_warmup": True,
                                                "decouple": True, "betas": [0.9, 0.99]}


def test_optimizer_params_are_validated():
    from stages.core import params as prm

    base = prm.Params().model_dump()
    with pytest.raises(prm.ParamsError, match="prodigy.*train.lr=1.0"):
        prm.validate({**base, "train": {**base["train"], "optimizer": "prodigy", "lr": 1e-4}})
    with pytest.raises(prm.ParamsError, match="warmup_init needs"):
        prm.validate({**base, "train": {**base["train"], "optimizer": "adafactor",
                                        "adafactor": {"warmup_init": True}}})
    ok = prm.validate({**base, "train": {**base["train"], "optimizer": "prodigy", "lr": 1.0}})
    assert ok.train.prodigy.safeguard_warmup and ok.train.prodigy.use_bias_correction


def test_ema_adapter_is_its_own_loadable_adapter(workdir):
    run_train(workdir, train__steps=8, train__checkpoint_every=8, train__ema_decay=0.9)
    out = workdir / "models/lora"
    main, ema = (load_file(d / "pytorch_lora_weights.safetensors") for d in (out, out / "ema"))
    assert main.keys() == ema.keys()
    assert any(not torch.equal(main[k], ema[k]) for k in main)
    assert (out / "ema/lora_kohya.safetensors").exists()
    assert json.loads((out / "ema/adapter.json").read_text())["ema"] is True
    from stages.models import flux

    pipe = flux.load_pipeline(Model(base="tiny-random"), device="cpu")
    pipe.load_lora_weights(str(out / "ema"))


def test_prodigy_and_ema_survive_an_interrupted_run(workdir, tmp_path_factory):
    """Prodigy's step-size estimate and the EMA live in the checkpoint: resuming gives the same adapters."""
    params = dict(train__steps=6, train__checkpoint_every=3, train__ema_decay=0.8, train__optimizer="prodigy",
                  train__lr=1.0)
    run_train(workdir, **params)
    reference = {name: load_file(workdir / "models/lora" / name / "pytorch_lora_weights.safetensors")
                 for name in ("", "ema")}
    other = tmp_path_factory.mktemp("ema-resumed")
    shutil.copytree(workdir / "data/cache", other / "data/cache")

    def crash(metrics, step):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_train(other, callbacks=[crash], **params)
    run_train(other, **params)
    for name, ref in reference.items():
        resumed = load_file(other / "models/lora" / name / "pytorch_lora_weights.safetensors")
        assert all(torch.equal(resumed[k], ref[k]) for k in ref), name


def test_snapshots_every_n_steps_keep_the_last_k_and_load(workdir):
    from stages.models import export as kohya, snapshots

    run_train(workdir, train__steps=6, train__checkpoint_every=6, train__save_every=2, train__keep_last=2)
    root = workdir / "models/snapshots"
    assert snapshots.steps_saved(root) == [4, 6]
    for step in (4, 6):
        folder = root / f"step-{step:06d}"
        assert json.loads((folder / "adapter.json").read_text())["steps"] == step
        assert not list(folder.glob("*.pt"))  # no optimizer state in a snapshot
    final = load_file(workdir / "models/lora/pytorch_lora_weights.safetensors")
    last = load_file(root / "step-000006/pytorch_lora_weights.safetensors")
    earlier = load_file(root / "step-000004/pytorch_lora_weights.safetensors")
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert any(not torch.equal(final[k], earlier[k]) for k in final)
    from stages.models import flux

    pipe = flux.load_pipeline(Model(base="tiny-random"), device="cpu")
    state, _ = kohya.from_kohya(load_file(root / "step-000004/lora_kohya.safetensors"), dict(pipe.transformer.config))
    assert all(torch.allclose(state[k], earlier["transformer." + k]) for k in state) and len(state) == len(earlier)
    pipe.load_lora_weights(str(root / "step-000004"))

    run_train(workdir, train__steps=3, train__checkpoint_every=3, train__save_every=2, lora__rank=2)
    assert snapshots.steps_saved(root) == [2]  # a new run starts with no snapshots of the old one


def test_snapshots_and_validation_images_are_logged_to_mlflow_with_their_step(workdir, monkeypatch):
    import mlflow

    from stages.core import tracking

    monkeypatch.setenv("FLUXIMP_MLFLOW", "1")
    monkeypatch.setenv("FLUXIMP_MLFLOW_STRICT", "1")
    monkeypatch.setenv("DVC_ROOT", str(workdir))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    tracking.reset()
    try:
        smoke = trainkit.params.ROOT / "conf/prompts/smoke.txt"
        trainkit.write_params(workdir, **{**trainkit.FAST, **dict(
            train__steps=2, train__checkpoint_every=2, train__save_every=1, train__keep_last=0, train__validate_every=2,
            train__validation_steps=1, sample__prompts=str(smoke), train__optimizer="prodigy", train__lr=1.0)})
        from stages import train

        train.main()  # the stage as DVC runs it: run() inside the MLflow run (the workdir is the cwd)
        run_id = json.loads((workdir / "reports/mlflow_run.json").read_text())["run_id"]
        client = mlflow.MlflowClient()
        assert [m.step for m in client.get_metric_history(run_id, "train/snapshot_step")] == [1, 2]
        assert {a.path for a in client.list_artifacts(run_id, "snapshots")} == {"snapshots/step-000001",
                                                                                 "snapshots/step-000002"}
        assert client.get_run(run_id).data.params["train.optimizer"] == "prodigy"
        images = [a.path for a in client.list_artifacts(run_id, "images")]
        # mlflow.log_image names a file <key>+step+<step>+...: one per prompt (1 seed) at step 2
        assert sum(p.startswith("images/validation~p") and "+step+2+" in p and p.endswith(".png") for p in images) \
            == len(read_prompts(smoke)), images
    finally:
        tracking.reset()
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri() exports it


@pytest.mark.slow
def test_two_processes_with_accelerate_on_cpu(workdir):
    """train.num_processes=2: the stage re-launches itself under `accelerate launch` (gloo on CPU)."""
    import subprocess
    import sys

    trainkit.write_params(workdir, **{**FAST, "train__steps": 3, "train__checkpoint_every": 3,
                                      "train__num_processes": 2, "train__batch_size": 2})
    env = {**os.environ, "FLUXIMP_MLFLOW": "0", "PYTHONPATH": str(trainkit.params.ROOT),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "stages.train"], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "process 1 of 2" in proc.stderr and "process 0 of 2" in proc.stderr
    rows = (workdir / "reports/train/loss.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rows] == [1, 2, 3]
    assert (workdir / "models/lora/pytorch_lora_weights.safetensors").exists()
    assert (workdir / "models/checkpoints/step-000003").is_dir()


def test_pipelined_steps_train_and_log_exactly_as_steps_resolved_at_once(workdir, tmp_path_factory, monkeypatch):
    """The stage launches step N+1 before it resolves step N, except where a snapshot, validation or
    checkpoint needs the run settled; it writes the loss.tsv, adapter, snapshots, checkpoints and
    validation images of a run that resolves every step at once (what Trainer.step did)."""
    from stages import train

    smoke = trainkit.params.ROOT / "conf/prompts/smoke.txt"
    params = dict(train__steps=8, train__checkpoint_every=4, train__save_every=3, train__validate_every=5,
                  train__validation_steps=1, sample__prompts=str(smoke), lora__dropout=0.1, train__caption_dropout=0.3)
    real_launch, real_resolve, real_pipe_launch = train.Trainer.launch, train.Trainer.resolve, train.StepPipeline.launch

    def outputs(root):
        files = [root / "reports/train/loss.tsv", root / "models/lora/pytorch_lora_weights.safetensors",
                 *sorted((root / "models/snapshots").rglob("*.safetensors")),
                 *sorted((root / "models/checkpoints").rglob("lora.safetensors")),
                 *sorted((root / "reports/train/validation").glob("*.png"))]
        return {str(f.relative_to(root)): f.read_bytes() for f in files}

    calls = []
    with monkeypatch.context() as m:
        m.setattr(train.Trainer, "launch", lambda self, b, step: calls.append(f"L{step + 1}") or
                  real_launch(self, b, step))
        m.setattr(train.Trainer, "resolve", lambda self, p, since=None: calls.append(f"R{p.step + 1}") or
                  real_resolve(self, p, since))
        run_train(workdir, **params)
        assert calls == ["L1", "L2", "R1", "L3", "R2", "R3",  # snapshot at 3
                         "L4", "R4",                          # checkpoint at 4
                         "L5", "R5",                          # validation images at 5
                         "L6", "R6",                          # snapshot at 6
                         "L7", "L8", "R7", "R8"]              # the last checkpoint
        other = tmp_path_factory.mktemp("resolved-at-once")
        shutil.copytree(workdir / "data/cache", other / "data/cache")
        calls.clear()
        m.setattr(train.StepPipeline, "launch", lambda self, b, step: (real_pipe_launch(self, b, step), self.flush()))
        run_train(other, **params)
        assert calls == [f"{x}{k}" for k in range(1, 9) for x in "LR"]
    piped, at_once = outputs(workdir), outputs(other)
    assert piped.keys() == at_once.keys()
    assert len(piped) == 1 + 1 + 2 * 2 + 2 + 2 * len(read_prompts(smoke))  # validation images at steps 5 and 8
    assert piped == at_once
    rows = piped["reports/train/loss.tsv"].decode().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rows] == list(range(1, 9))
    assert len((workdir / "reports/train/timings.tsv").read_text().splitlines()) == 9
