"""A throwaway DVC project with this repo's Hydra layout (conf/config.yaml + conf/profile/, params.yaml
composed from them, hydra.enabled in .dvc/config) and two trivial stages, for testing `dvc exp`,
queues, remotes and MLflow from DVC's temp copies quickly and apart from the heavy pipeline.

    data  -> data/curated/ (a folder: two text files, size from data.synthetic.count)
    train -> models/lora/weights.txt, reports/metrics.json (style metrics that depend on lora.rank),
             reports/train/loss.tsv (a curve), reports/mlflow_run.json; logs to MLflow via
             stages.core.tracking unless FLUXIMP_MLFLOW=0
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from stages.core import params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

MAKE_DATA = '''\
import pathlib, yaml
p = yaml.safe_load(open("params.yaml"))
out = pathlib.Path("data/curated"); out.mkdir(parents=True, exist_ok=True)
n = p["data"]["synthetic"]["count"]
(out / "train.txt").write_text("".join(f"painting {i} seed {p['seed']}\\n" for i in range(n)))
(out / "holdout.txt").write_text("painting held out\\n")
'''

TRAIN = '''\
import json, math, pathlib
from stages.core import params, tracking
p = params.load()
with tracking.run("train", p, new=True):
    rank = p.lora.rank
    data = pathlib.Path("data/curated/train.txt").read_text()
    pathlib.Path("models/lora").mkdir(parents=True, exist_ok=True)
    pathlib.Path("models/lora/weights.txt").write_text(f"rank={rank} lines={len(data.splitlines())}\\n")
    pathlib.Path("reports/train").mkdir(parents=True, exist_ok=True)
    rows = ["step\\tloss"]
    for step in range(5):
        loss = 1.0 / (1 + step * math.log2(rank + 1))
        rows.append(f"{step}\\t{loss:.5f}")
        tracking.log_metrics({"loss": loss}, step=step)
    pathlib.Path("reports/train/loss.tsv").write_text("\\n".join(rows) + "\\n")
    m = {"style_similarity": round(0.5 + 0.05 * math.log2(rank), 4),
         "prompt_fidelity": round(0.8 - 0.02 * math.log2(rank), 4)}
    pathlib.Path("reports/metrics.json").write_text(json.dumps(m))
    tracking.log_metrics(m)
'''

DVC_YAML = {
    "stages": {
        "data": {"cmd": "python make_data.py", "deps": ["make_data.py"],
                 "params": ["seed", "data.synthetic.count"], "outs": ["data/curated"]},
        "train": {"cmd": "python train.py", "deps": ["train.py", "data/curated"],
                  "params": ["seed", "lora.rank"],
                  "outs": ["models/lora", {"reports/mlflow_run.json": {"cache": False}}],
                  "metrics": [{"reports/metrics.json": {"cache": False}}],
                  "plots": [{"reports/train/loss.tsv": {"cache": False, "x": "step", "y": "loss"}}]},
    }
}


def env(**extra: str) -> dict[str, str]:
    """Environment for dvc/stage commands: this venv first, this repo importable (stages.core)."""
    e = dict(os.environ)
    for leaked in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "FLUXIMP_MLFLOW"):
        e.pop(leaked, None)  # e.g. mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI in-process
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["PYTHONPATH"] = f"{REPO}{os.pathsep}{e.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    e.update({"DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
              "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
    e.update(extra)
    return e


def sh(cwd, *cmd: str, check: bool = True, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def dvc(cwd, *args: str, **kw) -> subprocess.CompletedProcess:
    return sh(cwd, str(BIN / "dvc"), *args, **kw)


def make_project(root: Path, count: int = 8) -> Path:
    """Create, `git init` + `dvc init`, and commit the project (nothing run yet)."""
    root.mkdir(parents=True, exist_ok=True)
    defaults = params.Params().model_dump()
    defaults.pop("profile")
    defaults["data"]["synthetic"]["count"] = count
    (root / "conf" / "profile").mkdir(parents=True)
    (root / "conf" / "config.yaml").write_text(params.CONF_HEADER + yaml.safe_dump(defaults, sort_keys=False))
    (root / "conf" / "profile" / "smoke.yaml").write_text("# @package _global_\nprofile: smoke\n")
    (root / "conf" / "prompts").mkdir()
    (root / "conf" / "prompts" / "smoke.txt").write_text("a harbour at dawn\n")  # sample.prompts (validate)
    (root / "params.yaml").write_text(yaml.safe_dump({"profile": "smoke", **defaults}, sort_keys=False))
    (root / "make_data.py").write_text(MAKE_DATA)
    (root / "train.py").write_text(TRAIN)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (root / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n")
    sh(root, "git", "init", "-q", "-b", "main")
    dvc(root, "init", "-q")
    dvc(root, "config", "hydra.enabled", "True")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "tiny project")
    return root


def commit_all(root: Path, msg: str) -> None:
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", msg)
