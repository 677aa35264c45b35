"""train stage on the tiny model: loss falls, exports load and change the pipeline's output,
quantized bases train, and an interrupted + resumed run ends with the same adapter."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from stages.core.params import Model
from tests import trainkit

FAST = dict(train__resolution=32, train__buckets=False, train__batch_size=4, train__warmup_steps=0,
            lora__rank=4, train__lr=1e-2)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A tmp work dir with data/cache encoded once (copied into each test's own dir)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("encoded")
    trainkit.make_curated(root, n=12, sizes=((32, 32),))
    trainkit.write_params(root, **FAST)
    cwd = os.getcwd()
    os.chdir(root)
    with trainkit.tiny_cache(tmp_path_factory.getbasetemp() / "tiny-cache"):
        try:
            from stages import encode

            encode.main()
        finally:
            os.chdir(cwd)
        yield root


@pytest.fixture
def workdir(encoded, tmp_path, monkeypatch):
    shutil.copytree(encoded / "data/cache", tmp_path / "data/cache")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLUXIMP_MLFLOW", "0")  # tracking has its own tests
    return tmp_path


def run_train(workdir, **overrides):
    from stages import train

    trainkit.write_params(workdir, **{**FAST, **overrides})
    train.main()
    rows = (workdir / "reports/train/loss.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    return [dict(zip(header, map(float, r.split("\t")))) for r in rows[1:]]


def test_loss_falls_and_exports_work(workdir):
    log = run_train(workdir, train__steps=40, lora__targets="all", lora__rank=8, train__checkpoint_every=20)
    assert [int(r["step"]) for r in log] == list(range(1, 41))
    first, last = (sum(r["loss"] for r in part) / 10 for part in (log[:10], log[-10:]))
    assert last < 0.85 * first, (first, last)
    assert all(r["lr"] > 0 and r["grad_norm"] >= 0 and r["samples_per_s"] > 0 for r in log)
    out = workdir / "models/lora"
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["rank"] == 8 and meta["steps"] == 40 and meta["targets"] == "all"
    assert meta["data_hash"] == json.loads((workdir / "data/cache/index.json").read_text())["data_hash"]
    state = load_file(out / "pytorch_lora_weights.safetensors")
    assert {t.shape[0] for k, t in state.items() if "lora_A" in k} == {8}
    kohya = load_file(out / "lora_kohya.safetensors")
    assert any(k.endswith(".alpha") for k in kohya) and all(k.startswith("lora_unet_") for k in kohya)
    assert sorted(p.name for p in (workdir / "models/checkpoints").iterdir()) == ["step-000020", "step-000040"]

    from stages.models import flux

    pipe = flux.load_pipeline(Model(base="tiny-random"), device="cpu")
    kw = dict(num_inference_steps=2, height=32, width=32, guidance_scale=3.5, max_sequence_length=16,
              output_type="np")
    base = pipe("a striped field", generator=torch.Generator().manual_seed(0), **kw).images[0]
    pipe.load_lora_weights(str(out))
    tuned = pipe("a striped field", generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert abs(tuned - base).mean() > 1e-3


@pytest.mark.parametrize("quantization,optimizer", [("nf4", "adamw8bit"), ("int8", "adamw")])
def test_quantized_bases_train(workdir, quantization, optimizer):
    log = run_train(workdir, model__quantization=quantization, train__optimizer=optimizer, train__steps=4,
                    train__checkpoint_every=4)
    assert len(log) == 4 and all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in log)
    state = load_file(workdir / "models/lora/pytorch_lora_weights.safetensors")
    assert any(t.abs().sum() > 0 for k, t in state.items() if "lora_B" in k)  # B moved off its zero init
    assert json.loads((workdir / "models/lora/adapter.json").read_text())["quantization"] == quantization


class Interrupt(Exception):
    pass


def test_interrupted_and_resumed_run_matches_uninterrupted(workdir, tmp_path_factory):
    from stages import train

    params = dict(train__steps=10, train__checkpoint_every=3, train__keep_checkpoints=2, lora__dropout=0.1,
                  train__caption_dropout=0.3, train__sigma_sampling="shift", train__lr_scheduler="cosine",
                  train__warmup_steps=2)
    run_train(workdir, **params)
    reference = load_file(workdir / "models/lora/pytorch_lora_weights.safetensors")

    other = tmp_path_factory.mktemp("resumed")
    shutil.copytree(workdir / "data/cache", other / "data/cache")
    os.chdir(other)

    def crash(metrics, step):
        if step == 7:  # after the step-6 checkpoint: steps 7.. must be redone on resume
            raise Interrupt

    train.CALLBACKS.append(crash)
    try:
        with pytest.raises(Interrupt):
            run_train(other, **params)
    finally:
        train.CALLBACKS.remove(crash)
    assert not (other / "models/lora").exists()
    assert sorted(p.name for p in (other / "models/checkpoints").iterdir()) == ["step-000003", "step-000006"]
    (other / "models/checkpoints/.step-000009.x.tmp").mkdir()  # a save killed half-way
    log = run_train(other, **params)
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


def test_validation_images_every_n_steps(workdir):
    run_train(workdir, train__steps=2, train__validate_every=1, train__validation_steps=2, train__checkpoint_every=2)
    val = workdir / "reports/train/validation"
    index = json.loads((val / "index.json").read_text())
    assert len(index["prompts"]) == 2
    assert index["images"] == [f"step-{s:06d}-{k}.png" for s in (1, 2) for k in (0, 1)]
    from PIL import Image

    assert Image.open(val / index["images"][0]).size == (32, 32)


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
