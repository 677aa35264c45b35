"""Sweep summary (not a pipeline stage): one param against the metrics of every experiment.

    python -m stages.sweep --param lora.rank                 # after `make sweep` / a queued sweep
    python -m stages.sweep --param lora.rank --metrics style_centroid_lora,clip_score_lora

Reads the experiments of the current commit (``dvc.api.exp_show``: the baseline plus its
experiments) and writes ``reports/sweep/summary.csv``, ``summary.md`` (a table sorted by the param)
and ``summary.png`` (each metric against the param); when the experiments' grids ran (eval.grid),
``operating_points.png``: each experiment's operating point on one style-content figure with their
Pareto front; after a queued sweep on several GPUs, a ``gpus`` column says which card ran which stage
(stages.core.gpus). By default the metrics are the headline of
``stages.metrics.vocab`` (what ``reports/metrics.json`` holds), else every numeric metric; headers,
directions and number formats come from the vocabulary too.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import math
from pathlib import Path

from stages.core import log as stage_log
from stages.core import markdown as md
from stages.core.io import atomic_file, write_text
from stages.experiments import META, collect as exp_rows
from stages.metrics import vocab

log = logging.getLogger(__name__)


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def collect(param: str, metrics: list[str] | None = None, repo: str = ".") -> tuple[list[dict], list[str]]:
    """Rows ``{experiment, rev, <param>, <metric>...}`` for experiments that have the param and at
    least one metric (the workspace row is left out), sorted by the param; and the metric names."""
    rows, params_keys = exp_rows(repo)
    if metrics is None:
        found = sorted({k for r in rows for k, v in r.items() if k not in META and k not in params_keys
                        and "/" not in k and "." not in k and _number(v) is not None})
        metrics = [m for m in vocab.HEADLINE + vocab.OPERATING_POINT if m in found] or found
    out = []
    for r in rows:
        if r.get("rev") == "workspace" or _number(r.get(param)) is None:
            continue
        vals = {m: _number(r.get(m)) for m in metrics}
        if all(v is None for v in vals.values()):
            continue
        out.append({"experiment": r.get("Experiment") or r.get("rev"), "rev": r.get("rev"),
                    param: _number(r.get(param)), **vals})
    out.sort(key=lambda r: (r[param], r["experiment"]))
    return out, metrics


def markdown(rows: list[dict], columns: list[str], metrics: list[str] = ()) -> str:
    """Metric columns headed and formatted by the vocabulary (``style ↑``), the others as they are."""
    def cell(c, v):  # experiment names and param values are the user's text: escaped
        return vocab.fmt(c, v, "") if c in metrics else "" if v is None else \
            f"{v:.4g}" if isinstance(v, float) else md.text(v)
    lines = ["| " + " | ".join(vocab.header(c) if c in metrics else md.text(c) for c in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], param: str, metrics: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        pts = [(r[param], r[m], r["experiment"]) for r in rows if r[m] is not None]
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o")
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=6, textcoords="offset points", xytext=(2, 3))
        if param.endswith("rank"):
            ax.set_xscale("log", base=2)
        ax.set_xlabel(param)
        ax.set_title(f"{vocab.family(m).label} ({vocab.header(m)})", fontsize=8, wrap=True)
    fig.suptitle(f"sweep over {param} ({len(rows)} experiments)", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def plot_operating_points(rows: list[dict], param: str, path: Path) -> bool:
    """Each experiment's operating point (op_style vs op_content) on one style-content figure, labelled
    with the param and the recommended step/scale, and the experiments' Pareto front; False when none has one."""
    from stages.metrics import operating_point as op

    by_value: dict[tuple, op.Point] = {}  # experiments with the very same point share it (and one label)
    for r in rows:
        if None in (r.get("op_style"), r.get("op_content"), r.get("op_step"), r.get("op_scale")):
            continue
        key = (int(r["op_step"]), r["op_scale"], r["op_style"], r["op_content"], r[param])
        if key not in by_value:
            by_value[key] = op.Point(key[0], key[1], key[2], key[3], (math.nan, math.nan), (math.nan, math.nan))
            by_value[key].extra["names"] = []
        by_value[key].extra["names"].append(r["experiment"])
    points = list(by_value.values())
    for (step, scale, _, _, value), pt in by_value.items():
        pt.extra["label"] = f"{', '.join(pt.extra['names'])} ({param}={value:g}): {step}/{scale:g}"
    if not points:
        return False
    front = {id(p) for p in op.pareto_front(points)}
    for p in points:
        p.front = id(p) in front
    n = sum(len(p.extra["names"]) for p in points)
    op.plot(points, path, f"operating points of {n} experiments (sweep over {param})")
    return True


def gpu_column(rows: list[dict], repo: str) -> bool:
    """Which GPU ran what (stages.core.gpus claims of queued runs): ``gpus`` = ``train:1 sample:1 ...`` per
    experiment; False when no claim names one of them (CPU runs, or runs outside a queue)."""
    from stages.core import gpus

    used: dict[str, dict[str, str]] = {}
    for e in gpus.history(Path(repo) / ".cache" / "gpu-claims"):
        if e.get("experiment"):
            used.setdefault(e["experiment"], {})[e["stage"]] = ",".join(e["devices"])
    for r in rows:
        r["gpus"] = " ".join(f"{s}:{d}" for s, d in used.get(r["experiment"], {}).items())
    return any(r["gpus"] for r in rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--param", default="lora.rank")
    ap.add_argument("--metrics", default=None, help="comma-separated metric names (default: style/fidelity)")
    ap.add_argument("--out", default="reports/sweep")
    ap.add_argument("--repo", default=".")
    args = ap.parse_args(argv)
    stage_log.setup("sweep")
    rows, metrics = collect(args.param, args.metrics.split(",") if args.metrics else None, args.repo)
    if not rows:
        raise SystemExit(f"no experiment has both {args.param} and a metric: run a sweep first (make sweep)")
    out = Path(args.out)
    columns = ["experiment", "rev", args.param, *metrics] + (["gpus"] if gpu_column(rows, args.repo) else [])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "summary.csv", buf.getvalue())
    write_text(out / "summary.md", markdown(rows, columns, metrics))
    plot(rows, args.param, metrics, out / "summary.png")
    if plot_operating_points(rows, args.param, out / "operating_points.png"):
        log.info("the experiments' operating points and their front -> %s/operating_points.png", out)
    log.info("sweep summary of %d experiments -> %s/summary.{csv,md,png}", len(rows), out)
    print(markdown(rows, columns, metrics), end="")


if __name__ == "__main__":
    main()
