"""Preflight names every missing external resource, fast, without touching the network."""
import time

import pytest

from stages.core import hub, params, preflight


def test_smoke_profile_needs_nothing_from_outside():
    p = params.Params()
    assert preflight.needs(p) == []
    preflight.check(p)  # no exception


def test_flux_dev_profile_offline_fails_fast_naming_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hub, "offline", lambda: True)
    p = params.validate(params.compose(["profile=flux-dev"]))
    t0 = time.time()
    with pytest.raises(SystemExit) as exc:
        preflight.check(p)
    msg = str(exc.value)
    assert time.time() - t0 < 30  # seconds (imports of open_clip/torch), not hours into a run
    assert "black-forest-labs/FLUX.1-dev" in msg and "base model weights" in msg
    assert "WikiArt dataset" in msg and "huggan/wikiart" in msg
    assert "HF_HUB_OFFLINE" in msg
    assert "Traceback" not in msg


def test_local_paths_are_checked_on_disk(tmp_path):
    p = params.Params()
    p.model.base = str(tmp_path / "nope")
    assert any("does not exist" in line for line in preflight.problems(p))
    (tmp_path / "nope").mkdir()
    assert preflight.problems(p) == []


def test_skip_flag(monkeypatch):
    p = params.Params()
    p.model.base = "/definitely/missing"
    monkeypatch.setenv("FLUXIMP_SKIP_PREFLIGHT", "1")
    preflight.check(p)


def test_download_stage_runs_preflight_first(tmp_path, monkeypatch):
    """`dvc exp run -S profile=flux-dev` offline stops at the first stage with the list."""
    import subprocess
    import sys

    import yaml

    raw = params.validate(params.compose(["profile=flux-dev"])).model_dump()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(params.ROOT), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    proc = subprocess.run([sys.executable, "-m", "stages.download"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "base model weights" in proc.stderr and "WikiArt dataset" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()


def test_open_clip_tags_are_found_without_the_shim_applied_first(tmp_path):
    """A fresh process (no conftest shim): ViT-L-14/openai exists; what is missing is its download."""
    import subprocess
    import sys

    code = ("from stages.core import params, preflight\n"
            "p = params.Params(clip={'model': 'ViT-L-14', 'pretrained': 'openai'})\n"
            "print(preflight.problems(p))\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(params.ROOT), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no pretrained tag" not in proc.stdout
    assert "CLIP weights" in proc.stdout and "not in the local Hugging Face cache" in proc.stdout


def test_folder_source_without_images_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("no pictures here")
    p = params.Params(data={"source": "folder", "path": str(tmp_path)})
    assert any("holds no image file" in line for line in preflight.problems(p))
    p = params.Params(data={"source": "folder", "path": str(tmp_path / "missing")})
    assert any("is not a directory" in line for line in preflight.problems(p))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"x")
    p = params.Params(data={"source": "folder", "path": str(tmp_path)})
    assert preflight.problems(p) == []


def test_validate_stage_fails_before_any_output(tmp_path):
    """The first stage of dvc.yaml: bad params or a failing preflight stop the pipeline here."""
    import subprocess
    import sys

    import yaml

    raw = params.Params().model_dump()
    raw["lora"]["rank"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(params.ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "stages.validate"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "lora.rank = 0" in proc.stderr and "git checkout params.yaml" in proc.stderr
    assert not (tmp_path / "reports").exists()
    spec = yaml.safe_load((params.ROOT / "dvc.yaml").read_text())["stages"]
    assert list(spec)[0] == "validate" and spec["validate"]["params"] == [{"params.yaml": None}]
    for name, stage in spec.items():  # so DVC runs validate before removing any stage's outputs
        assert name == "validate" or "reports/validated.txt" in stage["deps"], name
