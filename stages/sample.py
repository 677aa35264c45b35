"""sample stage: images from the base model and base + LoRA with identical seeds, and grids.

Reads the prompt suite (``sample.prompts``: one content prompt per line, ``#`` comments), the base
model (``model.*``) and the adapter in ``models/lora``. For every prompt, seed and LoRA scale in
``sample.lora_scales`` (0 = the base: the adapter is disabled) it renders one image at
``sample.resolution``, ``sample.steps`` and ``sample.guidance``, with T5 prompts of
``train.max_sequence_length`` tokens as in training; the latents of a (prompt, seed)
are the same for every scale (one CPU generator per image), so only the adapter differs.

``sample.lora_scale`` (added to the scales) is the scale evaluate's headline measures (default: the largest);
``best`` for it or for ``sample.adapter_step`` takes the operating point the grid recorded
(``reports/operating_point/operating_point.json``, stages/operating_point.py, which runs before this stage).

The trigger (``caption.trigger``) is appended to every prompt, for the base too
(``"<prompt>, <trigger>"``): the LoRA was trained on captions that contain it, and giving the base
the very same text keeps the comparison about the adapter alone, not about the wording.

The base images (scale 0) do not depend on the adapter: they are read from the base-image cache
shared by all experiments (stages.models.base_cache; ``sample.base_cache``) and only rendered (and
stored) where it lacks them, so a second experiment renders only its LoRA images. The files are
the same bytes either way.

Writes ``reports/samples/``: ``images/p00-s0-l0.50.png``..., ``grids/seed-<seed>.png`` (prompts x
(base | LoRA scales)) and ``index.json`` describing every image (prompt, seed, scale, file; a base
image's cache key ``base_key``, whether or not the cache was used).
"""
from __future__ import annotations

import hashlib
import io
import logging
import time
from pathlib import Path

import torch

from stages.core import gpus, log, params, tracking
from stages.core import images as core_images
from stages.core.device import default_device
from stages.core.io import atomic_dir, write_json
from stages.core.paths import Sample
from stages.core.prompts import read_prompts, with_trigger  # noqa: F401 - sample.read_prompts is public
from stages.models import memory, render, snapshots

LORA_FILE = snapshots.DIFFUSERS_FILE
logger = logging.getLogger("stages.sample")


def scale_label(scale: float) -> str:
    return "base" if scale == 0 else f"LoRA {scale:g}"


def cell_side(side: int) -> int:
    """A grid cell's side for images of ``side`` px: at least 128, at most 512."""
    return min(max(side, 128), 512)


def to_cell(img, cell: int):
    """``img`` as a ``cell`` px grid cell: enlarged by nearest neighbour (pixels stay honest), shrunk
    by Lanczos. A cell-sized image comes back as a copy, so cells can be made ahead (on threads)."""
    from PIL import Image

    return img.resize((cell, cell), Image.NEAREST if img.width < cell else Image.LANCZOS)


def grid(rows: list[list], row_labels: list[str], col_labels: list[str], title: str,
         cell: int = 0, label_w: int = 180):
    """A prompt x scale grid: column headers on top, the prompt left of each row. Small images
    are enlarged (nearest neighbour, so pixels stay honest) to at least 128 px cells."""
    from PIL import Image, ImageDraw

    cell = cell or cell_side(rows[0][0].width)
    head = 34
    sheet = Image.new("RGB", (label_w + cell * len(col_labels), head + cell * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), title, fill="black")
    for c, text in enumerate(col_labels):
        draw.text((label_w + c * cell + 4, 18), text, fill="black")
    for r, (images, text) in enumerate(zip(rows, row_labels)):
        words, lines = text.split(), [""]
        for w in words:  # wrap the prompt into the label column
            lines[-1:] = [lines[-1] + " " + w] if len(lines[-1]) + len(w) < label_w // 7 else [lines[-1], w]
        draw.multiline_text((4, head + r * cell + 4), "\n".join(x.strip() for x in lines), fill="black")
        for c, img in enumerate(images):
            sheet.paste(to_cell(img, cell), (label_w + c * cell, head + r * cell))
    return sheet


def embed(p: params.Params, full: list[str], jobs: list[tuple[int, int]], plan, device) -> tuple:
    """1. the prompt embeddings of every job, with the text encoders alone on the device (or from
    the prompt-embedding cache)."""
    t0 = time.perf_counter()
    embeds, pooled = render.embed_prompts(p.model, full, p.train.max_sequence_length, plan, device=device)
    rows = torch.tensor([pi for pi, _ in jobs])
    logger.info("prompt embeddings in %.1f s (%s)", time.perf_counter() - t0, plan.describe())
    return embeds[rows], pooled[rows]


