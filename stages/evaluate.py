"""evaluate stage: held-out paintings vs base samples vs LoRA samples -> reports/metrics.json.

Sets: ``holdout`` (data/curated/holdout), ``base`` (samples at LoRA scale 0) and ``lora`` (samples
at ``sample.lora_scale``, by default the largest scale); every scale of the sweep also gets a row in ``reports/plots/sweep.csv``.
Metrics (flat keys ``<family>_<set>``, named in stages.metrics.vocab; the meaning of each is in the
README). ``reports/metrics.json`` gets the headline (``vocab.HEADLINE``), reports/eval/metrics_all.json all:

- ``style_centroid_*`` / ``style_nn_*``: cosine to the held-out centroid / nearest held-out image,
  on CSD embeddings when ``eval.csd_weights`` is set, else CLIP image embeddings (held-out: leave
  one out, the ceiling to read the others against);
- ``clip_score_base|lora`` and ``clip_score_ratio`` (LoRA / base): image vs its content prompt;
- ``kid_base|lora`` vs held-out (torchmetrics, on the style embeddings); ``fid_*`` only when both
  sets have >= ``eval.fid_min_samples`` images (else omitted, with a note in details.json);
- ``aesthetic_*`` (the filter stage's LAION head); ``diversity_*`` (mean pairwise cosine distance
  of one prompt's seeds); ``trait_<name>_*`` (stages.metrics.traits: the set's mean) and
  ``trait_<name>_dist_base|lora``: distance of that mean to the held-out mean in held-out standard
  deviations (closer is better: a trait that overshoots the held-out paintings is not "more
  Impressionist"); ``*_delta`` = LoRA - base (for traits only of the distance: negative = LoRA closer).

The operating point of the grid (stages/operating_point.py) joins them as ``op_step``, ``op_scale``,
``op_style``, ``op_content`` (headline too) and its record is copied to reports/eval/operating_point.json.

Also writes reports/eval/ (metrics_all.json, details.json, traits.png, loss.png, the blind A/B page and its key),
reports/plots/{traits,sweep}.csv (DVC plots) and reports/report.html.

The held-out paintings' embeddings and traits do not depend on the adapter: they are measured by the
first experiment (or its operating-point grid) and read from the shared stage cache by the next ones
(stages.metrics.reference.measure_reference, stages.metrics.refcache; ``eval.reference_cache``), the same
arrays bit for bit.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np

from stages.core import images as core_images
from stages.core import gpus, log, params, registry, tracking
from stages.core.io import atomic_dir, read_json, write_json
from stages.core.paths import Evaluate
from stages.metrics import ab, fidelity, report, style, traits, vocab
from stages.metrics.reference import Embedders, Reference, measure_reference

logger = logging.getLogger("stages.evaluate")


def set_metrics(name: str, emb: np.ndarray, ref: np.ndarray, imgs: list, aest: np.ndarray,
                groups, size: int, ref_traits: dict[str, np.ndarray] | None = None,
                table: dict[str, np.ndarray] | None = None) -> dict:
    """One set's metrics; ``ref_traits`` (held-out per-image traits) adds the trait distances;
    ``table``: the set's per-image traits when already measured (else measured on ``imgs``)."""
    is_ref = name == "holdout"
    out = {f"style_centroid_{name}": style.centroid_cosine(emb, ref, leave_one_out=is_ref),
           f"style_nn_{name}": style.nn_cosine(emb, ref, leave_one_out=is_ref),
           f"aesthetic_{name}": float(np.mean(aest)),
           f"diversity_{name}": style.diversity(emb, groups)}
    table = traits.trait_table(imgs, size) if table is None else table
    out.update({f"trait_{k}_{name}": float(v.mean()) for k, v in table.items()})
    if ref_traits is not None:
        out.update({f"trait_{k}_dist_{name}": d for k, d in traits.distance(table, ref_traits).items()})
    return out, table


