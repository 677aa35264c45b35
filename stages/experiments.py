"""The experiment table (``make exps``): the experiments of the current commit, the params that
differ between them and the headline metrics, in at most 15 columns and 150 characters.

    python -m stages.experiments                       # = make exps
    python -m stages.experiments --sort style_nn_lora  # any metric key; best first (vocab direction)

``dvc exp show`` prints every param, dependency hash and metric (255 columns on this project);
this reads the same data (``dvc.api.exp_show``) and keeps what tells experiments apart: params
whose value differs between the rows, and ``reports/metrics.json`` (the headline of
``stages.metrics.vocab``), headed and formatted by the vocabulary. When the experiments' grids ran
(eval.grid), a second table gives each one's operating point: the recommended snapshot step and LoRA
scale, and the style and content there.
"""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import yaml

from stages.core.lineage import flatten
from stages.metrics import vocab

META = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}
MAX_COLUMNS = 15
WIDTH = 150
CELL = 22  # widest cell (experiment names and param values longer than this are cut with "…")


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def collect(repo: str = ".") -> tuple[list[dict], set[str]]:
    """``dvc.api.exp_show`` rows (workspace, the commit, its experiments) and the param keys."""
    import dvc.api

    rows = dvc.api.exp_show(repo=repo)
    params_keys = set(flatten(yaml.safe_load(Path(repo, "params.yaml").read_text()) or {}))
    return rows, params_keys


def label(row: dict) -> str:
    name, rev = row.get("Experiment"), row.get("rev") or ""
    if not name:
        return rev
    return f"{name} ({rev[:7]})" if rev and rev != name else name


def table(rows: list[dict], params_keys: set[str], sort: str | None = None,
          width: int = WIDTH) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, cells, notes): Experiment, the changed params, the metrics, in at most MAX_COLUMNS
    columns and ``width`` characters; params that do not fit are named in a note."""
    notes = []
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in META))
    changed = [k for k in keys if k in params_keys and len({repr(r.get(k)) for r in rows}) > 1]
    metrics = [k for k in vocab.HEADLINE if any(r.get(k) is not None for r in rows)]
    if not metrics:  # a project without the vocabulary's metrics: its own numeric metrics
        metrics = [k for k in keys if k not in params_keys and "." not in k and "/" not in k
                   and any(_number(r.get(k)) is not None for r in rows)]
    metrics = metrics[:MAX_COLUMNS - 1]
    if sort:
        fam = vocab.family(sort)
        missing = [r for r in rows if _number(r.get(sort)) is None]
        rows = sorted((r for r in rows if _number(r.get(sort)) is not None),
                      key=lambda r: _number(r.get(sort)), reverse=fam.better >= 0) + missing

    def column(head: str, values: list[str]) -> tuple[str, list[str], int]:
        return head, values, min(CELL, max(len(head), *(len(v) for v in values)) if values else len(head))

    first = column("Experiment", [label(r) for r in rows])
    tail = [column(vocab.header(m), [vocab.fmt(m, _number(r.get(m)), "") for r in rows]) for m in metrics]
    used = first[2] + sum(2 + c[2] for c in tail)
    middle, left_out = [], []
    for k in changed:
        col = column(k, [_param(r.get(k)) for r in rows])
        if len(middle) + 1 + len(tail) < MAX_COLUMNS and used + 2 + col[2] <= width:
            middle.append(col)
            used += 2 + col[2]
        else:
            left_out.append(k)
    if left_out:
        notes.append(f"{len(left_out)} more changed params (dvc exp show --only-changed): {', '.join(left_out)}")
    cols = [first, *middle, *tail]
    header = [c[0] for c in cols]
    cells = [[c[1][i] for c in cols] for i in range(len(rows))]
    return header, cells, [textwrap.fill(n, width) for n in notes]


def operating_points(rows: list[dict], sort: str | None = None) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, cells, notes) of each experiment's operating point (``vocab.OPERATING_POINT`` from
    reports/metrics.json); no rows when no experiment has one. Same order as :func:`table`."""
    have = [r for r in rows if _number(r.get("op_step")) is not None]
    if not have:
        return ["Experiment"], [], []
    if sort:
        fam = vocab.family(sort)
        have.sort(key=lambda r: (_number(r.get(sort)) is None,
                                 -(fam.better or 1) * (_number(r.get(sort)) or 0.0)))
    header = ["Experiment", "step", "scale", vocab.header("op_style"), vocab.header("op_content")]
    cells = [[label(r), f"{_number(r['op_step']):.0f}", vocab.fmt("op_scale", _number(r.get("op_scale")), ""),
              vocab.fmt("op_style", _number(r.get("op_style")), ""),
              vocab.fmt("op_content", _number(r.get("op_content")), "")] for r in have]
    return header, cells, [textwrap.fill("operating point: the highest style keeping content (CLIP-score ratio to "
                                         "the base) >= eval.grid.content_min; intervals in each run's "
                                         "reports/eval/operating_point.json", WIDTH)]


def _param(v) -> str:
    """A param value as written in params.yaml (DVC's API hands back 4.0 for 4)."""
    if v is None:
        return ""
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _cut(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def render(header: list[str], cells: list[list[str]], notes: list[str] = ()) -> str:
    """A plain text table, columns two spaces apart, the first left-aligned, numbers right."""
    widths = [min(CELL, max(len(x) for x in col)) for col in zip(header, *cells)]

    def line(values):
        return "  ".join(_cut(v, w).ljust(w) if i == 0 else _cut(v, w).rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()
    out = [line(header), "  ".join("-" * w for w in widths)] + [line(c) for c in cells]
    return "\n".join(out + list(notes)) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sort", default=None, help="a metric key, e.g. style_centroid_lora (best first)")
    ap.add_argument("--repo", default=".")
    args = ap.parse_args(argv)
    rows, params_keys = collect(args.repo)
    print(render(*table(rows, params_keys, args.sort)), end="")
    header, cells, notes = operating_points(rows, args.sort)
    if cells:
        print("\n" + render(header, cells, notes), end="")


if __name__ == "__main__":
    main()
