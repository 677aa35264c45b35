"""Checkpoint files and the resume decision without training (stages.models.checkpoint): what a
checkpoint holds, which are kept, damaged ones set aside, finished runs, temp folders of a killed
save, and restoring a trainer's state and the RNGs. Fast: a fake trainer."""
import errno
import hashlib
import json
import os
import random
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stages.core.io import file_digest
from stages.core import params
from stages.models import checkpoint as ckpt
from stages.models.divergence import TrainingDiverged


class FakeTrainer:
    def __init__(self, value: float = 1.0):
        self.lora = {"a": torch.full((2,), value)}
        self.loaded = None

    def state_dict(self):
        return {"lora": dict(self.lora), "optimizer": {"lr": 0.1}, "scheduler": {"last_epoch": 3}}

    def load_state_dict(self, state):
        self.loaded = state


def train_params(**kw) -> params.Train:
    return params.Train(**{"steps": 10, "warmup_steps": 0, **kw})


IDENT = {"params": {"seed": 1}, "steps": 10, "data": "d", "code": "c"}


def save(folder, step, ident=IDENT, keep=5, value=1.0):
    return ckpt.save(folder, FakeTrainer(value), step, ident, keep)


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_checkpoint_holds_the_adapter_state_rng_and_checksummed_meta(tmp_path):
    torch.manual_seed(5)
    path = save(tmp_path, 7, value=2.0)
    assert path == tmp_path / "step-000007" and names(path) == ["lora.safetensors", "meta.json", "state.pt"]
    assert torch.equal(load_file(path / "lora.safetensors")["a"], torch.full((2,), 2.0))
    state = torch.load(path / "state.pt", weights_only=False)
    assert state["step"] == 7 and state["optimizer"] == {"lr": 0.1} and state["scheduler"] == {"last_epoch": 3}
    assert torch.equal(state["rng"]["torch"], torch.get_rng_state()) and "lora" not in state
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 7 and meta["identity"] == IDENT and meta["finished"] is False
    assert meta["sha256"] == {f: file_digest(path / f) for f in ckpt.FILES}
    assert len(meta["sha256"]["state.pt"]) == 64


def test_only_the_newest_keep_checkpoints_stay(tmp_path):
    for step in (2, 4, 6, 8):
        save(tmp_path, step, keep=2)
    assert names(tmp_path) == ["step-000006", "step-000008"]
    save(tmp_path, 10, keep=1)
    assert names(tmp_path) == ["step-000010"]