def render_latents(p: params.Params, embeds, pooled, jobs: list[tuple[int, int]], todo: dict[float, list[int]],
                   lora_dir: Path, device) -> dict:
    """2. latents of the jobs ``todo[scale]`` (indices into ``jobs``) for every scale, with the
    transformer (+ adapter) alone on the device; nothing is loaded when there is nothing to do."""
    todo = {scale: ks for scale, ks in todo.items() if ks}
    if not todo:
        return {}
    from stages.models.sampler import Sampler

    t0 = time.perf_counter()
    sampler = Sampler(p, device, lora_dir if any(s > 0 for s in todo) else None)
    logger.info("transformer ready in %.1f s", time.perf_counter() - t0)
    latents = {}
    bar = log.progress(total=sum(len(ks) for ks in todo.values()), desc="sample images", unit="img")
    for scale, ks in todo.items():
        t1 = time.perf_counter()
        done = bar.n
        rows = torch.tensor(ks)
        latents[scale] = dict(zip(ks, sampler.latents(scale, embeds[rows], pooled[rows], [jobs[k][1] for k in ks],
                                                      progress=lambda n: bar.update(done + n - bar.n))))
        logger.info("%s: %d images in %.1f s", scale_label(scale), len(ks), time.perf_counter() - t1)
    bar.close()
    sampler.close()
    return latents


def decode_pngs(p: params.Params, latents: dict, device) -> dict:
    """3. PNG bytes of the latents (``{scale: {job: bytes}}``), with the VAE alone on the device; the
    PNGs are encoded on threads while the VAE decodes the next batch (stages.core.images.png_pool)."""
    from stages.models import flux
    from stages.models.sampler import decode_calls

    if not latents:
        return {}
    t0 = time.perf_counter()
    vae = flux.load_vae(p.model, device=device)
    sp, batch = p.sample, memory.plan(p.model, device).vae_batch
    with core_images.png_pool() as pool:
        # decoded per pipeline call (a base-cache miss re-renders its whole call): the same bytes cold or warm
        pending = {scale: {k: pool.submit(core_images.encode_png, img)
                           for k, img in decode_calls(vae, lat, sp.batch_size, sp.resolution, batch)}
                   for scale, lat in latents.items()}
        out = {scale: {k: f.result() for k, f in fs.items()} for scale, fs in pending.items()}
    del vae
    render.free_memory()
    logger.info("decoded %d images in %.1f s (VAE batch %d)", sum(map(len, latents.values())),
                time.perf_counter() - t0, batch)
    return out


def render_pngs(p: params.Params, full: list[str], jobs: list[tuple[int, int]], scales: list[float],
                lora_dir: Path, device) -> tuple[dict, dict]:
    """PNG bytes of every (scale, job) (``{scale: {job index: bytes}}``) and the base images' cache
    keys (``{job index: key}``): the LoRA images are rendered; the base ones (scale 0) are read
    from the base-image cache (stages.models.base_cache) where it holds them, rendered and stored
    where not."""
    from stages.models import base_cache, flux, memory

    sp = p.sample
    plan = memory.plan(p.model, device)
    flux.preflight("sample", p, device, plan)
    embeds, pooled = embed(p, full, jobs, plan, device)
    todo = {scale: list(range(len(jobs))) for scale in scales}
    keyed, cached = [], {}
    if 0.0 in scales:
        keyed = base_cache.keys(base_cache.run_fields(p, device), [full[pi] for pi, _ in jobs],
                                [seed for _, seed in jobs], embeds, pooled, sp.batch_size)
        if sp.base_cache:
            cached, todo[0.0] = base_cache.lookup(keyed, sp.batch_size)
    pngs = decode_pngs(p, render_latents(p, embeds, pooled, jobs, todo, lora_dir, device), device)
    if 0.0 in scales:
        if sp.base_cache:
            for k, png in pngs.get(0.0, {}).items():
                base_cache.store(*keyed[k], png)
        pngs[0.0] = {**pngs.get(0.0, {}), **cached}
    return pngs, {k: key for k, (key, _) in enumerate(keyed)}


