"""Params the schema's types accept but that would silently do the wrong thing are rejected in
seconds, naming the key, the value and what works; YAML syntax errors are named too."""
import pytest

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
