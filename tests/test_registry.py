"""MLflow: a named experiment that the UI opens on the runs table, and registered versions that say
what they are (data hash, changed params, headline metrics) with a ``best-style`` alias."""
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.core import lineage, params, registry, tracking
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


def _train(p, name: str) -> str:
    """train: writes models/lora (weights that depend on the params), registers a version tagged with
    their hash (here a small logged folder and create_model_version, not the diffusers flavour)."""
    import mlflow

    os.environ["DVC_EXP_NAME"] = name
    try:
        with tracking.run("train", p, new=True) as run_id:
            Path("models/lora").mkdir(parents=True, exist_ok=True)
            Path("models/lora", lineage.ADAPTER_WEIGHTS).write_text(f"rank {p.lora.rank} seed {p.seed}\n")
            sha = tracking.tag_adapter("models/lora")
            tracking.log_artifacts(["models/lora"])
            client, name = mlflow.MlflowClient(), p.mlflow.registered_model
            if not client.search_registered_models(f"name='{name}'"):
                client.create_registered_model(name)
            client.create_model_version(name, f"{mlflow.get_artifact_uri()}/lora", run_id=run_id,
                                        tags={tracking.ADAPTER_TAG: sha})
            registry.describe_version(p)
    finally:
        os.environ.pop("DVC_EXP_NAME", None)
    return run_id


def _evaluate(p, style: float) -> str:
    """evaluate the adapter now in models/lora: attaches to its run by the adapter's hash."""
    metrics = {"style_centroid_lora": style, "style_nn_lora": 0.9, "clip_score_lora": 1.2,
               "clip_score_ratio": 1.01, "kid_lora": 0.0006, "trait_stroke_isotropy_lora": 0.3}
    Path("data/curated").mkdir(parents=True, exist_ok=True)
    Path("data/curated/holdout.parquet").write_bytes(b"holdout rows")
    with tracking.run("evaluate", p, adapter_sha=lineage.adapter_hash("models/lora"),
                      reads={"curated": "data/curated"}) as run_id:
        tracking.log_metrics(metrics)
        registry.describe_version(p, metrics)
    return run_id


def _one_execution(p, style: float, name: str) -> str:
    run_id = _train(p, name)
    assert _evaluate(p, style) == run_id
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
    assert f"data/curated {lineage.dir_md5('data/curated')}" in v2.description  # hashed from the files read
    assert "feedbeef.dir" not in v2.description and "DVC experiment rank8" in v2.description
    assert f"adapter sha256: {v2.tags[tracking.ADAPTER_TAG]}" in v2.description
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


def test_back_to_the_baseline_evaluates_into_the_baselines_run(repo, caplog):
    """Issue 25: baseline, an experiment with another rank, then the baseline's adapter back on disk
    (dvc checkout / exp apply) and evaluate again: the metrics go to the baseline's run and version; the
    experiment's run and registered version stay as they were; best-style follows each version's own value."""
    import mlflow

    base = params.load()
    rank32 = base.model_copy(update={"lora": base.lora.model_copy(update={"rank": 32})})
    baseline_adapter = None
    base_run = _train(base, "")
    baseline_adapter = Path("models/lora", lineage.ADAPTER_WEIGHTS).read_bytes()
    _evaluate(base, 0.60)
    exp_run = _train(rank32, "exp-rank32")
    assert _evaluate(rank32, 0.90) == exp_run

    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    name = base.mlflow.registered_model
    v1, v2 = (client.get_model_version(name, v) for v in ("1", "2"))
    exp_history = [m.value for m in client.get_metric_history(exp_run, "style_centroid_lora")]
    assert str(client.get_model_version_by_alias(name, "best-style").version) == "2"

    Path("models/lora", lineage.ADAPTER_WEIGHTS).write_bytes(baseline_adapter)  # what dvc checkout restores
    with caplog.at_level("INFO"):
        again = _evaluate(base, 0.65)  # the baseline, evaluated again (a different sample, say)
    assert again == base_run and "which trained the adapter on disk" in caplog.text
    assert [m.value for m in client.get_metric_history(exp_run, "style_centroid_lora")] == exp_history == [0.9]
    assert [m.value for m in client.get_metric_history(base_run, "style_centroid_lora")] == [0.6, 0.65]
    v2_after = client.get_model_version(name, "2")
    assert (v2_after.description, v2_after.tags) == (v2.description, v2.tags)  # the experiment's version untouched
    v1_after = client.get_model_version(name, "1")
    assert v1_after.tags["style_centroid_lora"] == "0.65" and v1_after.description != v1.description
    assert "lora.rank=32" in v2.description and "params that differ from the commit: none" in v1_after.description
    assert str(client.get_model_version_by_alias(name, "best-style").version) == "2"  # 0.9 > 0.65

    # an adapter no run produced (trained elsewhere, copied in): a new run tagged with it, said loudly;
    # no registered version is touched
    Path("models/lora", lineage.ADAPTER_WEIGHTS).write_bytes(b"someone else's adapter")
    caplog.clear()
    with caplog.at_level("WARNING"):
        stray = _evaluate(base, 0.99)
    assert stray not in (base_run, exp_run) and "logs to a NEW run" in caplog.text
    assert client.get_run(stray).data.tags[tracking.ADAPTER_TAG] == lineage.adapter_hash("models/lora")
    assert [client.get_model_version(name, v).tags for v in ("1", "2")] == [v1_after.tags, v2.tags]
    assert str(client.get_model_version_by_alias(name, "best-style").version) == "2"  # 0.99 has no version


def test_a_run_whose_version_holds_another_adapter_is_not_described(repo, caplog):
    """A run found for an adapter never rewrites a version registered with other weights."""
    import mlflow

    p = params.load()
    run_id = _train(p, "")
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    name = p.mlflow.registered_model
    before = client.get_model_version(name, "1")
    tracking.reset()
    tracking.start("evaluate", p, adapter_sha=lineage.adapter_hash("models/lora"))
    assert tracking.run_id() == run_id
    tracking._state["adapter"] = "0" * 64  # the run's version was registered with other weights
    with caplog.at_level("WARNING"):
        assert registry.describe_version(p, {"style_centroid_lora": 0.1}) is None
    tracking.end()
    after = client.get_model_version(name, "1")
    assert (after.description, after.tags) == (before.description, before.tags) and "another adapter" in caplog.text