def write_samples(p: params.Params, out: Path, prompts: list[str], full: list[str], jobs: list[tuple[int, int]],
                  scales: list[float], pngs: dict, base_keys: dict, adapter: Path, chosen: dict) -> dict:
    """The images, the grids and ``index.json`` (returned) in ``out``. ``chosen``: the adapter step and
    headline LoRA scale rendered (``best`` resolved), and which were ``best``."""
    from PIL import Image

    sp = p.sample
    records = []
    cell = cell_side(sp.resolution)
    with atomic_dir(out) as tmp, core_images.png_pool() as pool:
        (tmp / "images").mkdir()
        (tmp / "grids").mkdir()
        # the grids' cells, decoded and resized on threads (Pillow releases the GIL) while the files are written
        cells = {(pi, seed, scale): pool.submit(lambda b: to_cell(Image.open(io.BytesIO(b)), cell), pngs[scale][k])
                 for scale in scales for k, (pi, seed) in enumerate(jobs)}
        for scale in scales:
            for k, (pi, seed) in enumerate(jobs):
                name = f"images/p{pi:02d}-s{seed}-l{scale:.2f}.png"
                (tmp / name).write_bytes(pngs[scale][k])
                record = {"file": name, "prompt_index": pi, "prompt": prompts[pi], "full_prompt": full[pi],
                          "seed": seed, "scale": scale, "kind": "base" if scale == 0 else "lora"}
                if scale == 0:
                    record["base_key"] = base_keys[k]  # which base render this is (stages.models.base_cache)
                records.append(record)
        def sheet(seed):  # one seed's grid, on the threads too (PNG encoding releases the GIL)
            rows = [[cells[(pi, seed, s)].result() for s in scales] for pi in range(len(prompts))]
            name = f"grids/seed-{seed}.png"
            grid(rows, prompts, [scale_label(s) for s in scales], f"seed {seed}", cell=cell).save(tmp / name)
            return {"file": name, "seed": seed}

        grids = [f.result() for f in [pool.submit(sheet, seed) for seed in sp.seeds]]
        index = {
            "prompts": prompts, "trigger": p.caption.trigger, "seeds": list(sp.seeds), "scales": scales,
            "steps": sp.steps, "guidance": sp.guidance, "resolution": sp.resolution,
            "model": p.model.base, "revision": p.model.revision, **chosen,
            "adapter_sha256": hashlib.sha256(adapter.read_bytes()).hexdigest() if adapter.exists() else None,
            "images": records, "grids": grids}
        write_json(tmp / "index.json", index)
    return index


def chosen(sp, step, headline) -> dict:
    """What index.json records of the adapter and the headline scale: the step rendered, and when asked
    for, the headline scale evaluate measures and which of the two came from the operating point (``best``)."""
    out = {"adapter_step": step}
    if headline is not None:
        out["lora_scale"] = headline
    best = [k for k in ("adapter_step", "lora_scale") if getattr(sp, k) == "best"]
    return {**out, **({"best": best} if best else {})}


def run(p: params.Params, paths: Sample = Sample()) -> dict:
    """The whole stage; returns the index written to ``paths.samples``/index.json."""
    sp = p.sample
    prompts = read_prompts(sp.prompts, "sample.prompts")
    # "best": the operating point the grid recorded (stages/operating_point.py)
    step, headline = snapshots.resolve_best(sp.adapter_step, sp.lora_scale, paths.operating_point)
    scales = sorted({float(s) for s in sp.lora_scales} | ({headline} if headline else set()))
    lora_dir = snapshots.resolve(step, paths.lora, paths.snapshots)  # a train.save_every snapshot
    adapter = lora_dir / LORA_FILE
    if any(s > 0 for s in scales) and not adapter.exists():
        raise SystemExit(f"no adapter at {adapter}: run the train stage first (dvc repro train)")
    full = [with_trigger(pr, p.caption.trigger) for pr in prompts]
    logger.info("%d prompts x %d seeds x scales %s at %d px, %d steps, guidance %g", len(prompts),
                len(sp.seeds), scales, sp.resolution, sp.steps, sp.guidance)
    t0 = time.perf_counter()
    device = default_device()
    p = memory.resolve(p, device)  # model.quantization: auto -> the base this card renders with
    jobs = [(pi, seed) for pi in range(len(prompts)) for seed in sp.seeds]
    pngs, base_keys = render_pngs(p, full, jobs, scales, lora_dir, device)
    index = write_samples(p, paths.samples, prompts, full, jobs, scales, pngs, base_keys, adapter,
                          chosen(sp, step, headline))
    logger.info("wrote %d images and %d grids to %s in %.1f s", len(index["images"]), len(index["grids"]),
                paths.samples, time.perf_counter() - t0)
    return index


def main() -> None:
    p = params.load()
    gpus.claim("sample")  # a free GPU before CUDA starts (stages/core/gpus.py)
    log.setup("sample")
    paths = Sample()
    index = run(p, paths)
    # the run that trained the adapter just rendered (by its hash), not whatever ran last here
    with tracking.run("sample", p, adapter_sha=index["adapter_sha256"]):
        tracking.log_artifacts([paths.samples / g["file"] for g in index["grids"]], artifact_path="samples/grids")
        tracking.log_artifacts([paths.samples / "index.json"], artifact_path="samples")


if __name__ == "__main__":
    main()
