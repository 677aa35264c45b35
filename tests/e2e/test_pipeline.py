"""The whole pipeline, as a user runs it: a fresh clone, `dvc repro`, a no-op rerun, an experiment.

One module-scoped clone is shared by the tests below, in order (pytest keeps file order)."""
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from tests.e2e.clone import clone, run

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def declared_outputs(repo: Path) -> list[Path]:
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    paths = []
    for stage in spec["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for item in stage.get(kind, []):
                paths.append(repo / (next(iter(item)) if isinstance(item, dict) else item))
    return paths


def lora_ranks(path: Path) -> set[int]:
    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_shape()[0] for k in f.keys() if "lora_A" in k}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    dest = clone(tmp_path_factory.mktemp("e2e") / "repo")  # the committed code, as CI and users get it
    yield dest
    shutil.rmtree(dest, ignore_errors=True)


def test_repro_builds_every_declared_output(repo):
    out = run("dvc repro", repo)
    # the smoke run prints no warning: none is one a user must act on (stages/core/log.py NOISE_*)
    noisy = [ln for ln in out.splitlines() if re.search(r"warn|^W\d{4} ", ln, re.IGNORECASE)]
    assert not noisy, "\n".join(noisy)
    # A clone has dvc.lock and the small reports (git) but none of the cached data: every stage with a
    # cached output must run. sample/evaluate may be skipped when the retrained adapter is
    # byte-identical to the committed run's (training is deterministic on CPU); then their committed
    # outputs are already the right ones.
    for stage in ("download", "dedupe", "filter", "caption", "encode", "train", "operating_point", "sample",
                  "evaluate"):
        assert f"Running stage '{stage}'" in out or (
            stage in ("operating_point", "sample", "evaluate") and f"Stage '{stage}' didn't change" in out), out[-3000:]
    missing = [str(p.relative_to(repo)) for p in declared_outputs(repo) if not p.exists()]
    assert not missing, f"declared outputs not written: {missing}"
    assert (repo / "models/lora/pytorch_lora_weights.safetensors").stat().st_size > 0
    assert lora_ranks(repo / "models/lora/pytorch_lora_weights.safetensors") == {4}
    metrics = json.loads((repo / "reports/eval/metrics_all.json").read_text())
    flat = json.dumps(metrics)
    for key in ("style", "clip_score", "kid", "trait"):
        assert key in flat, f"metrics_all.json lacks {key} metrics: {sorted(metrics)}"
    from stages.metrics import vocab
    assert json.loads((repo / "reports/metrics.json").read_text()) == vocab.headline(metrics)
    assert list((repo / "reports/samples").rglob("*.png")), "no sample images"
    # the smoke profile turns the operating-point grid on (train.save_every 50: steps 50, 100 and the final 150)
    rec = json.loads((repo / "reports/operating_point/operating_point.json").read_text())
    assert rec["enabled"] and rec["steps"] == [50, 100, 150] and len(rec["points"]) == 6
    assert json.loads((repo / "reports/eval/operating_point.json").read_text()) == rec


def test_second_repro_is_a_noop(repo):
    out = run("dvc repro", repo)
    assert "Running stage" not in out
    status = run("dvc status", repo)
    assert "up to date" in status
    # bytecode is not code: a new .pyc (another Python, a test run) must not invalidate the stages
    (repo / "stages/core/__pycache__").mkdir(exist_ok=True)
    (repo / "stages/core/__pycache__/stray.cpython-399.pyc").write_bytes(b"\0")
    assert "up to date" in run("dvc status", repo)


def test_experiment_reruns_only_train_sample_evaluate(repo):
    out = run("dvc exp run -S lora.rank=8", repo)
    ran = set(re.findall(r"Running stage '(\w+)'", out))
    # validate (params + preflight, no data outputs) checks every params.yaml change first; of the
    # stages that produce something, only train -> operating_point -> sample -> evaluate rerun
    assert ran == {"validate", "train", "operating_point", "sample", "evaluate"}, out[-3000:]
    assert lora_ranks(repo / "models/lora/pytorch_lora_weights.safetensors") == {8}
    shown = json.loads(run("dvc exp show --json", repo, timeout=300, stdout_only=True))
    ranks = set(_find(shown, "lora", "rank"))
    assert {4, 8} <= ranks, f"dvc exp show should list the baseline (rank 4) and the experiment: {ranks}"


def _find(obj, section, key):
    """Every value of obj[...][section][key] anywhere in dvc's nested JSON."""
    if isinstance(obj, dict):
        if isinstance(obj.get(section), dict) and key in obj[section]:
            yield obj[section][key]
        for v in obj.values():
            yield from _find(v, section, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _find(v, section, key)
