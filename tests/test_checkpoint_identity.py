"""What may resume what, field by field (stages.models.checkpoint.identity / plan / NEUTRAL): an
interrupted checkpoint resumes only a run of the same seed, model, LoRA, train params (except the
bookkeeping keys of NEUTRAL), data and code. Fast: a fake trainer's state, no training."""
import pytest
import torch

from stages.core import params
from stages.models import checkpoint as ckpt

STEP = 3  # the interrupted run's checkpoint

# every train.* field -> a changed value, and whether a checkpoint survives that change
TRAIN = {
    "resolution": (48, False), "buckets": (False, False), "flip": (True, False), "batch_size": (2, False),
    "grad_accum": (2, False), "lr": (2e-2, False), "lr_scheduler": ("cosine", False),
    "warmup_steps": (5, False), "optimizer": ("adafactor", False), "weight_decay": (0.1, False),
    "prodigy": ({"d_coef": 2.0}, False), "adafactor": ({"relative_step": True}, False),
    "ema_decay": (0.9, False), "max_grad_norm": (0.5, False), "sigma_sampling": ("shift", False),
    "logit_mean": (0.5, False), "logit_std": (2.0, False), "shift": (1.5, False), "guidance": (3.5, False),
    "caption_dropout": (0.5, False), "gradient_checkpointing": (True, False), "max_sequence_length": (32, False),
    "num_processes": (2, False),
    # bookkeeping (checkpoint.NEUTRAL): what is saved, shown or compiled, not what is learned
    "checkpoint_every": (7, True), "keep_checkpoints": (5, True), "validate_every": (10, True),
    "validation_steps": (8, True), "validation_prompts": ("conf/prompts/other.txt", True),
    "validation_seeds": ([1, 2], True), "validation_guidance": (5.0, True), "validation_resolution": (32, True),
    "save_every": (5, True), "keep_last": (1, True), "compile": (True, True),
    # the total: a constant lr schedule does not depend on it (the cosine case is below)
    "steps": (300, True),
}
LORA = {"rank": 8, "alpha": 2.0, "dropout": 0.1, "targets": "all", "double_blocks": [0],
        "single_blocks": [1], "rank_map": {"attn": 2}}
MODEL = {"base": "some/other-flux", "revision": "abc123", "quantization": "nf4", "vram_gb": 24}


class FakeTrainer:
    def state_dict(self):
        return {"lora": {"a": torch.ones(2)}, "optimizer": {}, "scheduler": {}}


def base_params() -> params.Params:
    p = params.Params()
    return p.model_copy(update={"train": p.train.model_copy(update={"steps": 10, "warmup_steps": 0})})


def changed(p: params.Params, section: str, key: str, value) -> params.Params:
    sec = getattr(p, section)
    if isinstance(value, dict) and isinstance(getattr(sec, key), params.Section):
        value = getattr(sec, key).model_copy(update=value)
    return p.model_copy(update={section: sec.model_copy(update={key: value})})


def resumes(folder, p_new: params.Params, data: str = "data-1") -> bool:
    r = ckpt.plan(folder, ckpt.identity(p_new, data), p_new.train)
    assert r.start in (0, STEP), r
    return r.start == STEP


@pytest.fixture
def saved(tmp_path):
    """An interrupted run's checkpoint at step 3 (of base_params, data key 'data-1')."""
    folder = tmp_path / "checkpoints"
    p = base_params()
    ckpt.save(folder, FakeTrainer(), STEP, ckpt.identity(p, "data-1"), keep=2)
    return folder


def test_the_table_covers_every_field_of_the_identity():
    assert set(TRAIN) == set(params.Train.model_fields)
    assert set(LORA) == set(params.Lora.model_fields)
    assert set(MODEL) == set(params.Model.model_fields)
    assert ckpt.NEUTRAL & set(params.Train.model_fields) == {k for k, (_, ok) in TRAIN.items() if ok and k != "steps"}


def test_the_same_run_resumes(saved):
    assert resumes(saved, base_params())


@pytest.mark.parametrize("key", sorted(TRAIN))
def test_each_train_param(saved, key):
    value, survives = TRAIN[key]
    p = changed(base_params(), "train", key, value)
    assert getattr(p.train, key) != getattr(base_params().train, key)
    assert resumes(saved, p) is survives, f"train.{key} -> {value!r}"
    # a restart marks the earlier run's checkpoint stale (removed by the new run's first save, so it is
    # never mixed with the new run's and a run that fails before saving loses nothing)
    stale = ckpt.plan(saved, ckpt.identity(p, "data-1"), p.train).stale
    assert bool(stale) is not survives and all(s.exists() for s in stale)


