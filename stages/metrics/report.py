"""The evaluation outputs people read: trait plot (CSV for DVC + PNG), loss curve, report.html.

``write_report`` builds a single static page (``reports/report.html``) with relative links: the
metrics table (held-out | base | LoRA | LoRA - base), notes, the sample grids, the trait plot, the
training curve, the dataset summary, the A/B page and the human scores when present, and the
lineage (params, curated-data md5 from dvc.lock, git commit, MLflow run id). A link or image is
written only when its file exists, so the page never points at nothing.
"""
from __future__ import annotations

import csv
import html
import json
from pathlib import Path

import yaml

from stages.core.io import atomic_file, write_text
from stages.metrics import traits

SETS = ("holdout", "base", "lora")
# metric families shown in the table: (key stem, label, which way is better / more Impressionist)
FAMILIES = [
    ("style_centroid", "style: cosine to held-out centroid", "higher"),
    ("style_nn", "style: nearest held-out cosine", "higher"),
    ("kid", "KID vs held-out", "lower"),
    ("fid", "FID vs held-out", "lower"),
    ("clip_score", "CLIP score (prompt fidelity)", "higher"),
    ("aesthetic", "aesthetic score", "higher"),
    ("diversity", "diversity (pairwise distance per prompt)", "higher"),
] + [(f"trait_{t}", f"trait: {t.replace('_', ' ')}", "higher" if traits.DIRECTION[t] > 0 else "lower")
     for t in traits.NAMES]
DATASET_JSON = ["reports/data/download.json", "reports/dedupe/summary.json", "reports/curation.json",
                "reports/caption/stats.json"]
SWEEP_COLS = ["scale", "style_centroid", "style_nn", "clip_score", "kid", "aesthetic", "diversity"]


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, ".csv") as tmp, open(tmp, "w", newline="") as fh:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)