def busy(monkeypatch, name: str) -> None:
    """Files called ``name`` cannot be deleted (a file held open on a network disk, say; permissions
    would not do: the tests may run as root), so removing their folder stops half-way."""
    unlink = os.unlink

    def refuse(path, *args, **kwargs):
        if os.path.basename(os.fsdecode(path)) == name:
            raise OSError(errno.EBUSY, "Device or resource busy", os.fsdecode(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse)


def test_an_old_checkpoint_that_cannot_be_removed_does_not_stop_the_save(tmp_path, monkeypatch):
    save(tmp_path, 2, ident={**IDENT, "data": "other"})  # an earlier run's: stale
    save(tmp_path, 3)
    for s in ("step-000002", "step-000003"):
        (tmp_path / s / ".nfs0001").write_bytes(b"held open")
    busy(monkeypatch, ".nfs0001")
    r = ckpt.plan(tmp_path, IDENT, train_params())
    assert r.start == 3 and r.stale == [tmp_path / "step-000002"]
    path = ckpt.save(tmp_path, FakeTrainer(6.0), 6, IDENT, keep=1, stale=r.stale)  # removes both: best effort
    assert path == tmp_path / "step-000006" and names(path) == ["lora.safetensors", "meta.json", "state.pt"]
    r = ckpt.plan(tmp_path, IDENT, train_params())
    assert r.start == 6 and torch.equal(r.state["lora"]["a"], torch.full((2,), 6.0))
    left = [p.name for p in tmp_path.rglob("*") if p.is_file() and "step-000006" not in p.parts]
    assert left == [".nfs0001", ".nfs0001"]  # the rest of both went (the remains are set aside in bad/)


def test_the_first_save_of_a_fresh_run_removes_the_earlier_runs_checkpoints(tmp_path):
    other = {**IDENT, "data": "other"}
    save(tmp_path, 3, ident=other)
    save(tmp_path, 6, ident=other)
    r = ckpt.plan(tmp_path, IDENT, train_params())
    assert r.start == 0 and sorted(p.name for p in r.stale) == ["step-000003", "step-000006"]
    path = ckpt.save(tmp_path, FakeTrainer(3.0), 3, IDENT, keep=5, stale=r.stale)
    assert names(tmp_path) == ["step-000003"]  # the earlier step 6 went; step 3 is this run's (it replaced that one)
    assert json.loads((path / "meta.json").read_text())["identity"] == IDENT


def test_non_finite_weights_are_never_saved(tmp_path):
    with pytest.raises(TrainingDiverged, match="non-finite LoRA weights after step 4"):
        ckpt.save(tmp_path, FakeTrainer(float("nan")), 4, IDENT, keep=2)
    assert not (tmp_path / "step-000004").exists()


def test_the_newest_interrupted_checkpoint_resumes_with_its_state(tmp_path, caplog):
    save(tmp_path, 3, value=3.0)
    save(tmp_path, 6, value=6.0)
    (tmp_path / ".step-000009.123-abcdefgh.tmp").mkdir()  # a save killed half-way
    r = ckpt.plan(tmp_path, IDENT, train_params())
    assert (r.start, r.path, r.continued) == (6, tmp_path / "step-000006", False)
    assert torch.equal(r.state["lora"]["a"], torch.full((2,), 6.0)) and r.state["step"] == 6
    assert r.reason == f"resuming an interrupted run from {tmp_path / 'step-000006'} at step 6 of 10"
    assert names(tmp_path) == ["step-000003", "step-000006"]  # the temp folder is gone


def test_a_temp_folder_that_cannot_be_removed_does_not_stop_the_resume(tmp_path, monkeypatch):
    save(tmp_path, 3)
    junk = tmp_path / ".step-000006.123-abcdefgh.tmp"  # a save killed half-way
    junk.mkdir()
    (junk / "lora.safetensors").write_bytes(b"half")
    (junk / ".nfs0001").write_bytes(b"held open")
    busy(monkeypatch, ".nfs0001")
    r = ckpt.plan(tmp_path, IDENT, train_params())
    assert (r.start, r.path) == (3, tmp_path / "step-000003")
    assert names(junk) == [".nfs0001"]  # what could go, went; the next plan tries again


def test_checkpoints_past_the_total_are_not_resumed(tmp_path):
    save(tmp_path, 3)
    save(tmp_path, 12)
    r = ckpt.plan(tmp_path, IDENT, train_params())  # steps 10: step 12 cannot be resumed, step 3 can
    assert r.start == 3
    save(tmp_path, 10)
    assert ckpt.plan(tmp_path, IDENT, train_params()).start == 10  # at the total exactly: resumable


def test_no_folder_or_no_checkpoint_starts_fresh(tmp_path):
    r = ckpt.plan(tmp_path / "missing", IDENT, train_params())
    assert (r.start, r.state, r.path, r.continued) == (0, None, None, False)
    assert r.reason == "no checkpoint: training from step 0"
    (tmp_path / "empty").mkdir()
    r = ckpt.plan(tmp_path / "empty", IDENT, train_params())
    assert r.start == 0 and r.reason == "no checkpoint of this run (none saved): training from step 0"


def test_an_older_trainers_checkpoint_is_not_resumed(tmp_path):
    save(tmp_path, 3, ident={"params": {}, "data": "d"})  # no code/steps: made by an older version
    r = ckpt.plan(tmp_path, IDENT, train_params())
    assert r.start == 0 and "made by an older version of the trainer" in r.reason
    assert [x.name for x in r.stale] == ["step-000003"]  # removed by the new run's first save, not before


@pytest.mark.parametrize("damage", ["checksum", "missing_file", "unreadable", "nan", "meta"])
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path, damage, caplog):
    save(tmp_path, 3, value=3.0)
    save(tmp_path, 6, value=6.0)
    six = tmp_path / "step-000006"
    if damage == "checksum":
        (six / "state.pt").write_bytes((six / "state.pt").read_bytes() + b"x")
    elif damage == "missing_file":
        (six / "lora.safetensors").unlink()
    elif damage in ("unreadable", "nan"):
        if damage == "unreadable":
            (six / "state.pt").write_bytes(b"not a pickle")
        else:
            from safetensors.torch import save_file
            save_file({"a": torch.tensor([float("nan"), 1.0])}, six / "lora.safetensors")
        meta = json.loads((six / "meta.json").read_text())  # checksums that match the damaged files
        meta["sha256"] = {f: file_digest(six / f) for f in ckpt.FILES}
        (six / "meta.json").write_text(json.dumps(meta))
    else:
        (six / "meta.json").write_text("{not json")
    caplog.set_level("WARNING")
    r = ckpt.plan(tmp_path, IDENT, train_params())
    assert r.start == 3 and torch.equal(r.state["lora"]["a"], torch.full((2,), 3.0))
    assert names(tmp_path) == ["bad", "step-000003"]
    assert [p.name.startswith("step-000006-") for p in (tmp_path / "bad").iterdir()] == [True]
    why = {"checksum": "state.pt: checksum mismatch", "missing_file": "lora.safetensors missing",
           "unreadable": "unreadable: ", "nan": "non-finite LoRA weights in a", "meta": "meta.json unreadable"}
    assert f"checkpoint {six} is damaged ({why[damage]}" in caplog.text


