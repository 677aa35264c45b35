"""filter: score every image kept by dedupe and keep those that pass, recording why the rest fail.

Reads ``data/raw/shards`` and ``data/interim/dedupe.parquet``. Writes:

- ``data/interim/filter.parquet``: one row per scored id: the heuristics (``quality.heuristics``),
  ``aesthetic``, ``zeroshot``, ``kept``, ``reason`` (first failing code, null when kept) and
  ``reasons`` (all failing codes, ``;``-joined);
- ``data/interim/clip_embeddings.safetensors``: the CLIP image embeddings of every scored image
  (``stages.models.clip.save_embeddings``; evaluate reuses them for the held-out split);
- ``reports/filter/``: ``scores.csv`` (score histograms, long format, the DVC plot),
  ``reasons.csv`` (reject counts), ``figures/`` (histogram PNG, contact sheets of rejects with their
  reason and of the top / bottom aesthetic scores);
- ``reports/curation.json`` (DVC metrics): counts, and precision / recall of dedupe and of the
  heuristic filter against ``data/raw/truth.parquet`` when the source planted ground truth.

Thresholds of the CLIP scores: ``filter.threshold_mode=absolute`` uses ``threshold``;
``percentile`` (the smoke default, where CLIP has random weights) rejects the lowest
``percentile`` % of the images that pass the heuristics, so the code path runs while the
heuristics do the real work.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.core import images, io, log, params, shards
from stages.core.paths import Filter
from stages.curation import hashing, quality
from stages.models import aesthetic
from stages.models import clip as clip_models

logger = logging.getLogger("stages.filter")
SCORES = ("blur", "clipped", "clipped_inner", "texture", "entropy", "std", "border", "aesthetic", "zeroshot")


def measure(row: dict, f) -> tuple[dict, object]:
    """Decode one shard row (a big JPEG at a reduced scale, still >= analysis_side and CLIP's
    input) and run the heuristics: (score row, image or None when it does not decode)."""
    try:
        img, size = images.decode(row["image"], max(f.analysis_side, 224), with_size=True)
    except Exception as err:  # recorded, never a crash
        return {"id": row["id"], "reasons": ["unreadable"], "error": f"{type(err).__name__}: {err}"}, None
    s = quality.heuristics(img, f.analysis_side, size)
    return {"id": row["id"], **s, "reasons": quality.reject_reasons(s, f)}, img


def score_images(ids: set[str], p, model, logger, raw: Path) -> tuple[list[dict], list[str], np.ndarray]:
    """Heuristics for every image (``filter.workers`` threads), CLIP embeddings for the readable
    ones, one batch of ``clip.batch_size`` images in memory at a time."""
    from concurrent.futures import ThreadPoolExecutor
    from itertools import islice

    seen = set()

    def unique_rows():
        for row in shards.iter_rows(raw, columns=["id", "image"], ids=ids):
            if row["id"] not in seen:
                seen.add(row["id"])
                yield row

    rows, emb_ids, embs = [], [], []
    bar = log.progress(total=len(ids), desc="filter", unit="img")
    todo = unique_rows()
    with ThreadPoolExecutor(max_workers=p.filter.workers) as pool:
        while chunk := list(islice(todo, p.clip.batch_size)):
            measured = list(pool.map(lambda r: measure(r, p.filter), chunk))
            for r, img in measured:
                if img is None:
                    logger.warning("%s does not decode: %s", r["id"], r.pop("error"))
            rows += [r for r, _ in measured]
            readable = [(r["id"], img) for r, img in measured if img is not None]
            if readable:
                embs.append(model.embed_images([img for _, img in readable]))
                emb_ids += [i for i, _ in readable]
            bar.update(len(chunk))
    bar.close()
    missing = ids - seen
    if missing:
        raise SystemExit(f"{len(missing)} ids kept by dedupe are not in {raw} (e.g. {sorted(missing)[0]}): "
                         "rerun dedupe")
    return rows, emb_ids, np.concatenate(embs) if embs else np.zeros((0, model.dim), np.float32)


def clip_checks(rows: list[dict], emb_ids: list[str], emb: np.ndarray, p, model, logger) -> dict:
    """Aesthetic and zero-shot scores into ``rows``, thresholds applied; returns the cut-offs."""
    f = p.filter
    by_id = {r["id"]: r for r in rows}
    cuts = {}
    checks = []
    if f.aesthetic.enabled:
        head = aesthetic.load_aesthetic_head(f.aesthetic.head, model.dim, seed=p.seed, device=model.device)
        checks.append(("aesthetic", "low_aesthetic", head.score(emb) if len(emb) else np.zeros(0),
                       f.aesthetic))
    if f.zeroshot.enabled:
        z = model.zero_shot(emb, f.zeroshot.positive, f.zeroshot.negative) if len(emb) else np.zeros(0)
        checks.append(("zeroshot", "not_painting", z, f.zeroshot))
    for name, code, values, cfg in checks:
        for i, v in zip(emb_ids, values):
            by_id[i][name] = float(v)
        passing = [by_id[i][name] for i in emb_ids if not by_id[i]["reasons"]]
        cuts[name] = quality.cutoff(passing, f.threshold_mode, cfg.threshold, cfg.percentile)
        for i, v in zip(emb_ids, values):
            if v < cuts[name]:
                by_id[i]["reasons"].append(code)
        logger.info("%s cut-off %.4f (%s mode)", name, cuts[name], f.threshold_mode)
    return cuts


def to_table(rows: list[dict]) -> pa.Table:
    cols = ["width", "height", "min_side"]
    out = {"id": [r["id"] for r in rows]}
    for c in cols:
        out[c] = pa.array([r.get(c) for r in rows], pa.int32())
    for c in ("aspect", "bucket_side", *SCORES):
        out[c] = pa.array([r.get(c) for r in rows], pa.float64())
    order = list(quality.REASONS)
    reasons = [sorted(r["reasons"], key=order.index) for r in rows]
    out["kept"] = pa.array([not r for r in reasons], pa.bool_())
    out["reason"] = pa.array([r[0] if r else None for r in reasons], pa.string())
    out["reasons"] = pa.array([";".join(r) if r else None for r in reasons], pa.string())
    return pa.table(out)


def curation_metrics(table: pa.Table, dedupe: pa.Table, truth_path: Path) -> dict:
    """Counts, and P/R of dedupe and of the heuristic filter when ground truth exists."""
    d_rows, f_rows = dedupe.to_pylist(), table.to_pylist()
    counts = {"raw": len({r["id"] for r in d_rows}),
              "after_dedupe": sum(r["kept"] for r in d_rows),
              "after_filter": sum(r["kept"] for r in f_rows),
              "rejects": dict(sorted(Counter(r["reason"] for r in f_rows if r["reason"]).items()))}
    out = {"counts": counts}
    if truth_path.exists():
        truth = {r["id"]: r for r in pq.read_table(truth_path).to_pylist() if r.get("id")}
        out["dedupe"] = hashing.dedupe_scores(d_rows, truth)
        for r in f_rows:
            r["reasons"] = (r["reasons"] or "").split(";") if r["reasons"] else []
        out["filter"] = quality.filter_scores(f_rows, truth)
        out["filter"]["defects_removed_before_filter"] = sum(
            1 for i, t in truth.items() if t["kind"] == "defect" and i not in {r["id"] for r in f_rows})
    return out


def run(p: params.Params, paths: Filter = Filter()) -> dict:
    """The whole stage; returns the curation metrics (``paths.metrics``)."""
    dedupe = pq.read_table(paths.dedupe)
    ids = {r["id"] for r in dedupe.select(["id", "kept"]).to_pylist() if r["kept"]}
    logger.info("scoring %d images kept by dedupe", len(ids))
    model = clip_models.load_clip(p.clip, seed=p.seed)
    rows, emb_ids, emb = score_images(ids, p, model, logger, paths.shards)
    cuts = clip_checks(rows, emb_ids, emb, p, model, logger)
    rows.sort(key=lambda r: r["id"])
    table = to_table(rows)
    shards.write_table(table, paths.table)
    clip_models.save_embeddings(paths.embeddings, emb_ids, emb, model.name)
    metrics = curation_metrics(table, dedupe, paths.truth)
    metrics["cutoffs"] = {k: (v if np.isfinite(v) else None) for k, v in cuts.items()}
    io.write_json(paths.metrics, metrics)
    logger.info("kept %d of %d; rejects %s", metrics["counts"]["after_filter"], len(rows),
                metrics["counts"]["rejects"])
    if "filter" in metrics:
        logger.info("dedupe P/R %.3f/%.3f, heuristic filter P/R %.3f/%.3f, good lost %.3f",
                    metrics["dedupe"]["precision"], metrics["dedupe"]["recall"],
                    metrics["filter"]["precision"], metrics["filter"]["recall"],
                    metrics["filter"]["good_lost"])
    write_reports(table, cuts, p, paths)
    return metrics


def main() -> None:
    p = params.load()
    log.setup("filter")
    run(p, Filter())


def histograms(table: pa.Table, bins: int = 20) -> list[dict]:
    """Long-format histograms of every score: rows of score, bin (lower edge), count."""
    out = []
    for name in SCORES:
        v = np.array([x for x in table[name].to_pylist() if x is not None], float)
        if len(v) == 0:
            continue
        counts, edges = np.histogram(v, bins=bins)
        out += [{"score": name, "bin": f"{name} {e:.4g}", "count": int(c)} for e, c in zip(edges, counts)]
    return out


def write_reports(table: pa.Table, cuts: dict, p, paths: Filter) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table.to_pylist()
    f = p.filter
    cutoffs = {"blur": f.blur_min, "clipped": f.surround_max, "clipped_inner": f.clipped_max,
               "texture": f.texture_min, "entropy": f.entropy_min, "std": f.std_min or None,
               "border": f.border_max if f.border_detect else None, **cuts}
    hist = histograms(table)
    reasons = Counter(r for row in rows for r in (row["reasons"] or "").split(";") if r)
    with io.atomic_dir(paths.reports / "figures") as fig_dir:
        fig, axes = plt.subplots(2, 5, figsize=(20, 7))
        for ax, name in zip(axes.ravel(), SCORES):
            v = np.array([x for x in table[name].to_pylist() if x is not None], float)
            cut = cutoffs.get(name)
            if name == "blur":  # spans decades: log scale
                v, cut = np.log10(1 + v), None if cut is None else np.log10(1 + cut)
            ax.hist(v, bins=20, color="tab:blue")
            if cut is not None and np.isfinite(cut):
                ax.axvline(cut, color="tab:red", ls="--", label="threshold")
                ax.legend()
            ax.set_title("log10(1 + blur)" if name == "blur" else name)
        axes.ravel()[-1].barh(list(reasons), list(reasons.values()), color="tab:red")
        axes.ravel()[-1].set_title("rejects by reason")
        fig.tight_layout()
        fig.savefig(fig_dir / "scores.png", dpi=80)
        plt.close(fig)
        sheets(rows, fig_dir, paths.shards)
    io.write_text(paths.reports / "scores.csv", "score,bin,count\n" + "".join(
        f"{h['score']},{h['bin']},{h['count']}\n" for h in hist))
    io.write_text(paths.reports / "reasons.csv", "reason,count\n" + "".join(
        f"{r},{c}\n" for r, c in sorted(reasons.items())))


def sheets(rows: list[dict], fig_dir: Path, raw: Path, n: int = 32) -> None:
    """Contact sheets: rejects with their reasons; top and bottom aesthetic scores."""
    rejects = [r for r in rows if not r["kept"] and r["reason"] != "unreadable"][:n]
    scored = sorted((r for r in rows if r["aesthetic"] is not None), key=lambda r: -r["aesthetic"])
    top, bottom = scored[:16], scored[-16:][::-1]
    want = {r["id"] for r in rejects + top + bottom}
    pics = {row["id"]: images.decode(row["image"])
            for row in shards.iter_rows(raw, columns=["id", "image"], ids=want)}
    for name, picked, label in (
            ("rejects.png", rejects, lambda r: r["reasons"]),
            ("top_aesthetic.png", top, lambda r: f"{r['aesthetic']:.3f}"),
            ("bottom_aesthetic.png", bottom, lambda r: f"{r['aesthetic']:.3f}")):
        picked = [r for r in picked if r["id"] in pics]
        sheet = images.contact_sheet([pics[r["id"]] for r in picked], [label(r) for r in picked],
                                     cols=8, title=f"{name[:-4]}: {len(picked)} shown")
        sheet.save(fig_dir / name)


if __name__ == "__main__":
    main()
