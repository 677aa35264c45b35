"""What may resume what (stages.models.checkpoint): only an interrupted run of the same data,
params and code resumes; a finished run retrains on a forced rerun or continues for more steps;
damaged checkpoints are set aside; a diverging run stops naming the step."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from stages.models import checkpoint as ckpt
from tests.trainkit import run_train, run_train_main

RESUME = dict(train__steps=10, train__checkpoint_every=3, train__keep_checkpoints=3, lora__dropout=0.1,
              train__caption_dropout=0.3, train__sigma_sampling="shift", train__lr_scheduler="cosine",
              train__warmup_steps=2)


class Interrupt(Exception):
    pass


@pytest.fixture
def steps_seen():
    """The steps the train stage reports to a per-step callback (``record(steps_seen)``)."""
    return []


def record(seen: list[int]):
    return lambda metrics, step: seen.append(step)


def interrupted(workdir, monkeypatch, at: int, **params):
    """Run the train stage and crash it after step ``at`` (its checkpoints stay)."""
    def crash(metrics, step):
        if step == at:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_train(workdir, callbacks=[crash], **params)


def adapter(workdir):
    return load_file(workdir / "models/lora/pytorch_lora_weights.safetensors")


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def reference(encoded, tmp_path_factory):
    """The adapter of an uninterrupted RESUME run (computed once per test that asks)."""
    root = tmp_path_factory.mktemp("reference")
    shutil.copytree(encoded / "data/cache", root / "data/cache")
    run_train(root, **RESUME)
    return adapter(root)


# ----------------------------------------------------------------------------- identity
def test_code_hash_follows_the_train_stage_code_deps(tmp_path):
    (tmp_path / "stages/models").mkdir(parents=True)
    (tmp_path / "stages/train.py").write_text("x = 1\n")
    (tmp_path / "stages/models/flow.py").write_text("loss = 'mse'\n")
    (tmp_path / "stages/other.py").write_text("y = 1\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  train:\n    cmd: python -m stages.train\n    deps:\n"
                                       "      - stages/train.py\n      - stages/models\n      - data/cache\n")
    before = ckpt.code_hash("train", tmp_path)
    (tmp_path / "stages/other.py").write_text("y = 2\n")  # not a dep of train
    assert ckpt.code_hash("train", tmp_path) == before
    (tmp_path / "stages/models/flow.py").write_text("loss = 'l1'\n")
    assert ckpt.code_hash("train", tmp_path) != before


def test_changed_code_does_not_resume(workdir, monkeypatch, capfd, steps_seen):
    interrupted(workdir, monkeypatch, 7, **RESUME)
    from stages import train

    monkeypatch.setattr(ckpt, "code_hash", lambda *a, **k: "another-commit")
    trained: list[int] = []
    monkeypatch.setattr(train.Trainer, "launch", _spy(train.Trainer.launch, trained))
    run_train(workdir, callbacks=[record(steps_seen)], **RESUME)
    assert trained == list(range(10))  # every step trained again: nothing resumed
    assert steps_seen == list(range(1, 11))
    assert "the train stage's code changed" in capfd.readouterr().err


# ----------------------------------------------------------------------------- interrupted vs finished
def test_interrupted_run_resumes_and_matches(workdir, monkeypatch, reference, steps_seen):
    from stages import train

    interrupted(workdir, monkeypatch, 7, **RESUME)
    trained: list[int] = []
    monkeypatch.setattr(train.Trainer, "launch", _spy(train.Trainer.launch, trained))
    run_train(workdir, callbacks=[record(steps_seen)], **RESUME)
    assert trained == [6, 7, 8, 9]  # the resumed process trained steps 7-10 only (0-based 6-9)
    assert steps_seen == list(range(1, 11))  # 1-6 replayed from loss.tsv (MLflow gets them), 7-10 trained
    assert same(adapter(workdir), reference)
    meta = json.loads((workdir / "models/checkpoints/step-000010/meta.json").read_text())
    assert meta["finished"] is True and set(meta["sha256"]) == {"lora.safetensors", "state.pt"}


def test_forced_rerun_of_a_finished_run_trains_from_step_0(workdir, monkeypatch, capfd):
    from stages import train

    run_train(workdir, train__steps=4, train__checkpoint_every=2)
    first = adapter(workdir)
    trained: list[int] = []
    monkeypatch.setattr(train.Trainer, "launch", _spy(train.Trainer.launch, trained))
    run_train(workdir, train__steps=4, train__checkpoint_every=2)  # what `dvc repro -f -s train` runs
    assert trained == [0, 1, 2, 3]
    assert "finished at step 4; a rerun trains again from step 0" in capfd.readouterr().err
    assert same(adapter(workdir), first)  # deterministic: the same adapter, really retrained


def _spy(launch, calls):
    def spy(self, batches, step):
        calls.append(step)
        return launch(self, batches, step)
    return spy


# ----------------------------------------------------------------------------- damaged checkpoints
@pytest.mark.parametrize("damage", ["state_garbage", "lora_truncated", "meta_garbage", "bit_flip"])
def test_damaged_checkpoint_is_set_aside_and_the_previous_one_used(workdir, monkeypatch, reference, capfd,
                                                                   damage):
    interrupted(workdir, monkeypatch, 7, **RESUME)
    step6 = workdir / "models/checkpoints/step-000006"
    if damage == "state_garbage":
        (step6 / "state.pt").write_bytes(b"not a pickle")
    elif damage == "lora_truncated":
        data = (step6 / "lora.safetensors").read_bytes()
        (step6 / "lora.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "meta_garbage":
        (step6 / "meta.json").write_text("{not json")
    else:  # one flipped bit inside a tensor: loads fine, only the checksum notices
        data = bytearray((step6 / "lora.safetensors").read_bytes())
        data[-3] ^= 0x40
        (step6 / "lora.safetensors").write_bytes(bytes(data))
    run_train(workdir, **RESUME)
    err = capfd.readouterr().err
    assert "step-000006 is damaged" in err and "resuming an interrupted run" in err and "at step 3 of 10" in err
    assert [p.name.split("-2")[0] for p in (workdir / "models/checkpoints/bad").iterdir()] == ["step-000006"]
    assert same(adapter(workdir), reference)


def test_non_finite_loss_stops_training_naming_the_step(workdir, monkeypatch):
    from stages import train

    real = train.Trainer.resolve

    def resolve(self, pending, since=None):
        out = real(self, pending, since)
        return {**out, "loss": float("nan")} if pending.step == 2 else out

    monkeypatch.setattr(train.Trainer, "resolve", resolve)
    with pytest.raises(SystemExit, match="non-finite loss \\(nan\\) at step 3"):
        run_train(workdir, train__steps=5, train__checkpoint_every=1)
    assert not (workdir / "models/lora").exists()
    assert sorted(p.name for p in (workdir / "models/checkpoints").iterdir())[-1] == "step-000002"


def test_nan_weights_are_never_saved_or_exported(workdir, monkeypatch):
    from stages import train

    real = train.Trainer.launch

    def launch(self, batches, step):
        out = real(self, batches, step)
        if step == 1:
            with torch.no_grad():
                self.params[0].fill_(float("nan"))
        return out

    monkeypatch.setattr(train.Trainer, "launch", launch)
    with pytest.raises(SystemExit, match="non-finite LoRA weights after step 2"):
        run_train(workdir, train__steps=3, train__checkpoint_every=1)
    assert not (workdir / "models/lora").exists()
    assert not (workdir / "models/checkpoints/step-000002").exists()


# ----------------------------------------------------------------------------- train N more steps
CONSTANT = dict(train__lr_scheduler="constant", train__warmup_steps=3, train__checkpoint_every=4,
                lora__dropout=0.1, train__caption_dropout=0.3)


def test_more_steps_continue_a_finished_run_with_a_constant_schedule(workdir, encoded, tmp_path_factory,
                                                                      monkeypatch, capfd):
    from stages import train

    longer = tmp_path_factory.mktemp("uninterrupted")
    shutil.copytree(encoded / "data/cache", longer / "data/cache")
    run_train(longer, train__steps=10, **CONSTANT)

    run_train(workdir, train__steps=6, **CONSTANT)
    trained: list[int] = []
    monkeypatch.setattr(train.Trainer, "launch", _spy(train.Trainer.launch, trained))
    log = run_train(workdir, train__steps=10, **CONSTANT)
    assert trained == [6, 7, 8, 9]
    assert [int(r["step"]) for r in log] == list(range(1, 11))
    assert "continuing the finished 6-step run" in capfd.readouterr().err
    assert same(adapter(workdir), adapter(longer))
    assert json.loads((workdir / "models/lora/adapter.json").read_text())["steps"] == 10


def test_more_steps_with_a_decaying_schedule_start_fresh(workdir, monkeypatch, capfd):
    from stages import train

    run_train(workdir, train__steps=4, train__lr_scheduler="cosine", train__checkpoint_every=2)
    trained: list[int] = []
    monkeypatch.setattr(train.Trainer, "launch", _spy(train.Trainer.launch, trained))
    run_train(workdir, train__steps=6, train__lr_scheduler="cosine", train__checkpoint_every=2)
    assert trained == list(range(6))
    assert "cosine lr schedule depends on the total" in capfd.readouterr().err


def test_a_resumed_run_reaches_mlflow_whole_and_registers_with_its_metrics(workdir, monkeypatch):
    import mlflow

    from stages.core import tracking

    monkeypatch.delenv("FLUXIMP_MLFLOW")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(workdir))
    tracking.reset()
    try:
        from stages import train

        real_launch = train.Trainer.launch

        def crash_in_step_6(self, batches, step):  # steps 1-5 logged to MLflow, checkpoint at 3
            if step == 5:
                raise Interrupt
            return real_launch(self, batches, step)

        with monkeypatch.context() as m:
            m.setattr(train.Trainer, "launch", crash_in_step_6)
            with pytest.raises(Interrupt):
                run_train_main(workdir, train__steps=6, train__checkpoint_every=3)
        tracking.reset()
        run_train_main(workdir, train__steps=6, train__checkpoint_every=3)
    finally:
        tracking.end()
        tracking.reset()
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    client = mlflow.MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    run_id = json.loads((workdir / "reports/mlflow_run.json").read_text())["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert client.get_run(run_id).info.status == "FINISHED"
    versions = client.search_model_versions()
    assert [v.run_id for v in versions] == [run_id]  # the interrupted run registered nothing
    runs = client.search_runs([client.get_run(run_id).info.experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]


def test_a_full_disk_while_checkpointing_names_the_folder(tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    class Fake:
        def state_dict(self):
            return {"lora": {"a": torch.zeros(2)}, "optimizer": {}, "scheduler": {}}

    def full(*a, **k):  # what torch's zip writer raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(sh, "disk_usage", lambda p: namedtuple("u", "total used free")(10, 10, 0))
    with pytest.raises(SystemExit, match=f"no space left on {tmp_path / 'checkpoints'}"):
        ckpt.save(tmp_path / "checkpoints", Fake(), 1, {"x": 1}, keep=2)
    assert not list((tmp_path / "checkpoints").iterdir())  # no half-written checkpoint