def ordered(metrics: dict) -> dict:
    """Counts first, then each metric family as held-out, base, LoRA, delta (dvc exp show order)."""
    order = {"holdout": 0, "base": 1, "lora": 2, "delta": 3, "ratio": 4}
    stems = list(dict.fromkeys(k.rsplit("_", 1)[0] for k in metrics if not k.startswith("n_")))
    rank = {s: i for i, s in enumerate(stems)}

    def key(k: str):
        if k.startswith("n_") or k == "lora_scale":
            return (-1, 0)
        stem, _, suffix = k.rpartition("_")
        return (rank.get(stem, len(rank)), order.get(suffix, 9))
    return {k: metrics[k] for k in sorted(metrics, key=key)}


def clean(d: dict) -> dict:
    """NaN/inf -> None (valid JSON; DVC shows it as empty), floats rounded for readable columns."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else
                round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def read_index(samples: Path) -> tuple[dict, list[float]]:
    """The sample stage's index and its LoRA scales (the base, 0, and at least one more)."""
    if not (samples / "index.json").exists():
        raise SystemExit(f"no {samples}/index.json: run the sample stage first (dvc repro sample)")
    index = read_json(samples / "index.json")
    scales = sorted({float(im["scale"]) for im in index["images"]})
    if 0.0 not in scales or len(scales) < 2:
        raise SystemExit(f"{samples}/index.json needs base (scale 0) and LoRA samples; scales = {scales}")
    return index, scales


def measure_scale(p: params.Params, name: str, recs: list[dict], samples: Path, models: Embedders,
                  ref: Reference) -> tuple[dict, list[dict], str]:
    """The metrics of one LoRA scale's samples (``name``: base, lora or scale<s>), per-image rows
    for details.json and a note on KID."""
    imgs = core_images.load_many([samples / r["file"] for r in recs])
    img_clip = models.clip.embed_images(imgs)
    sty = models.style(imgs, img_clip)
    txt = models.clip.embed_texts([r["prompt"] for r in recs])
    aest = models.head.score(img_clip)
    m, _ = set_metrics(name, sty, ref.style, imgs, aest, [r["prompt_index"] for r in recs],
                       p.eval.trait_size, ref.traits)
    m[f"clip_score_{name}"] = fidelity.clip_score(img_clip, txt)
    m[f"kid_{name}"], kid_std, kid_n = fidelity.kid(ref.style, sty, p.eval.kid_subset_size, seed=p.seed)
    if min(len(sty), len(ref.style)) >= p.eval.fid_min_samples:
        m[f"fid_{name}"] = fidelity.fid(ref.style, sty)
    per_image = [{**r, "aesthetic": float(a), "clip_score": fidelity.clip_score(e[None], t[None])}
                 for r, a, e, t in zip(recs, aest, img_clip, txt)]
    return m, per_image, f"KID {name}: subset size {kid_n}, std over subsets {kid_std:.4g}"


def compare(metrics: dict) -> dict:
    """LoRA - base deltas and the CLIP-score ratio, then the flat, ordered, JSON-clean dict."""
    for key in [k for k in metrics if k.endswith("_lora")]:
        stem = key[: -len("_lora")]
        raw_trait = stem.startswith("trait_") and not stem.endswith("_dist")  # only distances compare
        if stem + "_base" in metrics and stem != "n" and not raw_trait:
            metrics[stem + "_delta"] = metrics[key] - metrics[stem + "_base"]
    metrics["clip_score_ratio"] = metrics["clip_score_lora"] / metrics["clip_score_base"] \
        if metrics["clip_score_base"] else float("nan")
    return clean(ordered(metrics))


def operating_point_metrics(path: Path) -> dict:
    """``op_step``, ``op_scale``, ``op_style``, ``op_content`` of the grid's recommendation (none when it did not run)."""
    rec = read_json(path) if path.exists() else {}
    best = rec.get("recommended") if rec.get("enabled") else None
    return {f"op_{k}": best[k] for k in ("step", "scale", "style", "content")} if best else {}