def test_every_checkpoint_damaged_starts_fresh(tmp_path):
    save(tmp_path, 3)
    (tmp_path / "step-000003/state.pt").write_bytes(b"x")
    r = ckpt.plan(tmp_path, IDENT, train_params())
    assert r.start == 0 and r.reason.startswith("no usable checkpoint at or below step 10")


def test_a_finished_run_trains_again_unless_more_steps_with_a_constant_schedule(tmp_path):
    save(tmp_path, 2)  # an earlier checkpoint of the same run: the finished (newest) one continues
    save(tmp_path, 4)
    ckpt.mark_finished(tmp_path, 4)
    ckpt.mark_finished(tmp_path, 99)  # no such checkpoint: nothing happens
    assert json.loads((tmp_path / "step-000004/meta.json").read_text())["finished"] is True
    r = ckpt.plan(tmp_path, IDENT, train_params(steps=10), cleanup=False)  # constant: continue to 10
    assert (r.start, r.continued) == (4, True)
    assert r.reason == f"continuing the finished 4-step run from {tmp_path / 'step-000004'} to 10 steps"
    r = ckpt.plan(tmp_path, IDENT, train_params(steps=4))  # the same run again (dvc repro -f)
    assert r.start == 0 and "finished at step 4; a rerun trains again from step 0" in r.reason
    # a fresh run's checkpoints never mix with the finished one's: they go with its first save
    assert sorted(x.name for x in r.stale) == ["step-000002", "step-000004"]


def test_a_finished_run_with_a_damaged_final_checkpoint_starts_fresh(tmp_path):
    save(tmp_path, 2)  # never continue from an older one: it would redo steps 3-4 differently
    save(tmp_path, 4)
    ckpt.mark_finished(tmp_path, 4)
    (tmp_path / "step-000004/lora.safetensors").write_bytes(b"x")
    r = ckpt.plan(tmp_path, IDENT, train_params(steps=10))
    assert r.start == 0 and r.reason.startswith("its final checkpoint is damaged")


