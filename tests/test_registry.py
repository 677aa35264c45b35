"""MLflow: a named experiment that the UI opens on the runs table, and registered versions that say
what they are (data hash, changed params, headline metrics) with a ``best-style`` alias."""
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.core import params, registry, tracking
from stages.metrics import vocab


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A committed git repo with params.yaml (lora.rank 4) and a dvc.lock naming data/curated."""
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "FLUXIMP_MLFLOW", "FLUXIMP_MLFLOW_STRICT"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "repo"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(params.Params().model_dump()))
    lock = {"schema": "2.0", "stages": {"caption": {"cmd": "x", "outs": [
        {"path": "data/curated", "hash": "md5", "md5": "feedbeef.dir", "size": 1, "nfiles": 1}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    for cmd in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "i"]):
        subprocess.run(["git", *cmd], cwd=root, check=True, capture_output=True)
    monkeypatch.chdir(root)
    tracking.reset()
    yield root
    tracking.end()
    tracking.reset()
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def _one_execution(p, style: float, name: str) -> str:
    """train (registers a version: here a small logged folder, not a real adapter) + evaluate."""
    import mlflow

    os.environ["DVC_EXP_NAME"] = name
    try:
        with tracking.run("train", p, new=True) as run_id:
            Path("adapter").mkdir(exist_ok=True)
            Path("adapter/weights.txt").write_text(f"rank {p.lora.rank}\n")
            tracking.log_artifacts(["adapter"])
            client, name = mlflow.MlflowClient(), p.mlflow.registered_model
            if not client.search_registered_models(f"name='{name}'"):
                client.create_registered_model(name)
            client.create_model_version(name, f"{mlflow.get_artifact_uri()}/adapter", run_id=run_id)
            registry.describe_version(p)
        metrics = {"style_centroid_lora": style, "style_nn_lora": 0.9, "clip_score_lora": 1.2,
                   "clip_score_ratio": 1.01, "kid_lora": 0.0006, "trait_stroke_isotropy_lora": 0.3}
        with tracking.run("evaluate", p):
            tracking.log_metrics(metrics)
            registry.describe_version(p, metrics)
    finally:
        os.environ.pop("DVC_EXP_NAME", None)
    return run_id


def test_versions_are_described_and_best_style_follows_the_best_run(repo):
    import mlflow

    base = params.load()
    rank8 = base.model_copy(update={"lora": base.lora.model_copy(update={"rank": 8})})
    rank2 = base.model_copy(update={"lora": base.lora.model_copy(update={"rank": 2})})
    _one_execution(base, 0.50, "base")
    best_run = _one_execution(rank8, 0.70, "rank8")
    _one_execution(rank2, 0.60, "rank2")

    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    name = base.mlflow.registered_model
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    assert sorted(versions) == ["1", "2", "3"]
    v2 = client.get_model_version(name, "2")
    assert "feedbeef.dir" in v2.description and "DVC experiment rank8" in v2.description
    assert "lora.rank=8 (was 4)" in v2.description
    assert f"{vocab.header('style_centroid_lora')} 0.7000" in v2.description
    assert "trait_stroke_isotropy" not in v2.description  # the headline only
    assert v2.tags["style_centroid_lora"] == "0.7" and "trait_stroke_isotropy_lora" not in v2.tags
    assert "params that differ from the commit: none" in client.get_model_version(name, "1").description
    best = client.get_model_version_by_alias(name, "best-style")
    assert str(best.version) == "2" and best.run_id == best_run  # not the newest (3): the best style
    assert str(client.get_latest_versions(name)[0].version) == "3"  # models:/<name>/latest = the newest

    exp = client.get_experiment_by_name(base.mlflow.experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # UI: runs table, not traces
    assert tracking.runs_url("http://127.0.0.1:5000") == f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs"


def test_an_experiment_made_before_gets_the_runs_table_tag(repo):
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    exp_id = mlflow.create_experiment(params.load().mlflow.experiment)
    assert "mlflow.experimentKind" not in mlflow.MlflowClient().get_experiment(exp_id).tags
    with tracking.run("train", params.load(), new=True):
        pass
    assert mlflow.MlflowClient().get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
