"""operating_point stage: which step, which strength — the style-content trade-off of one run.

Runs after train and before sample (``sample.adapter_step: best`` / ``sample.lora_scale: best`` read
its answer). With ``eval.grid.enabled`` it renders the first ``eval.grid.prompts`` prompts of
``sample.prompts`` (with the trigger, as sample does) at ``eval.grid.seeds`` for every snapshot step
(``eval.grid.steps``: ``all`` = every ``train.save_every`` snapshot of this run, plus the final adapter
in ``models/lora``) and LoRA scale (``eval.grid.scales``), at sample's steps, guidance and resolution; the
base images of the same prompts and seeds come from the base-image cache it shares with sample
(stages.models.base_cache), rendered only when missing. Each point gets (stages.metrics.operating_point):

- style: cosine of each image's style embedding (CSD when ``eval.csd_weights``, else CLIP) to the
  held-out paintings' centroid — the per-image terms of evaluate's headline ``style_centroid``;
- content: CLIP-score ratio to the base on the same (prompt, seed) pairs (evaluate's ``clip_score_ratio``);
- 95 % bootstrap intervals over the pairs (``eval.grid.bootstrap`` resamples, seeded by ``seed``).

The recommendation is the highest-style point of the Pareto front with content >= ``eval.grid.content_min``
(default 0.9), with its reason, the points it cannot be told apart from, and what later steps do.
Cost: steps x scales x prompts x seeds LoRA images (plus prompts x seeds base images).

Writes ``reports/operating_point/`` (``operating_point.json``, ``grid.md``, ``grid.png``) and the DVC
plot ``reports/plots/operating_point.csv``; logs the point and the files to the run's MLflow run.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from stages.core import gpus, lineage, log, params, tracking
from stages.core import images as core_images
from stages.core.io import atomic_dir, read_json, write_json, write_text
from stages.core.paths import OperatingPoint
from stages.core.prompts import read_prompts, with_trigger
from stages.metrics import fidelity, style
from stages.metrics import operating_point as op
from stages.metrics.reference import Embedders, measure_reference
from stages.models import memory, snapshots

LORA_FILE = snapshots.DIFFUSERS_FILE
logger = logging.getLogger("stages.operating_point")


def grid_adapters(steps, lora: Path, root: Path, final_default: int) -> list[tuple[int, Path]]:
    """(step, adapter folder) pairs, ascending: the chosen snapshots of this run, then the final adapter.
    A snapshot of another run (other data or cache key than the final adapter) is left out, loudly."""
    info = read_json(lora / "adapter.json") if (lora / "adapter.json").exists() else {}
    final = int(info.get("steps") or final_default)
    saved = []
    for s in snapshots.steps_saved(root):
        if s >= final:
            continue
        snap = read_json(snapshots.snapshot_dir(s, root) / "adapter.json")
        if any(info.get(k) and snap.get(k) != info.get(k) for k in ("data_hash", "cache_key")):
            logger.warning("snapshot step %d is from another run (data or cache differs): left out", s)
            continue
        saved.append(s)
    if steps == "all":
        chosen = saved
        if not saved:
            logger.warning("no snapshot of this run in %s (train.save_every = 0, or the folder was cleared): the grid "
                           "has the final adapter's step only", root)
    else:
        missing = [s for s in steps if s != final and s not in saved]
        if missing:
            raise SystemExit(f"eval.grid.steps: no snapshot of this run for steps {missing} (saved: {saved or 'none'}, "
                             f"final: {final}; set train.save_every)")
        chosen = sorted({s for s in steps if s != final})
    return [(s, snapshots.snapshot_dir(s, root)) for s in chosen] + [(final, lora)]


def render_grid(p: params.Params, full: list[str], jobs: list[tuple[int, int]],
                adapters: list[tuple[int, Path]], scales: list[float], device) -> tuple[list, dict]:
    """Images: the base ones, then {(step, scale): images} — one transformer, one adapter per step.
    The base images come from the base-image cache the sample stage shares (stages.models.base_cache,
    ``sample.base_cache``): in a second experiment the grid renders LoRA images only."""
    from stages.models import base_cache, flux, memory, render
    from stages.models.sampler import Sampler, decode_calls

    sp = p.sample
    plan = memory.plan(p.model, device)
    flux.preflight("operating_point", p, device, plan)
    embeds, pooled = render.embed_prompts(p.model, full, p.train.max_sequence_length, plan, device=device)
    rows = [pi for pi, _ in jobs]
    embeds, pooled = embeds[rows], pooled[rows]
    seeds = [s for _, s in jobs]
    keyed = base_cache.keys(base_cache.run_fields(p, device), [full[pi] for pi in rows], seeds, embeds, pooled,
                            sp.batch_size)
    cached, todo = base_cache.lookup(keyed, sp.batch_size) if sp.base_cache else ({}, list(range(len(jobs))))
    # one adapter for every step: the next snapshot is hot-swapped into the same layers and the scale set in
    # place, so compiled blocks are built once; the sample stage's renderer (the base images are the same bytes)
    sampler = Sampler(p, device, adapters[0][1])
    latents = {}
    if todo:  # whole batches only (lookup), so the images are those of a cold run
        latents["base"] = dict(zip(todo, sampler.latents(0.0, embeds[todo], pooled[todo], [seeds[k] for k in todo])))
    bar = log.progress(total=len(adapters) * len(scales) * len(jobs), desc="grid images", unit="img")
    for i, (step, folder) in enumerate(adapters):
        if i:
            sampler.swap(folder)
        for scale in scales:
            done = bar.n
            latents[(step, scale)] = dict(enumerate(sampler.latents(
                scale, embeds, pooled, seeds, progress=lambda n: bar.update(done + n - bar.n))))
    bar.close()
    sampler.close()
    vae = flux.load_vae(p.model, device=device)
    images = {k: dict(decode_calls(vae, lat, sp.batch_size, sp.resolution, plan.vae_batch))
              for k, lat in latents.items()}
    del vae
    render.free_memory()
    pngs = dict(cached)
    base = images.pop("base", {})
    for k, png in zip(todo, core_images.encode_pngs([base[k] for k in todo])):
        pngs[k] = png  # the bytes the sample stage writes for this image (encode_png, on threads)
        if sp.base_cache:
            base_cache.store(*keyed[k], pngs[k])
    return ([core_images.decode(pngs[k]) for k in range(len(jobs))],
            {k: [imgs[j] for j in range(len(jobs))] for k, imgs in images.items()})


def measure(p: params.Params, paths: OperatingPoint, prompts: list[str], jobs, base, grid) -> tuple[list, float]:
    """Points with intervals, and the base images' style (a reference in the figure)."""
    models = Embedders.load(p)
    # the held-out set measured once for this stage, evaluate and later experiments (eval.reference_cache)
    ref = measure_reference(p, paths.curated / "holdout", paths.embeddings, models, with_traits=False).style
    txt = models.clip.embed_texts([prompts[pi] for pi, _ in jobs])  # content prompts, as evaluate scores them

    def scores(images):
        emb = models.clip.embed_images(images)
        clip = np.array([fidelity.clip_score(e[None], t[None]) for e, t in zip(emb, txt)])
        return style.centroid_cosines(models.style(images, emb), ref), clip

    base_style, base_clip = scores(base)
    boot = op.resamples(len(jobs), p.eval.grid.bootstrap, p.seed)
    points = []
    for (step, scale), images in grid.items():
        sty, clip = scores(images)
        points.append(op.measure(step, scale, sty, clip, base_clip, boot))
    return points, float(base_style.mean())


