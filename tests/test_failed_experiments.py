"""A failing `dvc exp run` loses nothing: the validate stage (stages/validate.py) runs before DVC
removes any stage's outputs, on a throwaway project (tests/tinydvc.py) with the real stage and the
real dvc.yaml entry of its output (persist: a failed validate keeps reports/validated.txt)."""
import pytest
import yaml

from tests.tinydvc import REPO, commit_all, dvc, make_project, sh


def project_with_validate(root):
    root = make_project(root)
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    real = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["validate"]
    spec["stages"] = {"validate": {"cmd": real["cmd"], "params": [{"params.yaml": None}], "outs": real["outs"]},
                      **spec["stages"]}
    for name in ("data", "train"):
        spec["stages"][name]["deps"].insert(0, "reports/validated.txt")
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    dvc(root, "repro", FLUXIMP_MLFLOW="0")
    commit_all(root, "baseline")
    return root


@pytest.mark.slow
def test_failing_experiment_keeps_every_earlier_output(tmp_path):
    root = project_with_validate(tmp_path / "proj")
    off = {"FLUXIMP_MLFLOW": "0"}
    before = {p: (root / p).read_text() for p in ("models/lora/weights.txt", "data/curated/train.txt",
                                                  "reports/metrics.json")}

    bad = dvc(root, "exp", "run", "-S", "lora.rank=0", check=False, **off)
    assert bad.returncode != 0
    assert "lora.rank = 0" in bad.stdout + bad.stderr and "git checkout params.yaml" in bad.stdout + bad.stderr
    assert {p: (root / p).read_text() for p in before} == before  # nothing deleted, nothing changed

    out = dvc(root, "exp", "run", "-S", "lora.rank=8", **off).stdout  # a good one after it still runs
    assert "Stage 'data' didn't change" in out
    assert (root / "models/lora/weights.txt").read_text().startswith("rank=8")


@pytest.mark.slow
def test_a_failed_validate_changes_nothing_but_params_yaml(tmp_path):
    """DVC removes a stage's outs before its command; validate's own output is `persist`, so after a
    refused `dvc exp run -S seed=-1` git shows params.yaml (DVC's edit) and nothing else, and the
    message says how to go back."""
    root = project_with_validate(tmp_path / "proj")
    bad = dvc(root, "exp", "run", "-S", "seed=-1", check=False, FLUXIMP_MLFLOW="0")
    assert bad.returncode != 0 and "seed = -1" in bad.stdout + bad.stderr
    assert "git checkout params.yaml" in bad.stdout + bad.stderr
    assert sh(root, "git", "status", "--porcelain").stdout.splitlines() == [" M params.yaml"]
    sh(root, "git", "checkout", "params.yaml")
    assert "Data and pipelines are up to date" in dvc(root, "status", FLUXIMP_MLFLOW="0").stdout
