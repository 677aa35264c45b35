"""Optimizers on the tiny model: mean flow-matching loss over the first, middle and last 10 steps of
a short run for each ``train.optimizer`` with its community settings (CPU, minutes).

    .venv/bin/python benchmarks/bench_optimizers.py [--steps 100] [--out reports/bench/optimizers.md]

Uses the same tiny curated set as the tests (tests/trainkit.py), encoded once in a temp folder,
then runs the train stage per optimizer (rank 8, all targets, 32 px, batch 4). A sanity benchmark:
the tiny random model says which optimizers learn and how fast they start, not which makes the
better style LoRA. Prodigy starts from d0 = 1e-6 and grows its step size, so it lags early.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import trainkit  # noqa: E402

RUNS = [("adamw", dict(train__lr=1e-2, train__weight_decay=1e-4)),
        ("adafactor", dict(train__lr=1e-2, train__weight_decay=1e-4)),
        ("prodigy", dict(train__lr=1.0, train__weight_decay=0.01))]
COMMON = dict(train__resolution=32, train__buckets=False, train__batch_size=4, train__warmup_steps=0,
              lora__rank=8, lora__targets="all")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    os.environ.setdefault("FLUXIMP_MLFLOW", "0")
    import torch

    torch.set_num_threads(1)  # as the tests do; the loss values do not depend on it
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        enc = tmp / "encoded"
        trainkit.make_curated(enc, n=12, sizes=((32, 32),))
        trainkit.write_params(enc, **COMMON)
        with trainkit.tiny_cache(tmp / "tiny-cache"):
            os.chdir(enc)
            from stages import encode, train

            encode.main()
            for name, settings in RUNS:
                work = tmp / name
                shutil.copytree(enc / "data/cache", work / "data/cache")
                os.chdir(work)
                trainkit.write_params(work, **COMMON, **settings, train__optimizer=name, train__steps=args.steps,
                                      train__checkpoint_every=args.steps)
                t0 = time.perf_counter()
                train.main()
                secs = time.perf_counter() - t0
                lines = (work / "reports/train/loss.tsv").read_text().splitlines()[1:]
                loss = [float(r.split("\t")[1]) for r in lines]
                mid = len(loss) // 2
                rows.append((name, settings["train__lr"], settings["train__weight_decay"], sum(loss[:10]) / 10,
                             sum(loss[mid - 5:mid + 5]) / 10, sum(loss[-10:]) / 10, secs))
            os.chdir(ROOT)
    table = ["| optimizer | lr | weight decay | loss steps 1-10 | middle 10 | last 10 | wall s |", "|---|---|---|---|---|---|---|"]
    table += [f"| {n} | {lr:g} | {wd:g} | {a:.3f} | {b:.3f} | {c:.3f} | {s:.1f} |" for n, lr, wd, a, b, c, s in rows]
    text = "\n".join(table)
    print(text)
    if args.out:
        Path(args.out).write_text(f"`python benchmarks/bench_optimizers.py --steps {args.steps}` "
                                  f"(tiny random Flux, CPU)\n\n{text}\n")


if __name__ == "__main__":
    main()
