"""evaluate stage: held-out paintings vs base samples vs LoRA samples -> reports/metrics.json.

Sets: ``holdout`` (data/curated/holdout), ``base`` (samples at LoRA scale 0) and ``lora`` (samples
at the largest scale); every scale of the sweep also gets a row in ``reports/plots/sweep.csv``.
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

Also writes reports/eval/ (metrics_all.json, details.json, traits.png, loss.png, the blind A/B page and its key),
reports/plots/{traits,sweep}.csv (DVC plots) and reports/report.html.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from stages.core import images as core_images
from stages.core import log, params, registry, shards, tracking
from stages.core.io import atomic_dir, read_json, write_json
from stages.metrics import ab, fidelity, report, style, traits, vocab

SAMPLES = Path("reports/samples")
HOLDOUT = Path("data/curated/holdout")
EMBEDDINGS = Path("data/interim/clip_embeddings.safetensors")
METRICS = Path("reports/metrics.json")  # the headline (vocab.HEADLINE): what `dvc exp show` compares
EVAL = Path("reports/eval")
METRICS_ALL = EVAL / "metrics_all.json"  # every metric (a plain output, not a DVC metric)
REPORT = Path("reports/report.html")
PLOTS = Path("reports/plots")  # DVC plots (CSV); outside reports/eval, DVC outputs may not overlap


HOLDOUT_SIDE = 512  # held-out paintings are kept in memory at most this large (CLIP sees 224 px)


def load_holdout(logger) -> tuple[list[str], list[Image.Image]]:
    """Decode the held-out paintings, each shrunk to HOLDOUT_SIDE on its long side (WikiArt scans
    run to several megapixels; a thousand of them at full size would not fit in memory)."""
    ids, imgs = [], []
    for row in shards.iter_rows(HOLDOUT, columns=["id", "image"]):
        try:
            img = core_images.decode(row["image"])
            img.thumbnail((HOLDOUT_SIDE, HOLDOUT_SIDE), Image.LANCZOS)
            imgs.append(img)
            ids.append(row["id"])
        except Exception as err:  # a broken held-out image is skipped, loudly
            logger.warning("held-out image %s unreadable (%s): skipped", row["id"], err)
    if len(imgs) < 2:
        raise SystemExit(f"{HOLDOUT}: {len(imgs)} held-out images; need at least 2 (raise data.holdout)")
    return ids, imgs


def holdout_clip_embeddings(clip, ids, imgs, logger) -> np.ndarray:
    """Reuse the filter stage's cached embeddings when they come from the same CLIP model."""
    from stages.models.clip import load_embeddings

    if EMBEDDINGS.exists():
        cached_ids, emb, model = load_embeddings(EMBEDDINGS)
        row = {i: k for k, i in enumerate(cached_ids)}
        if model == clip.name and all(i in row for i in ids):
            logger.info("held-out CLIP embeddings from %s", EMBEDDINGS)
            return emb[[row[i] for i in ids]]
        logger.info("embedding cache is for %r / misses ids: re-embedding the held-out set", model)
    return clip.embed_images(imgs)


def set_metrics(name: str, emb: np.ndarray, ref: np.ndarray, imgs: list, aest: np.ndarray,
                groups, size: int, ref_traits: dict[str, np.ndarray] | None = None) -> dict:
    """One set's metrics; ``ref_traits`` (held-out per-image traits) adds the trait distances."""
    is_ref = name == "holdout"
    out = {f"style_centroid_{name}": style.centroid_cosine(emb, ref, leave_one_out=is_ref),
           f"style_nn_{name}": style.nn_cosine(emb, ref, leave_one_out=is_ref),
           f"aesthetic_{name}": float(np.mean(aest)),
           f"diversity_{name}": style.diversity(emb, groups)}
    table = traits.trait_table(imgs, size)
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


