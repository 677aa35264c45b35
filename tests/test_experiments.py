"""`dvc exp` workflows with this repo's Hydra layout, on a throwaway project (tests/tinydvc.py):
-S overrides composed into params.yaml, show sorted by a style metric, diff, plots diff, apply,
branch; a queued sweep run by `dvc queue start -j 2` that logs to the main repo's MLflow database
from DVC's temp copies; the sweep summary; and the real repo's queued-run prerequisites."""
import csv
import io
import json
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.tinydvc import REPO, commit_all, dvc, make_project, sh

STYLE = "reports/metrics.json:style_similarity"


def rank_of(root: Path) -> int:
    return yaml.safe_load((root / "params.yaml").read_text())["lora"]["rank"]


@pytest.mark.slow
def test_exp_run_show_diff_plots_apply_branch(tmp_path):
    root = make_project(tmp_path / "proj")
    off = {"FLUXIMP_MLFLOW": "0"}
    dvc(root, "repro", **off)
    commit_all(root, "baseline")

    out = dvc(root, "exp", "run", "-n", "r32", "-S", "lora.rank=32", **off).stdout
    assert "Ran experiment(s): r32" in out and "Stage 'data' didn't change" in out
    assert rank_of(root) == 32  # Hydra composed conf/ + the override into params.yaml
    assert yaml.safe_load((root / "conf" / "config.yaml").read_text())["lora"]["rank"] == 4  # conf/ untouched
    dvc(root, "exp", "run", "-n", "r2", "-S", "lora.rank=2", **off)

    show = dvc(root, "exp", "show", "--csv", "--drop", ".*", "--keep", "Experiment|rev|lora.rank|style_similarity",
               "--sort-by", STYLE, "--sort-order", "desc").stdout
    rows = list(csv.DictReader(io.StringIO(show)))
    exps = [r for r in rows if r["Experiment"]]
    assert [r["Experiment"] for r in exps] == ["r32", "r2"]  # sorted by style_similarity, descending
    assert set(rows[0]) == {"Experiment", "rev", "lora.rank", "style_similarity"}
    assert float(exps[0]["style_similarity"]) > float(exps[1]["style_similarity"])

    diff = json.loads(dvc(root, "exp", "diff", "main", "r32", "--json").stdout)
    assert diff["params"]["params.yaml"]["lora.rank"] == {"old": 4, "new": 32, "diff": 28}
    assert diff["metrics"]["reports/metrics.json"]["style_similarity"]["diff"] > 0

    plots = tmp_path / "plots"
    dvc(root, "plots", "diff", "main", "r32", "r2", "-o", str(plots))
    html = (plots / "index.html").read_text()
    assert "loss" in html and "r32" in html

    sh(root, "git", "reset", "-q", "--hard")
    dvc(root, "checkout", "-q")
    assert rank_of(root) == 4
    dvc(root, "exp", "apply", "r32")
    assert rank_of(root) == 32
    assert (root / "models" / "lora" / "weights.txt").read_text().startswith("rank=32")  # outputs too

    dvc(root, "exp", "branch", "r2", "rank2-branch")
    branch_params = yaml.safe_load(sh(root, "git", "show", "rank2-branch:params.yaml").stdout)
    assert branch_params["lora"]["rank"] == 2


