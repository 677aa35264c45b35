"""Do two machines write the same pipeline outputs? `dvc repro -f` in fresh clones, this CPU vs an emulated other one.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_determinism [--out reports/bench/determinism.md]

One machine stands in for two. The "other CPU" is this one made to look like a smaller, older x86-64
box the ways a real one differs: AVX2 instead of AVX-512 for ATen's kernels (``ATEN_CPU_CAPABILITY=avx2``),
MKL and oneDNN capped at AVX2 (``MKL_ENABLE_INSTRUCTIONS``, ``ONEDNN_MAX_CPU_ISA``), numpy's OpenBLAS on the
kernels it picks on an AMD EPYC (``OPENBLAS_CORETYPE=Zen``; left alone where the machine sets it) and numpy's
own loops at AVX2 (``NPY_DISABLE_CPU_FEATURES``), one core instead of all of them (``taskset -c 0``,
``OMP_NUM_THREADS=1``). Each setting is applied only where it is not what
stages/core/numerics.py pins, so with the pin on the "other CPU" differs from this one only in what the
pin cannot pin by itself (MKL's and oneDNN's instruction sets, the cores it may use).

Four fresh clones of HEAD, each ``dvc repro -f`` from scratch:

- free, this CPU / free, other CPU: ``FLUXIMP_REPRODUCIBLE_CPU=0`` (the numerics pin off)
- pinned, this CPU / pinned, other CPU: the default

Printed per pair: the stages whose outputs differ (dvc.lock hashes), the largest difference between the
two runs' metrics (reports/eval/metrics_all.json), and per run the wall time and whether the clone still
matches the committed outputs (`git status` clean). Takes about 4 x 1.5-2.5 min on a 2-core machine
(``--pinned-only``: the two pinned runs).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OTHER_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "OMP_NUM_THREADS": "1", "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
             **({} if os.environ.get("OPENBLAS_CORETYPE") else {"OPENBLAS_CORETYPE": "Zen"})}
PINNED = {"ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS"}  # what the pin sets itself: left to it
RUNS = {"free, this CPU": ({"FLUXIMP_REPRODUCIBLE_CPU": "0"}, False),
        "free, other CPU": ({"FLUXIMP_REPRODUCIBLE_CPU": "0", **OTHER_CPU}, True),
        "pinned, this CPU": ({}, False),
        "pinned, other CPU": ({k: v for k, v in OTHER_CPU.items() if k not in PINNED}, True)}


def repro(dest: Path, extra: dict, one_core: bool) -> dict:
    """A fresh clone of HEAD at ``dest``, ``dvc repro -f`` there; its dvc.lock, metrics and timing."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in (*OTHER_CPU, "FLUXIMP_REPRODUCIBLE_CPU", "MKL_CBWR")}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", HF_HUB_OFFLINE="1", FLUXIMP_PROGRESS="0",
               **extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = (["taskset", "-c", "0"] if one_core and shutil.which("taskset") else []) + ["dvc", "repro", "-f"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"dvc repro failed in {dest}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    status = subprocess.run(["git", "status", "--porcelain"], cwd=dest, capture_output=True, text=True).stdout
    return {"lock": yaml.safe_load((dest / "dvc.lock").read_text())["stages"],
            "metrics": json.loads((dest / "reports/eval/metrics_all.json").read_text()),
            "seconds": seconds, "modified": [ln[3:] for ln in status.splitlines()]}


def flat(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flat(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = float(v)
    return out


def compare(a: dict, b: dict) -> tuple[list[str], float, str]:
    """Stages whose outputs differ (in pipeline order), the largest metric difference and its name."""
    differ = [name for name in a["lock"] if a["lock"][name].get("outs") != b["lock"].get(name, {}).get("outs")]
    fa, fb = flat(a["metrics"]), flat(b["metrics"])
    diffs = [(abs(fa[k] - fb[k]), k) for k in fa if k in fb and fa[k] == fa[k] and fb[k] == fb[k]]
    worst = max(diffs, default=(0.0, "—"))
    return differ, worst[0], worst[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "determinism.md")
    ap.add_argument("--pinned-only", action="store_true", help="only the two pinned runs (half the time)")
    args = ap.parse_args()
    runs = {k: v for k, v in RUNS.items() if not args.pinned_only or k.startswith("pinned")}
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (extra, one_core)) in enumerate(runs.items()):
            results[name] = repro(Path(tmp) / f"run{i}", extra, one_core)
            print(f"{name}: {results[name]['seconds']:.0f} s", flush=True)
    lines = [f"# Same outputs on two machines? (code at {head})", "",
             "Made by `HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_determinism` "
             "(benchmarks/bench_determinism.py says how the other CPU is emulated). CPU: "
             f"{cpu_name()}, {os.cpu_count()} cores.", "",
             "| pair | stages whose outputs differ | largest metric difference |", "|---|---|---|"]
    for pin in ("pinned",) if args.pinned_only else ("free", "pinned"):
        differ, worst, key = compare(results[f"{pin}, this CPU"], results[f"{pin}, other CPU"])
        worst_cell = f"{worst:.3g} ({key})" if worst else "0 (every metric equal)"
        lines.append(f"| {pin}: this CPU vs other CPU | {', '.join(differ) or 'none'} | {worst_cell} |")
    lines += ["", "| run | wall s | files changed vs the committed outputs |", "|---|---:|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['seconds']:.0f} | {len(r['modified'])} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
