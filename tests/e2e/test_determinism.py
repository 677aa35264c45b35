"""Two runs of the whole pipeline from scratch write the same bytes, the second as if on another machine.

Each run is a fresh clone and `dvc repro -f` (every stage runs). The second run's CPU is made to look
like another machine's where stages/core/numerics.py does not pin it itself: MKL and oneDNN capped at
AVX2 and one core instead of all (benchmarks/bench_determinism.py also runs the pin off, and shows that
then the outputs differ from the filter stage on). Then dvc.lock must be identical
stage by stage (DVC hashes every output: a safetensors metadata order, a timing or a run id in a
hashed output shows up here), the git-tracked files must be the same in both clones, and no
file the pipeline writes outside its declared outputs may be left untracked and unignored (run
ids, timings, caches: gitignored local state)."""
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e.clone import clone, run

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
OTHER_CPU = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


def test_two_runs_from_scratch_write_identical_outputs(tmp_path):
    runs = [clone(tmp_path / name) for name in ("a", "b")]
    run("dvc repro -f", runs[0], timeout=1800)
    one_core = "taskset -c 0 " if shutil.which("taskset") else ""
    run(one_core + "dvc repro -f", runs[1], timeout=1800, extra_env=OTHER_CPU)
    a, b = (yaml.safe_load((r / "dvc.lock").read_text())["stages"] for r in runs)
    assert sorted(a) == sorted(b)
    differ = {name: [o["path"] for o, p in zip(a[name].get("outs", []), b[name].get("outs", [])) if o != p]
              or "deps/params" for name in a if a[name] != b[name]}
    assert not differ, f"stages whose dvc.lock entries differ between two runs: {differ}"
    changed = [git(r, "diff", "--binary", "HEAD") for r in runs]
    assert changed[0] == changed[1], "the runs left different git-tracked files"
    outputs = declared_outputs(runs[0])
    for repo in runs:
        untracked = [ln[3:] for ln in git(repo, "status", "--porcelain", "--untracked-files=all").splitlines()
                     if ln.startswith("??")]
        # a new file inside a declared output only means the committed outputs are older than the code;
        # anything else is a file the pipeline leaks into the work tree
        leaked = [f for f in untracked if not any(f == o or f.startswith(o.rstrip("/") + "/") for o in outputs)]
        assert not leaked, f"files the pipeline wrote that git neither tracks nor ignores: {leaked}"


def declared_outputs(repo: Path) -> list[str]:
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    return [next(iter(o)) if isinstance(o, dict) else o
            for stage in spec.values() for kind in ("outs", "metrics", "plots") for o in stage.get(kind, [])]