def run(p: params.Params, paths: OperatingPoint = OperatingPoint()) -> dict:
    """The whole stage; returns the record written to ``paths.record``."""
    g, sp = p.eval.grid, p.sample
    if not g.enabled:
        rec = {"enabled": False, "reason": "eval.grid.enabled is false: no grid rendered, no operating point"}
        with atomic_dir(paths.reports) as tmp:
            write_json(tmp / "operating_point.json", rec)
        write_text(paths.plot, op.csv_text([]))  # an empty DVC plot
        return rec
    prompts = read_prompts(sp.prompts)[:g.prompts]
    full = [with_trigger(pr, p.caption.trigger) for pr in prompts]
    adapters = grid_adapters(g.steps, paths.lora, paths.snapshots, p.train.steps)
    if not (paths.lora / LORA_FILE).exists():
        raise SystemExit(f"no adapter at {paths.lora / LORA_FILE}: run the train stage first (dvc repro train)")
    scales = sorted({float(s) for s in g.scales})
    jobs = [(pi, seed) for pi in range(len(prompts)) for seed in g.seeds]
    logger.info("grid: steps %s x scales %s x %d prompts x %d seeds = %d LoRA images (+ %d base)",
                [s for s, _ in adapters], scales, len(prompts), len(g.seeds), len(adapters) * len(scales) * len(jobs),
                len(jobs))
    t0 = time.perf_counter()
    from stages.core.device import default_device

    device = default_device()
    p = memory.resolve(p, device)  # the autos: the base and the batch this card renders with (as sample)
    base, grid = render_grid(p, full, jobs, adapters, scales, device)
    points, base_style = measure(p, paths, prompts, jobs, base, grid)
    best = op.recommend(points, g.content_min, len(jobs))
    final = adapters[-1][0]
    rec = {"enabled": True, "recommended": best, "final_step": final, "steps": [s for s, _ in adapters],
           "scales": scales, "prompts": len(prompts), "seeds": list(g.seeds), "pairs": len(jobs),
           "content_min": g.content_min, "bootstrap": g.bootstrap, "level": op.LEVEL,
           "style_metric": "style_centroid: cosine of each image's style embedding to the held-out centroid",
           "content_metric": "clip_score_ratio: CLIP score / the base image's, same prompt and seed",
           "base_style": round(base_style, 6), "points": [pt.record() for pt in points]}
    write_outputs(paths, rec, points)
    logger.info("operating point: step %s, scale %g (%s) in %.1f s", best["step"], best["scale"], best["reason"],
                time.perf_counter() - t0)
    return rec