def wait_for_queue(root: Path, timeout: float = 420) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = dvc(root, "queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        if time.monotonic() > deadline:
            dvc(root, "queue", "stop", "--kill", check=False)
            raise AssertionError(f"queue did not finish in {timeout} s:\n{status}")
        time.sleep(3)


@pytest.mark.slow
def test_queued_sweep_logs_to_the_main_mlflow_db_and_summarises(tmp_path):
    import mlflow

    root = make_project(tmp_path / "proj")
    dvc(root, "repro")  # MLflow on: the baseline run
    commit_all(root, "baseline")

    queued = dvc(root, "exp", "run", "--queue", "-S", "lora.rank=8,16").stdout
    names = re.findall(r"Queued experiment '([^']+)'", queued)
    assert len(names) == 2
    dvc(root, "queue", "start", "-j", "2")
    status = wait_for_queue(root)
    assert status.count("Success") == 2, status

    # every run landed in the main repo's database, none in the temp copies
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db")) and not list((root / ".dvc").rglob("mlruns"))
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("flux-impressionism")
    runs = client.search_runs([exp.experiment_id])
    by_name = {r.data.tags.get("dvc.exp_name"): r for r in runs}
    assert set(names) <= set(by_name)
    assert sorted(by_name[n].data.params["lora.rank"] for n in names) == ["16", "8"]
    for n in names:
        r = by_name[n]
        assert len(client.get_metric_history(r.info.run_id, "loss")) == 5
        assert r.info.artifact_uri.startswith((root / "mlartifacts").as_uri())

    sh(root, sys.executable, "-m", "stages.sweep", "--param", "lora.rank")
    table = sh(root, sys.executable, "-m", "stages.experiments", "--sort", "style_similarity").stdout.splitlines()
    assert table[0].split() == ["Experiment", "lora.rank", "style_similarity", "prompt_fidelity"]
    assert max(map(len, table)) <= 150 and len(table) == 2 + 4  # header, rule, workspace, main, 2 experiments
    rows = list(csv.DictReader((root / "reports" / "sweep" / "summary.csv").open()))
    assert [float(r["lora.rank"]) for r in rows] == [4.0, 8.0, 16.0]
    style = [float(r["style_similarity"]) for r in rows]
    assert style == sorted(style) and len(set(style)) == 3
    assert (root / "reports" / "sweep" / "summary.png").stat().st_size > 1000


def test_real_repo_is_ready_for_queued_experiments():
    """Queued and --temp runs see only git-tracked files: every dependency that no stage produces
    must be tracked (and not ignored), Hydra must be on, and conf/ must compose params.yaml's keys."""
    assert re.search(r"\[hydra\]\s*\n\s*enabled\s*=\s*[Tt]rue", (REPO / ".dvc" / "config").read_text())
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())

    def resolve(path: str) -> str:
        def lookup(m):
            v = params
            for part in m.group(1).split("."):
                v = v[part]
            return str(v)
        return re.sub(r"\$\{([^}]+)\}", lookup, path)

    def paths(entries):
        for e in entries or []:
            yield resolve(next(iter(e)) if isinstance(e, dict) else e)

    outs = {o for s in pipeline.values() for key in ("outs", "metrics", "plots") for o in paths(s.get(key))}
    tracked = set(sh(REPO, "git", "ls-files").stdout.splitlines())
    missing = []
    for stage, s in pipeline.items():
        for dep in paths(s.get("deps")):
            if any(dep == o or dep.startswith(o.rstrip("/") + "/") for o in outs):
                continue
            if not any(t == dep or t.startswith(dep.rstrip("/") + "/") for t in tracked):
                missing.append(f"{stage}: {dep}")
    assert not missing, f"dependencies a queued experiment would not see (not git-tracked): {missing}"
    assert {"conf/config.yaml", "params.yaml", "dvc.yaml"} <= tracked


