"""Preflight names every missing external resource, fast, without touching the network."""
import time

import pytest

from stages.core import params, preflight


def test_smoke_profile_needs_nothing_from_outside():
    p = params.Params()
    assert preflight.needs(p) == []
    preflight.check(p)  # no exception


def test_flux_dev_profile_offline_fails_fast_naming_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(preflight, "hub_offline", lambda: True)
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