def test_without_cleanup_nothing_is_removed(tmp_path):
    """Ranks > 0 of a multi-process run only read (rank 0 removes what is stale)."""
    save(tmp_path, 3, ident={**IDENT, "data": "other"})
    (tmp_path / ".step-000009.123-abcdefgh.tmp").mkdir()
    assert ckpt.plan(tmp_path, IDENT, train_params(), cleanup=False).start == 0
    assert names(tmp_path) == [".step-000009.123-abcdefgh.tmp", "step-000003"]


def test_restore_loads_the_trainer_and_the_rngs(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save(tmp_path, 3, value=3.0)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    trainer = FakeTrainer()
    r = ckpt.plan(tmp_path, IDENT, train_params())
    assert ckpt.restore(r, trainer) == 3
    assert trainer.loaded["optimizer"] == {"lr": 0.1} and torch.equal(trainer.loaded["lora"]["a"], torch.full((2,), 3.0))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    fresh = FakeTrainer()
    assert ckpt.restore(ckpt.Resume(0, "fresh"), fresh) == 0 and fresh.loaded is None


def test_code_files_are_the_python_files_of_the_stages_deps(tmp_path):
    (tmp_path / "stages/models").mkdir(parents=True)
    for f in ("stages/train.py", "stages/models/a.py", "stages/models/b.py", "stages/models/notes.txt"):
        (tmp_path / f).write_text("x")
    (tmp_path / "dvc.yaml").write_text("stages:\n  train:\n    deps:\n      - data/cache\n      - stages/train.py\n"
                                       "      - stages/models\n      - stages/missing.py\n")
    assert [p.relative_to(tmp_path).as_posix() for p in ckpt._code_files("train", tmp_path)] == [
        "stages/models/a.py", "stages/models/b.py", "stages/train.py"]
    h = ckpt.code_hash("train", tmp_path)
    ref = hashlib.sha256()  # sha256 over each file's path, NUL, content, NUL, in path order
    for f in ("stages/models/a.py", "stages/models/b.py", "stages/train.py"):
        ref.update(f.encode() + b"\0" + b"x" + b"\0")
    assert h == ref.hexdigest()[:16]
    (tmp_path / "stages/models/b.py").rename(tmp_path / "stages/models/c.py")  # a rename is a change
    assert ckpt.code_hash("train", tmp_path) != h


def test_the_schedule_depends_on_the_total_unless_constant():
    assert not ckpt.schedule_depends_on_total(train_params(lr_scheduler="constant"))
    assert ckpt.schedule_depends_on_total(train_params(lr_scheduler="cosine"))
    assert ckpt.schedule_depends_on_total(train_params(lr_scheduler="linear"))


def test_damaged_checkpoints_go_to_bad_with_a_timestamp_and_stray_files_are_ignored(tmp_path):
    (tmp_path / "step-000001").write_text("a stray file, not a checkpoint")
    save(tmp_path, 3)
    save(tmp_path, 6)
    save(tmp_path, 9)
    for s in ("step-000006", "step-000009"):  # two damaged in one plan: both set aside
        (tmp_path / s / "state.pt").write_bytes(b"x")
    r = ckpt.plan(tmp_path, IDENT, train_params())
    assert r.start == 3
    bad = sorted(p.name for p in (tmp_path / "bad").iterdir())
    assert [b[:11] for b in bad] == ["step-000006", "step-000009"]
    assert all(re.fullmatch(r"step-00000[69]-\d{8}-\d{6}", b) for b in bad)


def test_the_nan_message_names_the_step_and_what_to_do(tmp_path):
    with pytest.raises(TrainingDiverged) as err:
        ckpt.save(tmp_path, FakeTrainer(float("inf")), 4, IDENT, keep=2)
    assert str(err.value) == ("non-finite LoRA weights after step 4 (a, 1 tensors): training stopped, nothing saved; "
                              "lower train.lr or raise train.warmup_steps")
