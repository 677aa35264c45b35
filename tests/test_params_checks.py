"""Params the schema's types accept but that would silently do the wrong thing are rejected in
seconds, naming the key, the value and what works; YAML syntax errors are named too."""
import pytest
from pydantic import ValidationError

from stages.core import params


def with_value(dotted: str, value) -> dict:
    raw = params.Params().model_dump()
    *path, last = dotted.split(".")
    d = raw
    for part in path:
        d = d[part]
    d[last] = value
    return raw


@pytest.mark.parametrize("dotted,value,expect", [
    ("train.resolution", 100, "train.resolution = 100: must be a multiple of 16 .* use 96 or 112"),
    ("sample.resolution", 72, "sample.resolution = 72: must be a multiple of 16 .* use 64 or 80"),
    ("caption.trigger", "", "caption.trigger = '': must not be empty.* e.g. 'impressionism style'"),
    ("caption.trigger", "  ", "caption.trigger = '  ': must not be empty"),
    ("train.warmup_steps", 200, "train.warmup_steps = 200 is larger than train.steps = 150: .* use at most 150"),
    ("data.holdout", 0.99, "data.holdout = 0.99: holds out 99% .* use 0.05-0.2"),
    ("filter.aspect_min", 5.0, "filter.aspect_min = 5.0 is above filter.aspect_max = 3.0"),
    ("filter.zeroshot.positive", ["a painting", 3], r"filter.zeroshot.positive.1 = 3: Input should be a valid string"),
    ("lora.double_blocks", [0, "x"], r"lora.double_blocks.1 = 'x'"),
    ("model.vram_gb", 10, r"\n  model.vram_gb = 10: Input should be 'auto'.*\n  model.vram_gb = 10: Input should be 8, 12, "
                          r"16, 24, 40 or 80"),  # a union's member tags (literal[...]) are not part of the key
])
def test_silently_wrong_values_are_rejected_with_what_works(dotted, value, expect):
    with pytest.raises(params.ParamsError, match=expect) as exc:
        params.validate(with_value(dotted, value))
    assert "<missing>" not in str(exc.value)
    assert "git checkout params.yaml" in str(exc.value)  # how to get back after `dvc exp run -S`


def test_values_that_work_still_pass():
    for dotted, value in [("train.resolution", 96), ("sample.resolution", 80), ("data.holdout", 0.5),
                          ("train.warmup_steps", 150), ("filter.aspect_min", 3.0)]:
        params.validate(with_value(dotted, value))