@pytest.mark.parametrize("section,table", [("lora", LORA), ("model", MODEL)])
def test_each_lora_and_model_param_restarts(tmp_path, section, table):
    for key, value in table.items():
        folder = tmp_path / f"{section}-{key}"
        ckpt.save(folder, FakeTrainer(), STEP, ckpt.identity(base_params(), "data-1"), keep=2)
        assert not resumes(folder, changed(base_params(), section, key, value)), f"{section}.{key}"


def test_the_seed_restarts(saved):
    assert not resumes(saved, base_params().model_copy(update={"seed": 99}))


def test_other_data_restarts(saved, caplog):
    caplog.set_level("INFO")
    assert not resumes(saved, base_params(), data="data-2")
    assert "the training data changed" in caplog.text


def test_other_code_restarts(saved, monkeypatch, caplog):
    caplog.set_level("INFO")
    monkeypatch.setattr(ckpt, "code_hash", lambda *a, **k: "another-commit")
    assert not resumes(saved, base_params())
    assert "the train stage's code changed" in caplog.text


def test_more_steps_with_a_decaying_schedule_restart(tmp_path):
    cosine = changed(base_params(), "train", "lr_scheduler", "cosine")
    ckpt.save(tmp_path, FakeTrainer(), STEP, ckpt.identity(cosine, "data-1"), keep=2)
    assert resumes(tmp_path, cosine)
    assert not resumes(tmp_path, changed(cosine, "train", "steps", 300))


def test_fewer_steps_than_the_checkpoint_restart(saved):
    assert not resumes(saved, changed(base_params(), "train", "steps", STEP - 1))



def test_the_identity_names_its_parts():
    p = base_params()
    ident = ckpt.identity(p, "data-1")
    assert set(ident) == {"params", "steps", "data", "code"} and set(ident["params"]) == {"seed", "model", "lora", "train"}
    assert ident["params"]["seed"] == p.seed and ident["params"]["lora"] == p.lora.model_dump()
    assert ident["params"]["model"] == p.model.model_dump() and ident["steps"] == 10 and ident["data"] == "data-1"
    assert ident["code"] == ckpt.code_hash() and not ckpt.NEUTRAL & set(ident["params"]["train"])


@pytest.mark.parametrize("change,reason", [
    (dict(data="data-2"), "the training data changed"),
    (dict(code="other"), "the train stage's code changed"),
    (dict(lr=0.02), "params changed: train.lr 0.01 -> 0.02"),
    (dict(extra=1), "params changed: train.extra None -> 1"),  # a key only one side has
])
def test_the_reason_a_checkpoint_is_not_resumed(saved, monkeypatch, change, reason):
    p = base_params()
    ident = ckpt.identity(p, change.get("data", "data-1"))
    if "code" in change:
        ident["code"] = change["code"]
    if "lr" in change:
        ident["params"]["train"]["lr"] = change["lr"]
    if "extra" in change:
        ident["params"]["train"]["extra"] = change["extra"]
    r = ckpt.plan(saved, ident, p.train)
    assert (r.start, r.reason) == (0, f"no checkpoint of this run ({reason}): training from step 0")


def test_an_identity_without_its_parts_is_an_older_trainers():
    assert ckpt._differences({"params": {}}, {}, False) == "made by an older version of the trainer"
    assert ckpt._differences(None, {}, False) == "made by an older version of the trainer"


def test_the_reason_names_up_to_five_changed_params_and_the_steps():
    p = base_params()
    old = ckpt.identity(p, "d")
    new = ckpt.identity(changed(changed(p, "train", "lr", 0.02), "train", "shift", 2.0), "d")
    assert ckpt._differences(old, new, False) == "params changed: train.lr 0.01 -> 0.02, train.shift 3.0 -> 2.0"
    many = p
    for key, value in (("lr", 0.02), ("shift", 2.0), ("guidance", 2.0), ("logit_std", 2.0), ("logit_mean", 1.0),
                       ("max_grad_norm", 2.0)):
        many = changed(many, "train", key, value)
    assert ckpt._differences(old, ckpt.identity(many, "d"), False).count(" -> ") == 5
    cosine = changed(p, "train", "lr_scheduler", "cosine")
    longer = changed(cosine, "train", "steps", 300)
    assert ckpt._differences(ckpt.identity(cosine, "d"), ckpt.identity(longer, "d"), False) == (
        "train.steps changed (10 -> 300) and the cosine lr schedule depends on the total")
    assert ckpt._differences(ckpt.identity(cosine, "d"), ckpt.identity(longer, "d"), True) == ""


def test_a_gpu_checkpoints_rng_state_restores_on_a_cpu_machine(monkeypatch):
    state = ckpt.rng_state()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ckpt.set_rng_state({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)]})  # saved on a GPU: skipped here
    assert "cuda" not in ckpt.rng_state()
