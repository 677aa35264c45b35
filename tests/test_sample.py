"""sample stage: prompt file parsing, the grid, and the stage end to end on tiny-random Flux with a
small random LoRA (built with peft here, saved with FluxPipeline.save_lora_weights)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import sample
from stages.core import params
from tests.samplekit import PROMPTS, make_adapter
from tests.stagerun import run_stage, write_params

def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\n a harbour \n\nsecond one\n")
    assert sample.read_prompts(f) == ["a harbour", "second one"]
    f.write_text("same\nsame\n")
    with pytest.raises(SystemExit, match="duplicate"):
        sample.read_prompts(f)
    f.write_text("# only a comment\n")
    with pytest.raises(SystemExit, match="no prompts"):
        sample.read_prompts(f)
    with pytest.raises(SystemExit, match="no such file"):
        sample.read_prompts(tmp_path / "missing.txt")


def test_prompt_files_in_conf():
    smoke = sample.read_prompts(Path(params.ROOT) / "conf/prompts/smoke.txt")
    real = sample.read_prompts(Path(params.ROOT) / "conf/prompts/flux-dev.txt")
    assert len(smoke) >= 4 and len(real) >= 16
    assert not any("impressionis" in p.lower() for p in real)  # content only, no style words


def test_trigger_and_grid():
    assert sample.with_trigger("a bowl", "impressionism style") == "a bowl, impressionism style"
    assert sample.with_trigger("a bowl, impressionism style", "impressionism style") == \
        "a bowl, impressionism style"
    rows = [[Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")] for _ in range(2)]
    g = sample.grid(rows, ["p one", "p two"], ["base", "LoRA 0.5", "LoRA 1"], "seed 0")
    assert g.size == (180 + 3 * 128, 34 + 2 * 128)
    assert g.getpixel((180 + 128 + 60, 34 + 128 + 60)) == (0, 128, 0)  # row 2, column 2 = green


@pytest.mark.slow
def test_sample_stage_end_to_end(sampled):
    out = sampled / "reports" / "samples"
    index = json.loads((out / "index.json").read_text())
    assert index["prompts"] == PROMPTS and index["scales"] == [0.0, 0.5, 1.0]
    assert index["trigger"] == "impressionism style" and len(index["adapter_sha256"]) == 64
    assert len(index["images"]) == 2 * 2 * 3
    for im in index["images"]:
        assert (out / im["file"]).exists()
        assert im["full_prompt"] == f"{im['prompt']}, impressionism style"  # base and LoRA alike
        assert im["kind"] == ("base" if im["scale"] == 0 else "lora")
    assert [g["file"] for g in index["grids"]] == ["grids/seed-0.png", "grids/seed-1.png"]
    assert Image.open(out / "grids/seed-0.png").size == (180 + 3 * 128, 34 + 2 * 128)

    def px(p, s, scale):
        return np.asarray(Image.open(out / f"images/p{p:02d}-s{s}-l{scale:.2f}.png"), dtype=float)

    assert px(0, 0, 0.0).shape == (64, 64, 3)
    d_half = np.abs(px(0, 0, 0.5) - px(0, 0, 0.0)).mean()
    d_full = np.abs(px(0, 0, 1.0) - px(0, 0, 0.0)).mean()
    assert 0 < d_half < d_full  # the adapter acts, in proportion to its scale
    assert np.abs(px(0, 1, 0.0) - px(0, 0, 0.0)).mean() > d_full  # seeds differ more than scales


def test_missing_adapter_is_a_clear_error(tmp_path, monkeypatch):
    write_params(tmp_path, "sample.prompts=prompts.txt")
    (tmp_path / "prompts.txt").write_text("a bowl of pears\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="run the train stage"):
        sample.main()


def test_adapter_step_renders_a_snapshot_and_names_the_saved_steps(tmp_path, monkeypatch):
    import hashlib

    from stages.models import snapshots

    sampling = ["sample.prompts=prompts.txt", "sample.seeds=[0]", "sample.steps=1", "sample.lora_scales=[1.0]"]
    p = write_params(tmp_path, *sampling, "sample.adapter_step=4")
    (tmp_path / "prompts.txt").write_text("a bowl of pears\n")
    monkeypatch.chdir(tmp_path)
    make_adapter(p, tmp_path / "models/lora")
    with pytest.raises(SystemExit, match=r"adapter_step=4.*saved steps: none"):
        sample.main()
    snap = tmp_path / "models/snapshots/step-000004"
    make_adapter(p, snap)
    (snap / "adapter.json").write_text("{}")
    run_stage(sample.main, tmp_path)
    index = json.loads((tmp_path / "reports/samples/index.json").read_text())
    assert index["adapter_step"] == 4
    assert index["adapter_sha256"] == hashlib.sha256((snap / sample.LORA_FILE).read_bytes()).hexdigest()
    write_params(tmp_path, *sampling, "sample.adapter_step=2")
    with pytest.raises(SystemExit, match=r"saved steps: \[4\]"):
        sample.main()
