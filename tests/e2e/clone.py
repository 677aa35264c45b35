"""Run the pipeline the way a user does: in a fresh `git clone` of this repo, with this venv's tools.

The clone has the committed code, params, dvc.lock and small reports (git) but none of DVC's
cached data, so `dvc repro` there really runs the stages."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def env(extra: dict | None = None) -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}:{e['PATH']}"
    e.update(HF_HUB_OFFLINE="1", FLUXIMP_PROGRESS="0", PYTHONUNBUFFERED="1")
    e.pop("MLFLOW_TRACKING_URI", None)
    e.update(extra or {})
    return e


def run(cmd: str, cwd: Path, timeout: float = 900, stdout_only: bool = False, extra_env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env(extra_env), capture_output=True, text=True, timeout=timeout,
                          shell=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{cmd} failed:\n{out[-6000:]}"
    return proc.stdout if stdout_only else out


def clone(dest: Path) -> Path:
    """A fresh clone of the committed HEAD (uncommitted edits are not in it: commit first)."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    return dest
