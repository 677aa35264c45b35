"""Sweep summary (not a pipeline stage): one param against the metrics of every experiment.

    python -m stages.sweep --param lora.rank                 # after `make sweep` / a queued sweep
    python -m stages.sweep --param lora.rank --metrics style_centroid_lora,clip_score_lora

Reads the experiments of the current commit (``dvc.api.exp_show``: the baseline plus its
experiments) and writes ``reports/sweep/summary.csv``, ``summary.md`` (a table sorted by the param)
and ``summary.png`` (each metric against the param). By default the metrics are the style and prompt
fidelity ones (names starting with ``style`` / ``clip_score`` / ``prompt``; of those, the LoRA's
own ``*_lora`` scores when there are any), else every metric.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
from pathlib import Path

import yaml

from stages.core import log as stage_log
from stages.core.io import atomic_file, write_text
from stages.core.lineage import flatten

log = logging.getLogger(__name__)
META = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}
DEFAULT_PREFIXES = ("style", "clip_score", "prompt")


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def collect(param: str, metrics: list[str] | None = None, repo: str = ".") -> tuple[list[dict], list[str]]:
    """Rows ``{experiment, rev, <param>, <metric>...}`` for experiments that have the param and at
    least one metric (the workspace row is left out), sorted by the param; and the metric names."""
    import dvc.api

    rows = dvc.api.exp_show(repo=repo)
    params_keys = set(flatten(yaml.safe_load(Path(repo, "params.yaml").read_text()) or {}))
    if metrics is None:
        found = sorted({k for r in rows for k, v in r.items() if k not in META and k not in params_keys
                        and "/" not in k and "." not in k and _number(v) is not None})
        chosen = [m for m in found if m.startswith(DEFAULT_PREFIXES)] or found
        metrics = [m for m in chosen if m.endswith("_lora")] or chosen  # the adapter's own scores
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


def markdown(rows: list[dict], columns: list[str]) -> str:
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
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
        ax.set_title(m, fontsize=9)
    fig.suptitle(f"sweep over {param} ({len(rows)} experiments)", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


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
    columns = ["experiment", "rev", args.param, *metrics]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "summary.csv", buf.getvalue())
    write_text(out / "summary.md", markdown(rows, columns))
    plot(rows, args.param, metrics, out / "summary.png")
    log.info("sweep summary of %d experiments -> %s/summary.{csv,md,png}", len(rows), out)
    print(markdown(rows, columns), end="")


if __name__ == "__main__":
    main()