def test_sweep_summary_picks_the_headline_metrics_and_sorts_by_the_param(tmp_path, monkeypatch):
    import dvc.api

    from stages import sweep

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"lora": {"rank": 4}, "seed": 1}))
    rows = [
        {"Experiment": None, "rev": "workspace", "lora.rank": 4.0, "style_nn_lora": 0.9, "clip_score_lora": 1.0},
        {"Experiment": None, "rev": "main", "lora.rank": 4.0, "style_nn_lora": 0.5, "style_nn_base": 0.4,
         "clip_score_lora": 1.2, "n_lora": 8, "seed": 1.0},
        {"Experiment": "big", "rev": "abc1234", "lora.rank": 32.0, "style_nn_lora": 0.7, "clip_score_lora": 1.1},
        {"Experiment": "small", "rev": "def5678", "lora.rank": 2.0, "style_nn_lora": 0.4, "clip_score_lora": None},
        {"Experiment": "failed", "rev": "0000000", "lora.rank": 8.0},  # no metrics: left out
    ]
    monkeypatch.setattr(dvc.api, "exp_show", lambda repo=None: rows)
    got, metrics = sweep.collect("lora.rank", repo=str(tmp_path))
    assert metrics == ["style_nn_lora", "clip_score_lora"]  # vocab.HEADLINE order; style_nn_base is not headline
    assert [(r["experiment"], r["lora.rank"]) for r in got] == [("small", 2.0), ("main", 4.0), ("big", 32.0)]
    assert got[0]["clip_score_lora"] is None

    monkeypatch.chdir(tmp_path)
    sweep.main(["--param", "lora.rank", "--repo", str(tmp_path), "--out", str(tmp_path / "out")])
    table = (tmp_path / "out" / "summary.md").read_text().splitlines()
    assert table[0] == "| experiment | rev | lora.rank | style NN ↑ | CLIP ↑ |"  # the vocabulary's headers
    assert table[2] == "| small | def5678 | 2 | 0.4000 |  |" and len(table) == 5
    assert (tmp_path / "out" / "summary.png").stat().st_size > 1000


def _exp_rows(n_params: int) -> tuple[list[dict], set[str]]:
    """``dvc exp show --json``-like rows (what dvc.api.exp_show returns) for a workspace, its
    commit and three experiments, each with ``n_params`` changed params, every unchanged param and
    dependency (100 params that do not change), the headline metrics and some of the long tail."""
    from stages.metrics import vocab

    flat = {k: 0.5 + i / 10 for i, k in enumerate(vocab.HEADLINE)}
    flat.update({"style_nn_base": 0.9, "kid_delta": 0.01, "trait_stroke_isotropy_dist_lora": 0.2})
    params = {f"section_{i}.a_rather_long_param_name_{i}": i + 1 for i in range(n_params)}
    fixed = {f"train.knob_{i}": 1 for i in range(100)}
    rows = []
    for j, name in enumerate([None, None, "rank8-a-long-experiment-name", "crumb-trey", "stiff-kids"]):
        rows.append({"Experiment": name, "rev": ["workspace", "main", "9f9d4ae", "175b20c", "9939740"][j],
                     "typ": "x", "Created": "07:14 PM", "State": None, "Executor": None,
                     **{k: v * (1 + j) for k, v in params.items()}, **fixed, "stages/train.py": "abc" * 10,
                     **{k: (v * (1 + j / 100) if isinstance(v, float) else v) for k, v in flat.items()},
                     "trait_stroke_isotropy_lora": 0.3, "style_centroid_base": 0.5})
    return rows, set(params) | set(fixed)


@pytest.mark.parametrize("n_params", [1, 3, 30])
def test_experiment_table_fits_15_columns_and_150_characters(n_params):
    """`make exps` (python -m stages.experiments): Experiment + changed params + the headline."""
    from stages import experiments
    from stages.metrics import vocab

    rows, params_keys = _exp_rows(n_params)
    text = experiments.render(*experiments.table(rows, params_keys, sort="style_centroid_lora"))
    lines = text.splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    assert len(header) <= 15 and max(map(len, lines)) <= 150, text
    assert header[0] == "Experiment"
    shown_params = [h for h in header[1:] if h not in {vocab.header(k) for k in vocab.HEADLINE}]
    assert 1 <= len(shown_params) <= min(n_params, 15 - 1 - len(vocab.HEADLINE))
    assert len(shown_params) == n_params or "more changed params" in text
    assert not any(p.startswith("train.knob") for p in header)  # unchanged params are left out
    assert vocab.header("style_centroid_lora") in header and vocab.header("kid_lora") in header
    assert "style_centroid_base" not in text and "stroke" not in text  # the long tail is not
    body = lines[2:2 + len(rows)]
    assert body[0].startswith("stiff-kids (9939740)")  # best style first (higher is better)
    if n_params == 30:
        assert "more changed params" in text