def main() -> None:
    p = params.load()
    logger = log.setup("evaluate")
    from stages.models import aesthetic
    from stages.models.clip import load_clip

    if not (SAMPLES / "index.json").exists():
        raise SystemExit(f"no {SAMPLES}/index.json: run the sample stage first (dvc repro sample)")
    index = read_json(SAMPLES / "index.json")
    scales = sorted({float(im["scale"]) for im in index["images"]})
    if 0.0 not in scales or len(scales) < 2:
        raise SystemExit(f"{SAMPLES}/index.json needs base (scale 0) and LoRA samples; scales = {scales}")
    lora_scale = scales[-1]
    hold_ids, hold_imgs = load_holdout(logger)
    clip = load_clip(p.clip, seed=p.seed)
    head = aesthetic.load_aesthetic_head(p.filter.aesthetic.head, clip.dim, seed=p.seed, device=clip.device)
    csd = None
    if p.eval.csd_weights:
        from stages.metrics.csd import load_csd
        csd = load_csd(p.eval.csd_weights, p.eval.csd_model, device=clip.device)
    notes = [f"style embeddings: {csd.name if csd else clip.name} (CLIP image embeddings; set "
             "eval.csd_weights for CSD)" if not csd else f"style embeddings: {csd.name}"]

    hold_clip = holdout_clip_embeddings(clip, hold_ids, hold_imgs, logger)
    hold_style = csd.embed_images(hold_imgs) if csd else hold_clip
    metrics = {"n_holdout": len(hold_imgs), "lora_scale": lora_scale}
    hold_metrics, hold_traits = set_metrics("holdout", hold_style, hold_style, hold_imgs,
                                            head.score(hold_clip), None, p.eval.trait_size)
    metrics.update(hold_metrics)
    sweep, per_image = [], []
    for scale in log.progress(scales, desc="evaluate scales", unit="scale"):
        recs = [im for im in index["images"] if float(im["scale"]) == scale]
        imgs = [core_images.load(SAMPLES / r["file"]) for r in recs]
        img_clip = clip.embed_images(imgs)
        sty = csd.embed_images(imgs) if csd else img_clip
        txt = clip.embed_texts([r["prompt"] for r in recs])
        aest = head.score(img_clip)
        name = "base" if scale == 0 else "lora" if scale == lora_scale else f"scale{scale:g}"
        m, _ = set_metrics(name, sty, hold_style, imgs, aest, [r["prompt_index"] for r in recs],
                           p.eval.trait_size, hold_traits)
        m[f"clip_score_{name}"] = fidelity.clip_score(img_clip, txt)
        m[f"kid_{name}"], kid_std, kid_n = fidelity.kid(hold_style, sty, p.eval.kid_subset_size, seed=p.seed)
        if min(len(sty), len(hold_style)) >= p.eval.fid_min_samples:
            m[f"fid_{name}"] = fidelity.fid(hold_style, sty)
        sweep.append({"scale": scale, **{k.rsplit("_", 1)[0]: v for k, v in m.items()}})
        if name in ("base", "lora"):
            metrics.update(m)
            metrics[f"n_{name}"] = len(imgs)
        notes.append(f"KID {name}: subset size {kid_n}, std over subsets {kid_std:.4g}")
        per_image += [{**r, "aesthetic": float(a), "clip_score": fidelity.clip_score(e[None], t[None])}
                      for r, a, e, t in zip(recs, aest, img_clip, txt)]
    if "fid_lora" not in metrics:
        notes.append(f"FID omitted: needs >= eval.fid_min_samples = {p.eval.fid_min_samples} images per "
                     f"set (held-out {len(hold_imgs)}, samples {metrics['n_lora']} per scale)")
    for key in [k for k in metrics if k.endswith("_lora")]:
        stem = key[: -len("_lora")]
        raw_trait = stem.startswith("trait_") and not stem.endswith("_dist")  # only distances compare
        if stem + "_base" in metrics and stem != "n" and not raw_trait:
            metrics[stem + "_delta"] = metrics[key] - metrics[stem + "_base"]
    metrics["clip_score_ratio"] = metrics["clip_score_lora"] / metrics["clip_score_base"] \
        if metrics["clip_score_base"] else float("nan")
    metrics = clean(ordered(metrics))

    with atomic_dir(EVAL) as tmp:
        report.write_trait_plot(metrics, PLOTS / "traits.csv", tmp / "traits.png")
        report.write_csv(PLOTS / "sweep.csv", [clean(r) for r in sweep])
        report.write_loss_plot(Path("reports/train/loss.tsv"), tmp / "loss.png")
        ab.build_page(SAMPLES, tmp / "abtest", tmp / "abtest-key.json", p.eval.ab_scale, seed=p.seed)
        write_json(tmp / METRICS_ALL.name, metrics)
        write_json(tmp / "details.json", {"notes": notes, "clip": clip.name, "holdout_ids": hold_ids,
                                          "images": per_image})
    write_json(METRICS, vocab.headline(metrics))
    report.write_report(REPORT, metrics, notes, index, p)
    logger.info("style centroid cos: held-out %.3f, base %.3f, LoRA %.3f; CLIP score ratio %.3f",
                *(metrics.get(k) or float("nan") for k in ("style_centroid_holdout", "style_centroid_base",
                                                           "style_centroid_lora", "clip_score_ratio")))
    with tracking.run("evaluate", p):
        tracking.log_metrics({k: v for k, v in metrics.items() if v is not None})
        registry.describe_version(p, metrics)  # the registered adapter: description, best-style alias
        tracking.log_artifacts([METRICS, METRICS_ALL, REPORT, EVAL / "traits.png", PLOTS / "traits.csv", PLOTS / "sweep.csv"],
                               artifact_path="eval")


if __name__ == "__main__":
    main()