def test_a_tab_in_params_yaml_is_named_with_its_line(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 1\ntrain:\n\tsteps: 3\n")
    with pytest.raises(params.ParamsError, match="line 3, column 1 — a tab: YAML indents with spaces only"):
        params.load(tmp_path / "params.yaml")


def test_batch_larger_than_the_dataset_is_rejected_before_loading_the_model(workdir):
    from stages import train
    from stages.core.paths import Train
    from tests.trainkit import write_params

    p = write_params(workdir, train__batch_size=64)
    with pytest.raises(params.ParamsError, match="train.batch_size = 64 .* larger than the 12 training images"):
        train.run(p, Train().under(workdir))


def test_unknown_keys_and_cross_key_checks_are_named(tmp_path):
    raw = with_value("train.lr", 1e-3)
    raw["train"]["learning_rate"] = 0.1
    with pytest.raises(params.ParamsError) as exc:
        params.validate(raw)
    assert ("  train.learning_rate: unknown key (value 0.1); check the spelling against conf/config.yaml"
            in str(exc.value).splitlines())
    assert str(exc.value).startswith("invalid params.yaml:\n")
    with pytest.raises(params.ParamsError) as exc:  # a model check: the section, not one value
        params.validate(with_value("train.warmup_steps", 200))
    assert str(exc.value).splitlines()[1].startswith("  train: train.warmup_steps = 200 is larger")
    with pytest.raises(params.ParamsError) as exc:  # a literal: what is allowed
        params.validate(with_value("train.optimizer", "sgd"))
    assert str(exc.value).splitlines()[1] == ("  train.optimizer = 'sgd': Input should be 'adamw', 'adamw8bit', "
                                              "'prodigy' or 'adafactor' (allowed: 'adamw', 'adamw8bit', "
                                              "'prodigy' or 'adafactor')")


def test_lookup_follows_dicts_and_list_indices():
    raw = {"a": {"b": [10, 20]}}
    assert params._lookup(raw, ("a", "b", 1)) == 20 and params._lookup(raw, ("a", "b", -2)) == 10
    assert params._lookup(raw, ("a", "b", 2)) == "<missing>" and params._lookup(raw, ("a", "b", -3)) == "<missing>"
    assert params._lookup(raw, ("a", "c")) == "<missing>" and params._lookup(raw, ("a", "b", "x")) == "<missing>"
    assert params._lookup(raw, ()) == raw


def test_yaml_errors_without_a_tab_and_empty_files(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("seed: [1\n")
    with pytest.raises(params.ParamsError) as exc:
        params.load(f)
    assert str(exc.value).startswith(f"{f} is not valid YAML at line 2, column 1: ") and "a tab" not in str(exc.value)
    f.write_text("")
    assert params.read_yaml(f) == {} and params.load(f) == params.Params()


def test_load_falls_back_to_the_repos_params_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here
    assert params.load() == params.load(params.PARAMS_FILE)
    (tmp_path / "params.yaml").write_text("seed: 7\n")
    assert params.load().seed == 7


def test_multiple_of_16_names_the_two_nearest_sizes():
    with pytest.raises(ValueError, match=r"so 8 would silently become 0 or 16\): use 16 or 16$"):
        params.multiple_of_16(8)
    with pytest.raises(ValueError, match=r"so 40 would silently become 32 or 48\): use 32 or 48$"):
        params.multiple_of_16(40)
    assert params.multiple_of_16(48) == 48


@pytest.mark.parametrize("exts,ok", [([".txt", ".caption"], True), ([".t"], True), ([], True), (["txt"], False),
                                     (["."], False), ([".txt", "caption"], False)])
def test_caption_extensions_start_with_a_dot(exts, ok):
    if ok:
        assert params.FolderSource(caption_extensions=exts).caption_extensions == exts
    else:
        with pytest.raises(ValueError, match=r"extensions start with a dot, e.g. '.txt' \(got \["):
            params.FolderSource(caption_extensions=exts)


def test_the_holdout_message_and_a_folder_source_needs_a_path():
    with pytest.raises(ValueError, match=r"holds out 60% of the images, leaving 40% to train on: use 0.05-0.2 "
                                         r"\(at most 0.5\)"):
        params.Data(holdout=0.6)
    with pytest.raises(ValueError, match="data.source=folder needs data.path"):
        params.Data(source="folder")
    assert params.Data(source="folder", path="/some/images").path == "/some/images"


def test_vram_classes_rank_map_and_prodigy_betas():
    for gb in ("auto", 8, 12, 16, 24, 40, 80):
        assert params.Model(vram_gb=gb).vram_gb == gb
    for gb in (9, 13, 17, 25, 32, 48, 141):
        with pytest.raises(ValueError, match="vram_gb"):
            params.Model(vram_gb=gb)
    assert params.Lora(rank_map={"attn": 1}).rank_map == {"attn": 1}
    with pytest.raises(ValueError, match=r"ranks must be >= 1, got \{'ff': 0\}"):
        params.Lora(rank_map={"attn": 2, "ff": 0})
    assert params.ProdigyOpts(betas=[0.9, 0.999]).betas == [0.9, 0.999]
    for betas in ([0.9], [0.9, 0.99, 0.999]):
        with pytest.raises(ValueError, match="betas"):
            params.ProdigyOpts(betas=betas)


def test_prodigy_lr_range_and_warning_and_adafactor_warmup(caplog):
    caplog.set_level("WARNING")
    for lr in (0.1, 1.0, 10.0):
        assert params.Train(optimizer="prodigy", lr=lr).lr == lr
    for lr in (0.099, 10.01):
        with pytest.raises(ValueError, match=r"train.optimizer=prodigy estimates the step size itself .* use train.lr=1.0"):
            params.Train(optimizer="prodigy", lr=lr)
    caplog.clear()
    params.Train(optimizer="prodigy", lr=1.0)
    params.Train(optimizer="adamw", lr=0.5)
    assert caplog.text == ""
    params.Train(optimizer="prodigy", lr=2.0)
    assert "train.optimizer=prodigy with train.lr=2: the community setting is 1.0" in caplog.text
    with pytest.raises(ValueError, match="warmup_init needs train.adafactor.relative_step=true"):
        params.Train(adafactor={"warmup_init": True})
    assert params.Train(adafactor={"warmup_init": True, "relative_step": True}).adafactor.warmup_init


INT_FIELDS = [("lora.rank", True), ("lora.rank", 4.0), ("data.limit", 10.0), ("data.limit", False),
              ("sample.seeds", [0, 1.0]), ("sample.seeds", [True]), ("lora.double_blocks", [0, True]),
              ("lora.rank_map", {"attn": 2.0}), ("lora.rank_map", {"attn": True})]


@pytest.mark.parametrize("dotted,value", INT_FIELDS, ids=[f"{d}={v}" for d, v in INT_FIELDS])
def test_booleans_and_floats_are_no_integers(dotted, value):
    """pydantic would quietly make `true` 1 and 4.0 4: an int field, an optional one, a list and a dict of them."""
    with pytest.raises(params.ParamsError, match=f"{dotted}( = .*)?: booleans and floats are not integers here: "
                                                 "write a whole number, e.g. 4"):
        params.validate(with_value(dotted, value))


def test_whole_numbers_and_non_integer_fields_still_pass():
    p = params.validate(with_value("lora.double_blocks", [0, 1]))  # block 0 exists
    assert p.lora.double_blocks == [0, 1]
    for dotted, value in [("lora.rank", 8), ("data.limit", 10), ("data.limit", None), ("sample.seeds", [0, 7]),
                          ("lora.rank_map", {"attn": 2}), ("lora.double_blocks", None), ("train.lr", 1),
                          ("train.lr", 0.5), ("eval.ab_scale", 1), ("eval.grid.scales", [0.5, 1]),
                          ("data.folder.repeats", False), ("data.synthetic.near_duplicates", 0)]:
        got = params.validate(with_value(dotted, value)).model_dump()
        for part in dotted.split("."):
            got = got[part]
        assert got == value, dotted


@pytest.mark.parametrize("dotted,value,expect", [
    ("lora.double_blocks", [-1, 2], r"lora.double_blocks.0 = -1: Input should be greater than or equal to 0"),
    ("train.lr", float("inf"), r"train.lr = inf: Input should be a finite number"),
    ("train.lr", float("nan"), r"train.lr = nan: Input should be a finite number"),
    ("data.holdout", 0.0, r"data.holdout = 0.0: holds out no image, .* use 0.05-0.2"),
])
def test_negative_blocks_non_finite_numbers_and_no_holdout_are_refused(dotted, value, expect):
    with pytest.raises(params.ParamsError, match=expect):
        params.validate(with_value(dotted, value))


def test_a_path_with_a_tilde_is_the_users_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert params.validate(with_value("data.path", "~/pics")).data.path == f"{tmp_path}/pics"
    assert params.validate(with_value("data.path", "pics")).data.path == "pics"


@pytest.mark.parametrize("field,good,bad,message", [
    ("adapter_step", [(None, None), ("best", "best"), (1, 1), (500, 500), (500.0, 500)], [True, 0, -5, 2.5, "last"],
     "must be a step >= 1, 'best' (the operating point, eval.grid) or null"),
    ("lora_scale", [(None, None), ("best", "best"), (0.5, 0.5), (1, 1.0), (2.0, 2.0)], [True, 0, -0.5, "max"],
     "must be a scale > 0, 'best' (the operating point, eval.grid) or null"),
])
def test_the_adapter_step_and_lora_scale_are_a_number_best_or_null(field, good, bad, message):
    for value, expect in good:
        got = getattr(params.Sample(**{field: value}), field)
        assert got == expect and type(got) is type(expect), (field, value)
    for value in bad:
        with pytest.raises(ValidationError) as exc:
            params.Sample(**{field: value})
        assert message in str(exc.value), (field, value)


def test_grid_steps_are_all_or_a_list_of_steps():
    for steps in ("all", [1], [50, 100]):
        assert params.Grid(steps=steps).steps == steps
    for steps in ("some", [], [0], [True], [50.0], ["a"], [None], 50):
        with pytest.raises(ValidationError, match=r"must be all \(every train.save_every snapshot\) or a non-empty "
                                                  r"list of steps >= 1, e.g. \[500, 1000\]"):
            params.Grid(steps=steps)


def with_values(**values) -> dict:
    """Params with several dotted keys (written a__b) changed."""
    raw = params.Params().model_dump()
    for dotted, value in values.items():
        *path, last = dotted.split("__")
        d = raw
        for part in path:
            d = d[part]
        d[last] = value
    return raw


@pytest.mark.parametrize("best", [["adapter_step"], ["lora_scale"], ["adapter_step", "lora_scale"]])
def test_best_needs_the_operating_point_grid(best):
    values = {f"sample__{k}": "best" for k in best}
    p = params.validate(with_values(**values))  # the grid is on by default
    assert [getattr(p.sample, k) for k in best] == ["best"] * len(best)
    with pytest.raises(params.ParamsError, match=rf"sample.{best[0]}=best reads the operating point, which "
                                                 r"eval.grid.enabled=false does not compute: set eval.grid.enabled=true"):
        params.validate(with_values(**values, eval__grid__enabled=False))
    assert not params.validate(with_values(eval__grid__enabled=False)).eval.grid.enabled  # without best: fine


@pytest.mark.parametrize("train,grid_steps,kept", [
    ({}, [50, 100, 150], None),                                    # save_every 50, keep_last 3, steps 150
    ({"keep_last": 1}, [150], None),
    ({"keep_last": 1}, [100], [150]),                              # only the newest snapshot stays
    ({"keep_last": 0}, [50, 100], None),                           # 0 = all stay
    ({"save_every": 0}, [150], None),                              # no snapshots: the final adapter only
    ({"save_every": 0}, [50], [150]),
    ({"steps": 149}, [50, 100, 149], None),                        # the final adapter is always there
    ({"steps": 149}, [150], [50, 100, 149]),                       # no step past the end
    ({"steps": 160, "save_every": 40, "keep_last": 2}, [120, 160], None),
    ({"steps": 160, "save_every": 40, "keep_last": 2}, [40, 80, 160], [120, 160]),
])
def test_grid_steps_must_be_snapshots_training_keeps(train, grid_steps, kept):
    raw = with_values(**{f"train__{k}": v for k, v in train.items()}, eval__grid__steps=grid_steps)
    if kept is None:
        assert params.validate(raw).eval.grid.steps == grid_steps
        return
    t = params.Params().train.model_copy(update=train)
    missing = sorted(set(grid_steps) - set(kept))
    with pytest.raises(params.ParamsError) as exc:
        params.validate(raw)
    assert (f"eval.grid.steps {missing}: training keeps no adapter at these steps (kept: {kept} with "
            f"train.save_every={t.save_every}, keep_last={t.keep_last}, steps={t.steps}); use all or some of "
            "those") in str(exc.value)
