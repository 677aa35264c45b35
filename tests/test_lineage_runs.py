"""Issue 25, point 2, end to end in a real DVC repo (tests/tinydvc.py with a train that registers its
adapter and an evaluate that attaches by the adapter's hash, as stages/train.py and stages/evaluate.py
do): baseline, an experiment with another rank, back to the baseline (git checkout + dvc checkout),
evaluate again, then `dvc exp apply` of the experiment and evaluate again, then a `--temp` experiment. Each adapter's metrics go to
the run that trained it; the other run and its registered version are never rewritten."""
from pathlib import Path

import pytest
import yaml

from tests.tinydvc import commit_all, dvc, make_project, sh

TRAIN = '''\
import pathlib
import mlflow
from stages.core import params, registry, tracking
p = params.load()
with tracking.run("train", p, new=True, reads={"curated": "data/curated"}) as run_id:
    pathlib.Path("models/lora").mkdir(parents=True, exist_ok=True)
    pathlib.Path("models/lora/pytorch_lora_weights.safetensors").write_text(f"rank={p.lora.rank}\\n")
    sha = tracking.tag_adapter("models/lora")
    tracking.log_artifacts(["models/lora"])
    client, name = mlflow.MlflowClient(), p.mlflow.registered_model
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    client.create_model_version(name, f"{mlflow.get_artifact_uri()}/lora", run_id=run_id,
                                tags={tracking.ADAPTER_TAG: sha})
    registry.describe_version(p)
'''

EVALUATE = '''\
import json, logging, math, pathlib
logging.basicConfig(level=logging.INFO)
from stages.core import lineage, params, registry, tracking
p = params.load()
text = pathlib.Path("models/lora/pytorch_lora_weights.safetensors").read_text()
rank = int(text.split("=")[1])
m = {"style_centroid_lora": round(0.5 + 0.05 * math.log2(rank), 4)}
pathlib.Path("reports").mkdir(exist_ok=True)
pathlib.Path("reports/metrics.json").write_text(json.dumps(m))
with tracking.run("evaluate", p, adapter_sha=lineage.adapter_hash("models/lora"), reads={"curated": "data/curated"}):
    tracking.log_metrics(m)
    registry.describe_version(p, m)
'''


def project(root: Path) -> Path:
    make_project(root)
    (root / "train.py").write_text(TRAIN)
    (root / "evaluate.py").write_text(EVALUATE)
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    spec["stages"]["train"].pop("metrics")
    spec["stages"]["train"].pop("plots")
    spec["stages"]["evaluate"] = {"cmd": "python evaluate.py", "deps": ["evaluate.py", "models/lora", "data/curated"],
                                  "metrics": [{"reports/metrics.json": {"cache": False}}]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    commit_all(root, "train registers, evaluate attaches by adapter hash")
    return root


@pytest.mark.slow
def test_exp_back_to_baseline_and_exp_apply_evaluate_into_each_adapters_run(tmp_path):
    import mlflow

    from stages.core import lineage, params

    root = project(tmp_path / "proj")
    dvc(root, "repro")
    commit_all(root, "baseline")
    dvc(root, "exp", "run", "-n", "r32", "-S", "lora.rank=32")

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    name = params.Params().mlflow.registered_model
    metric = "style_centroid_lora"

    def by_rank():
        return {int(client.get_run(v.run_id).data.params["lora.rank"]): v
                for v in client.search_model_versions(f"name='{name}'")}

    versions = by_rank()
    assert sorted(versions) == [4, 32]
    base_run, exp_run = versions[4].run_id, versions[32].run_id
    exp_version = versions[32]
    assert [m.value for m in client.get_metric_history(exp_run, metric)] == [0.75]

    # back to the baseline: params and lock from git, the adapter from DVC's cache; evaluate again
    sh(root, "git", "checkout", "--", "params.yaml", "dvc.lock", "reports/metrics.json")
    dvc(root, "checkout")
    assert "rank=4" in (root / "models/lora/pytorch_lora_weights.safetensors").read_text()
    out = dvc(root, "repro", "-f", "-s", "evaluate")
    assert "which trained the adapter on disk" in out.stdout + out.stderr
    assert [m.value for m in client.get_metric_history(exp_run, metric)] == [0.75]  # the experiment's run: as it was
    assert [m.value for m in client.get_metric_history(base_run, metric)] == [0.6, 0.6]  # the baseline's, twice
    after = by_rank()
    assert (after[32].description, after[32].tags) == (exp_version.description, exp_version.tags)
    assert "lora.rank=32 (was 4)" in after[32].description and after[32].tags[metric] == "0.75"
    assert "params that differ from the commit: none" in after[4].description and after[4].tags[metric] == "0.6"
    assert str(client.get_model_version_by_alias(name, "best-style").version) == str(after[32].version)
    tags = client.get_run(base_run).data.tags
    assert tags["dataset.curated_md5"] == lineage.dir_md5(root / "data/curated")  # hashed from the files read

    # dvc exp apply brings the experiment's adapter back: evaluate attaches to the experiment's run
    dvc(root, "exp", "apply", "r32")
    dvc(root, "repro", "-f", "-s", "evaluate")
    assert [m.value for m in client.get_metric_history(exp_run, metric)] == [0.75, 0.75]
    assert [m.value for m in client.get_metric_history(base_run, metric)] == [0.6, 0.6]
    assert len(client.search_runs([client.get_run(base_run).info.experiment_id])) == 2  # no stray run

    # a --temp experiment (DVC runs it in a copy under .dvc/tmp/exps): its evaluate finds its own train run
    dvc(root, "exp", "run", "--temp", "-n", "r8", "-S", "lora.rank=8")
    r8 = by_rank()[8]
    assert [m.value for m in client.get_metric_history(r8.run_id, metric)] == [0.65] and r8.tags[metric] == "0.65"
    assert [m.value for m in client.get_metric_history(exp_run, metric)] == [0.75, 0.75]
    assert [m.value for m in client.get_metric_history(base_run, metric)] == [0.6, 0.6]
    assert len(client.search_runs([client.get_run(base_run).info.experiment_id])) == 3