def write_outputs(paths: OperatingPoint, rec: dict, points: list) -> None:
    best = rec["recommended"]
    title = (f"recommended: step {best['step']}, scale {best['scale']:g} "
             f"({rec['prompts']} prompts x {len(rec['seeds'])} seeds)")
    with atomic_dir(paths.reports) as tmp:
        write_json(tmp / "operating_point.json", rec)
        notes = [best["reason"]] + ([best["trend"]] if best["trend"] else [])
        write_text(tmp / "grid.md", f"# {title}\n\n" + op.table(points, best) + "\n" + "\n".join(
            f"- {n}" for n in notes) + "\n")
        op.plot(points, tmp / "grid.png", title, rec["content_min"], (best["step"], best["scale"]), rec["base_style"])
    write_text(paths.plot, op.csv_text(points))


def main() -> None:
    p = params.load()
    gpus.claim("operating_point")  # a free GPU before CUDA starts (stages/core/gpus.py)
    log.setup("operating_point")
    paths = OperatingPoint()
    rec = run(p, paths)
    if not rec.get("enabled"):
        return
    best = rec["recommended"]
    # the run that trained the final adapter gets the point (found by the adapter's hash, as sample and evaluate)
    with tracking.run("operating_point", p, adapter_sha=lineage.adapter_hash(paths.lora)):
        tracking.log_metrics({"op_step": best["step"], "op_scale": best["scale"], "op_style": best["style"],
                              "op_content": best["content"]})
        tracking.set_tags({"operating_point": f"step {best['step']}, scale {best['scale']:g}"})
        tracking.log_artifacts([paths.record, paths.reports / "grid.md", paths.reports / "grid.png", paths.plot],
                               artifact_path="operating_point")


if __name__ == "__main__":
    main()