def run(p: params.Params, paths: Evaluate = Evaluate()) -> dict:
    """The whole stage; returns the metrics written to ``paths.metrics``."""
    index, scales = read_index(paths.samples)
    lora_scale = float(index.get("lora_scale") or scales[-1])  # sample.lora_scale (e.g. best), else the largest
    models = Embedders.load(p)
    ref = measure_reference(p, paths.curated / "holdout", paths.embeddings, models)
    metrics = {"n_holdout": len(ref.ids), "lora_scale": lora_scale}
    hold_metrics, _ = set_metrics("holdout", ref.style, ref.style, [], models.head.score(ref.clip), None,
                                  p.eval.trait_size, table=ref.traits)
    metrics.update(hold_metrics)
    notes, sweep, per_image = [models.note()], [], []
    for scale in log.progress(scales, desc="evaluate scales", unit="scale"):
        name = "base" if scale == 0 else "lora" if scale == lora_scale else f"scale{scale:g}"
        recs = [im for im in index["images"] if float(im["scale"]) == scale]
        m, rows, note = measure_scale(p, name, recs, paths.samples, models, ref)
        sweep.append({"scale": scale, **{k.rsplit("_", 1)[0]: v for k, v in m.items()}})
        if name in ("base", "lora"):
            metrics.update(m)
            metrics[f"n_{name}"] = len(recs)
        notes.append(note)
        per_image += rows
    if "fid_lora" not in metrics:
        notes.append(f"FID omitted: needs >= eval.fid_min_samples = {p.eval.fid_min_samples} images per "
                     f"set (held-out {len(ref.ids)}, samples {metrics['n_lora']} per scale)")
    metrics.update(operating_point_metrics(paths.operating_point))
    metrics = compare(metrics)
    write_outputs(p, paths, metrics, sweep, {"notes": notes, "clip": models.clip.name, "holdout_ids": ref.ids,
                                             "images": per_image}, index)
    logger.info("style centroid cos: held-out %.3f, base %.3f, LoRA %.3f; CLIP score ratio %.3f",
                *(metrics.get(k) or float("nan") for k in ("style_centroid_holdout", "style_centroid_base",
                                                           "style_centroid_lora", "clip_score_ratio")))
    return metrics


def write_outputs(p: params.Params, paths: Evaluate, metrics: dict, sweep: list[dict], details: dict,
                  index: dict) -> None:
    """reports/eval/ (plots, the A/B page, metrics_all.json, details.json), the DVC plots, the headline
    metrics.json, report.html."""
    with atomic_dir(paths.eval) as tmp:
        report.write_trait_plot(metrics, paths.plots / "traits.csv", tmp / "traits.png")
        report.write_csv(paths.plots / "sweep.csv", [clean(r) for r in sweep])
        report.write_loss_plot(paths.loss, tmp / "loss.png")
        ab.build_page(paths.samples, tmp / "abtest", tmp / "abtest-key.json", p.eval.ab_scale, seed=p.seed)
        write_json(tmp / "metrics_all.json", metrics)  # every metric (a plain output, not a DVC metric)
        write_json(tmp / "details.json", details)
        if paths.operating_point.exists():  # the grid's record beside the metrics (report, model card, MLflow)
            shutil.copyfile(paths.operating_point, tmp / "operating_point.json")
    write_json(paths.metrics, vocab.headline(metrics))  # the headline (vocab.HEADLINE): what `dvc exp show` compares
    report.write_report(paths.report, metrics, details["notes"], index, p)


def main() -> None:
    p = params.load()
    gpus.claim("evaluate")  # a free GPU before CUDA starts (stages/core/gpus.py)
    log.setup("evaluate")
    paths = Evaluate()
    metrics = run(p, paths)
    sampled = json.loads((paths.samples / "index.json").read_text())  # which adapter made the images evaluated
    with tracking.run("evaluate", p, adapter_sha=sampled.get("adapter_sha256"), reads={"curated": paths.curated}):
        tracking.log_metrics({k: v for k, v in metrics.items() if v is not None})
        registry.describe_version(p, metrics)  # the registered adapter: description, best-style alias
        tracking.log_artifacts([paths.metrics, paths.eval / "metrics_all.json", paths.report, paths.eval / "traits.png",
                                paths.plots / "traits.csv", paths.plots / "sweep.csv",
                                *[f for f in [paths.eval / "operating_point.json"] if f.exists()]], artifact_path="eval")


if __name__ == "__main__":
    main()