def write_trait_plot(metrics: dict, csv_path: Path, png_path: Path) -> None:
    """traits.csv: one row per (trait, set) with the raw value and the value relative to the
    held-out set (held-out = 1), which puts all traits on one axis; traits.png: grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for t in traits.NAMES:
        ref = metrics.get(f"trait_{t}_holdout")
        for s in SETS:
            v = metrics.get(f"trait_{t}_{s}")
            rel = v / ref if v is not None and ref else None
            rows.append({"trait": t, "set": s, "label": f"{t} / {s}", "value": v,
                         "relative_to_holdout": None if rel is None else round(rel, 6)})
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


def _fmt(v) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: list[list[str]], head: list[str]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows]
    return "\n".join(out) + "</table>"


def _rel(path: Path, base: Path) -> str:
    import os

    return Path(os.path.relpath(path, base)).as_posix()


def metrics_table(metrics: dict) -> str:
    rows = []
    for stem, label, better in FAMILIES:
        vals = [metrics.get(f"{stem}_{s}") for s in SETS]
        if all(v is None for v in vals):
            continue
        delta = metrics.get(f"{stem}_delta")
        if stem == "clip_score":
            delta = metrics.get("clip_score_ratio")
            label += " (LoRA / base)"
        rows.append([html.escape(label)] + [_fmt(v) for v in vals] + [_fmt(delta), better])
    return _table(rows, ["metric", "held-out", "base", f"LoRA {_fmt(metrics.get('lora_scale'))}",
                         "LoRA &minus; base", "better"])


def _json_summary(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    flat = {}
    for k, v in (data.items() if isinstance(data, dict) else []):  # scalars, and one level of dicts
        if isinstance(v, dict):
            flat.update({f"{k}.{k2}": v2 for k2, v2 in v.items() if isinstance(v2, (int, float, str, bool))})
        elif isinstance(v, (int, float, str, bool)):
            flat[k] = v
    if not flat:
        return ""
    return f"<h3>{html.escape(path.as_posix())}</h3>" + _table([[html.escape(k), _fmt(v)] for k, v in flat.items()],
                                                              ["key", "value"])


def write_report(out: Path, metrics: dict, notes: list[str], index: dict, p, root: Path = Path(".")) -> Path:
    """Write the report page at ``out``; paths are resolved against ``root`` (the repo root)."""
    from stages.core import tracking

    base = (root / out).parent
    parts = [f"<h1>flux-impressionism: evaluation ({html.escape(p.profile)} profile)</h1>",
             f"<p>Base <code>{html.escape(p.model.base)}</code>, {len(index.get('prompts', []))} prompts "
             f"&times; {len(index.get('seeds', []))} seeds, {index.get('steps')} steps, guidance "
             f"{index.get('guidance')}, {index.get('resolution')} px; prompts end with the trigger "
             f"&ldquo;{html.escape(str(index.get('trigger')))}&rdquo; for base and LoRA alike.</p>",
             "<h2>Metrics</h2>", metrics_table(metrics),
             "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"]

    def img(rel: str, alt: str) -> str:
        return f'<p><img src="{_rel(root / rel, base)}" alt="{html.escape(alt)}"></p>' \
            if (root / rel).exists() else ""

    def link(rel: str, text: str) -> str:
        return f'<a href="{_rel(root / rel, base)}">{html.escape(text)}</a>' if (root / rel).exists() else ""

    parts += ["<h2>Impressionism traits</h2>", img("reports/eval/traits.png", "trait plot"),
              f"<p>{link('reports/plots/traits.csv', 'traits.csv')} {link('reports/plots/sweep.csv', 'LoRA-scale sweep (CSV)')}</p>"]
    sweep = root / "reports/plots/sweep.csv"
    if sweep.exists():
        with open(sweep) as fh:
            rows = list(csv.DictReader(fh))
        cols = [c for c in SWEEP_COLS if rows and c in rows[0]]
        parts += ["<h3>LoRA-scale sweep (scale 0 = base)</h3>",
                  _table([[_fmt(float(r[c])) if r[c] else "&ndash;" for c in cols] for r in rows], cols)]
    parts.append("<h2>Samples</h2>")
    for g in index.get("grids", []):
        parts.append(img(f"reports/samples/{g['file']}", f"grid seed {g.get('seed')}"))
    parts.append("<h2>Blind A/B test</h2>")
    ab_link = link("reports/eval/abtest/index.html", "the A/B page")
    parts.append(f"<p>Send {ab_link or 'the A/B page'} (folder <code>reports/eval/abtest/</code>) to raters; "
                 "score their answers with <code>python -m stages.abtest score answers*.json</code>.</p>")
    human = root / "reports/human.json"
    if human.exists():
        try:
            h = json.loads(human.read_text())
            parts.append(_table([[html.escape(q["question"]), str(q["lora_wins"]), str(q["n"]),
                                  _fmt(q["lora_win_rate"]), f"{_fmt(q['ci95_low'])}&ndash;{_fmt(q['ci95_high'])}"]
                                 for q in h["questions"].values()],
                                ["question", "LoRA wins", "decided pairs", "LoRA win rate", "95% CI"]))
        except (ValueError, KeyError):
            parts.append("<p>reports/human.json is unreadable.</p>")
    parts += ["<h2>Training</h2>", img("reports/eval/loss.png", "training loss") or
              "<p>No training curve (reports/train/loss.tsv absent).</p>"]
    parts.append("<h2>Dataset</h2>")
    parts.append(f"<p>Held-out paintings used as the reference set: {_fmt(metrics.get('n_holdout'))}.</p>")
    parts += [_json_summary(root / f) for f in DATASET_JSON if (root / f).exists()] or \
        ["<p>No dataset reports found (reports/curation.json, ...).</p>"]
    run_file = root / "reports/mlflow_run.json"
    run_id = None
    if run_file.exists():
        try:
            run_id = json.loads(run_file.read_text()).get("run_id")
        except ValueError:
            pass
    tags = tracking.run_tags(p, "evaluate")
    lineage = [["git commit", _fmt(tags.get("git.commit"))], ["git dirty", _fmt(tags.get("git.dirty"))],
               ["curated data md5 (dvc.lock)", _fmt(tags.get("dataset.curated_md5"))],
               ["MLflow run id", _fmt(run_id)], ["DVC experiment", _fmt(tags.get("dvc.exp_name"))],
               ["adapter sha256", _fmt(index.get("adapter_sha256"))]]
    parts += ["<h2>Lineage</h2>", _table(lineage, ["what", "value"]),
              "<details><summary>params</summary><pre>" +
              html.escape(yaml.safe_dump(p.model_dump(), sort_keys=False)) + "</pre></details>"]
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>flux-impressionism report"
            "</title><style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;"
            "color:#222}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
            "padding:.25em .6em;text-align:right}td:first-child,th:first-child{text-align:left}"
            "img{max-width:100%}</style></head><body>\n" + "\n".join(x for x in parts if x) +
            "\n</body></html>\n")
    write_text(root / out, page)
    return root / out
