"""A failing `dvc exp run` loses nothing: the validate stage (stages/validate.py) runs before DVC
removes any stage's outputs, on a throwaway project (tests/tinydvc.py) with the real stage."""
import pytest
import yaml

from tests.tinydvc import commit_all, dvc, make_project


@pytest.mark.slow
def test_failing_experiment_keeps_every_earlier_output(tmp_path):
    root = make_project(tmp_path / "proj")
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    spec["stages"] = {"validate": {"cmd": "python -m stages.validate", "params": [{"params.yaml": None}],
                                   "outs": [{"reports/validated.txt": {"cache": False}}]},
                      **spec["stages"]}
    for name in ("data", "train"):
        spec["stages"][name]["deps"].insert(0, "reports/validated.txt")
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    off = {"FLUXIMP_MLFLOW": "0"}
    dvc(root, "repro", **off)
    commit_all(root, "baseline")
    before = {p: (root / p).read_text() for p in ("models/lora/weights.txt", "data/curated/train.txt",
                                                  "reports/metrics.json")}

    bad = dvc(root, "exp", "run", "-S", "lora.rank=0", check=False, **off)
    assert bad.returncode != 0
    assert "lora.rank = 0" in bad.stdout + bad.stderr and "git checkout params.yaml" in bad.stdout + bad.stderr
    assert {p: (root / p).read_text() for p in before} == before  # nothing deleted, nothing changed

    out = dvc(root, "exp", "run", "-S", "lora.rank=8", **off).stdout  # a good one after it still runs
    assert "Stage 'data' didn't change" in out
    assert (root / "models/lora/weights.txt").read_text().startswith("rank=8")
