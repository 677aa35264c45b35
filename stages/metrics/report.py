"""The evaluation outputs people read: trait plot (CSV for DVC + PNG), loss curve, report.html.

``write_report`` renders a single static page (``reports/report.html``, template
``templates/report.html.j2``) with relative links, every section a table or a figure: the metrics
table (held-out | base | LoRA | LoRA - base), notes, the trait table (set means and distance to the
held-out paintings: closer is better) with the trait plot and the LoRA-scale sweep, the operating point
(which step, which strength: its table and style-content figure, when the grid ran), the sample grids,
the A/B page and the human scores when present, the training curve, the dataset reports (each JSON as
tables) with the curation figures, and the lineage (git commit, curated-data md5 from dvc.lock, MLflow
run id, params). A link or image is written only when its file exists, so the page never points at
nothing.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from stages.core import secrets
from stages.core.io import atomic_file, write_text
from stages.metrics import pages, traits, vocab

SETS = ("holdout", "base", "lora")
# metric families shown in the table: (key stem, label, which way is better / more Impressionist),
# from the metrics vocabulary; the traits have a table of their own
FAMILIES = [(f.name, f.label, {1: "higher", -1: "lower"}.get(f.better, ""))
            for f in vocab.FAMILIES.values() if not f.name.startswith("trait_")]
DATASET_JSON = ["reports/data/download.json", "reports/dedupe/summary.json", "reports/curation.json",
                "reports/caption/stats.json"]
SWEEP_COLS = ["scale", "style_centroid", "style_nn", "clip_score", "kid", "aesthetic", "diversity",
              f"trait_{traits.COMPOSITE}", f"trait_{traits.COMPOSITE}_dist"]
SWEEP_CSV = "reports/plots/sweep.csv"
OPERATING_POINT = "reports/operating_point/operating_point.json"  # the grid (stages/operating_point.py)
OPERATING_POINT_COLS = ["step", "scale", "style", "style_lo", "style_hi", "content", "content_lo", "content_hi",
                        "front", "feasible"]
HUMAN = "reports/human.json"
# figures the curation stages write (download, dedupe, filter), shown in the Dataset section
CURATION_FIGURES = ["reports/data/figures/*.png", "reports/dedupe/*.png", "reports/filter/figures/*.png"]


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, ".csv") as tmp, open(tmp, "w", newline="") as fh:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)


def write_trait_plot(metrics: dict, csv_path: Path, png_path: Path) -> None:
    """traits.csv: one row per (trait, set) with the raw value, the value relative to the held-out
    set (held-out = 1), which puts all traits on one axis, and the distance to the held-out mean in
    held-out standard deviations (closer is better); traits.png: grouped bars of the relative value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for t in traits.NAMES:
        ref = metrics.get(f"trait_{t}_holdout")
        for s in SETS:
            v = metrics.get(f"trait_{t}_{s}")
            rel = v / ref if v is not None and ref else None
            dist = 0.0 if s == "holdout" else metrics.get(f"trait_{t}_dist_{s}")
            rows.append({"trait": t, "set": s, "label": f"{t} / {s}", "value": v,
                         "relative_to_holdout": None if rel is None else round(rel, 6),
                         "distance_to_holdout": dist})
    write_csv(csv_path, rows)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.27
    for i, s in enumerate(SETS):
        vals = [r["relative_to_holdout"] or 0.0 for r in rows if r["set"] == s]
        ax.bar([x + (i - 1) * width for x in range(len(traits.NAMES))], vals, width, label=s)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(traits.NAMES)), [t.replace("_", "\n") for t in traits.NAMES], fontsize=8)
    ax.set_ylabel("value / held-out value")
    ax.set_title("Impressionism traits: held-out paintings vs base vs LoRA")
    top = max([r["relative_to_holdout"] or 0.0 for r in rows] + [1.0])
    ax.set_ylim(0, top * 1.25)
    ax.legend(ncol=3, loc="upper center", fontsize=9)
    fig.tight_layout()
    with atomic_file(png_path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_loss_plot(tsv: Path, png_path: Path) -> bool:
    """Plot reports/train/loss.tsv (columns step, loss, ...) if it exists; returns whether it did."""
    if not tsv.exists():
        return False
    with open(tsv) as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    try:
        steps = [float(r["step"]) for r in rows]
        loss = [float(r["loss"]) for r in rows]
    except (KeyError, ValueError):
        return False
    if not steps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, loss, lw=1)
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    fig.tight_layout()
    with atomic_file(png_path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def _rel(path: Path, base: Path) -> str:
    import os

    return Path(os.path.relpath(path, base)).as_posix()


def metrics_rows(metrics: dict) -> list[dict]:
    """The headline table: one row per metric family present (traits have their own table)."""
    rows = []
    for stem, label, better in FAMILIES:
        vals = [metrics.get(f"{stem}_{s}") for s in SETS]
        if all(v is None for v in vals):
            continue
        delta = metrics.get(f"{stem}_delta")
        if delta is None and None not in vals[1:]:
            delta = vals[2] - vals[1]
        rows.append({"label": label, "values": vals, "delta": delta, "better": better})
        if stem == "clip_score" and metrics.get("clip_score_ratio") is not None:
            rows.append({"label": "CLIP score ratio (LoRA / base)", "values": [None, None,
                         metrics["clip_score_ratio"]], "delta": None, "better": "higher"})
    return rows


def trait_rows(metrics: dict) -> list[dict]:
    """Per trait: the three set means, base and LoRA distance to the held-out mean (in held-out
    standard deviations) and whether the LoRA moved the samples closer."""
    rows = []
    for t in traits.NAMES:
        vals = [metrics.get(f"trait_{t}_{s}") for s in SETS]
        if all(v is None for v in vals):
            continue
        d_base, d_lora = metrics.get(f"trait_{t}_dist_base"), metrics.get(f"trait_{t}_dist_lora")
        change = None if None in (d_base, d_lora) else d_lora - d_base
        rows.append({"label": t.replace("_", " "), "direction": "higher" if traits.DIRECTION[t] > 0 else "lower",
                     "values": vals, "dist_base": d_base, "dist_lora": d_lora, "change": change,
                     "verdict": "" if change is None else "closer" if change < 0 else
                     "further" if change > 0 else "same"})
    return rows


def metrics_table(metrics: dict) -> str:
    """The headline metrics table alone (HTML), as the report shows it."""
    return pages.render("metrics_table.html.j2", rows=metrics_rows(metrics), lora_scale=metrics.get("lora_scale"))


def json_tables(data) -> list[dict]:
    """A report JSON as tables: its scalars as one key/value table, each dict of scalars as a
    key/value table, each dict of dicts as a table with one row per key, each list of dicts as a
    table with one row per item; anything deeper shows as compact JSON in its cell."""
    def cell(v):
        return v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v, sort_keys=True)

    if not isinstance(data, dict):
        return [{"title": "", "columns": ["value"], "rows": [[cell(data)]]}]
    scalars = [[k, cell(v)] for k, v in data.items() if not isinstance(v, (dict, list))]
    tables = [{"title": "", "columns": ["key", "value"], "rows": scalars}] if scalars else []
    for k, v in data.items():
        if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            cols = list(dict.fromkeys(c for x in v.values() for c in x))
            tables.append({"title": k, "columns": [""] + cols,
                           "rows": [[name] + [cell(x.get(c)) for c in cols] for name, x in v.items()]})
        elif isinstance(v, dict):
            sub = json_tables(v)
            for t in sub:
                t["title"] = f"{k}: {t['title']}" if t["title"] else k
            tables += sub
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            cols = list(dict.fromkeys(c for x in v for c in x))
            tables.append({"title": k, "columns": cols, "rows": [[cell(x.get(c)) for c in cols] for x in v]})
        elif isinstance(v, list):
            tables.append({"title": k, "columns": ["value"], "rows": [[cell(x)] for x in v]})
    return tables


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _flat_params(d: dict, prefix: str = "") -> list[list]:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            rows += _flat_params(v, f"{prefix}{k}.")
        else:
            rows.append([f"{prefix}{k}", json.dumps(v) if isinstance(v, (list, dict)) else v])
    return rows


def write_report(out: Path, metrics: dict, notes: list[str], index: dict, p, root: Path = Path(".")) -> Path:
    """Write the report page at ``out`` from templates/report.html.j2; paths are resolved against
    ``root`` (the repo root); a figure or link appears only when its file exists."""
    from stages.core.lineage import dir_md5

    base = (root / out).parent

    def existing(rel: str) -> str | None:
        return _rel(root / rel, base) if (root / rel).exists() else None

    sweep = None
    if (root / SWEEP_CSV).exists():
        with open(root / SWEEP_CSV) as fh:
            rows = list(csv.DictReader(fh))
        cols = [c for c in SWEEP_COLS if rows and c in rows[0]]
        sweep = {"columns": cols, "rows": [[float(r[c]) if r[c] else None for c in cols] for r in rows]}
    human = None
    if (root / HUMAN).exists():
        data = _read_json(root / HUMAN)
        try:
            human = [{"question": q["question"], "wins": q["lora_wins"], "n": q["n"], "rate": q["lora_win_rate"],
                      "low": q["ci95_low"], "high": q["ci95_high"]} for q in data["questions"].values()]
        except (TypeError, KeyError):
            human = "unreadable"
    opoint = _read_json(root / OPERATING_POINT) if (root / OPERATING_POINT).exists() else None
    if opoint and opoint.get("enabled"):
        opoint["rows"] = [[("●" if pt[c] else "") if c in ("front", "feasible") else pt[c]
                           for c in OPERATING_POINT_COLS] for pt in opoint["points"]]
    dataset = [{"file": f, "tables": json_tables(_read_json(root / f))} for f in DATASET_JSON
               if (root / f).exists() and _read_json(root / f) is not None]
    curation_figures = [{"src": _rel(f, base), "caption": f.relative_to(root).as_posix()}
                        for pattern in CURATION_FIGURES for f in sorted(root.glob(pattern))]
    # Only what the content determines: this page is a DVC output kept in git, and a run id or the
    # commit it was made from would change it on every run (and a fresh clone's `make repro` would leave
    # git status dirty). So the page names the MLflow experiment and how to find the run (by the adapter's
    # hash: stages.core.tracking.adapter_run); the run holds the git commit, dirty flag and DVC experiment.
    sha = index.get("adapter_sha256")
    lineage = [["curated data md5 (DVC's hash of the files evaluate read)", dir_md5(root / "data/curated")],
               ["adapter sha256", sha],
               ["MLflow experiment", p.mlflow.experiment],
               ["MLflow run (its tags hold the commit, dirty flag and DVC experiment)",
                f"the run tagged adapter.sha256 = {sha}: search tags.`adapter.sha256` = '{sha}' in the MLflow UI"
                if sha else "none (no adapter was sampled)"]]
    page = pages.render(
        "report.html.j2", profile=p.profile, base_model=p.model.base, index=index,
        n_prompts=len(index.get("prompts", [])), n_seeds=len(index.get("seeds", [])),
        metrics_rows=metrics_rows(metrics), lora_scale=metrics.get("lora_scale"),
        notes_rows=[[n] for n in notes],
        trait_rows=trait_rows(metrics), trait_plot=existing("reports/eval/traits.png"),
        traits_csv=existing("reports/plots/traits.csv"), sweep_csv=existing(SWEEP_CSV), sweep=sweep,
        grids=[{"src": existing(f"reports/samples/{g['file']}"), "seed": g.get("seed")}
               for g in index.get("grids", []) if existing(f"reports/samples/{g['file']}")],
        ab_page=existing("reports/eval/abtest/index.html"), human=human, opoint=opoint,
        opoint_plot=existing("reports/operating_point/grid.png"), opoint_csv=existing("reports/plots/operating_point.csv"),
        loss_plot=existing("reports/eval/loss.png"), n_holdout=metrics.get("n_holdout"),
        dataset=dataset, curation_figures=curation_figures, lineage=lineage,
        params=_flat_params(secrets.masked("", p.model_dump())))
    write_text(root / out, page)
    return root / out
