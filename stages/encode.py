"""encode: curated images + captions -> cached VAE latents and text embeddings (``data/cache/``).

Training then needs only the transformer: the text encoders (T5 ~9 GB for FLUX.1-dev) and the
VAE are loaded here, used once, and freed. One model is on the device at a time: pass 1 runs
every caption through CLIP + T5 (nf4 T5 on 8 GiB cards, ``model.vram_gb``; the cache key records
it, since its embeddings differ slightly), frees them, and pass 2 runs the VAE over the images. The cache layout is documented in
``stages/models/cache.py``. It depends only on the curated data, the base model and the
resolution/bucket/flip/text-length params, never on LoRA or optimizer params, so
``dvc exp run -S lora.rank=32`` reuses it (DVC does not rerun this stage; run by hand with the
same inputs, the stage finds ``index.json`` with the same key and does nothing).
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from stages.core import gpus, log as logs, params, tensorfiles
from stages.core.device import default_device, default_dtype
from stages.core.images import decode
from stages.core.io import atomic_dir, read_json, write_json
from stages.core.paths import Encode
from stages.core.shards import iter_rows
from stages.models import cache as cache_lib
from stages.models import render

log = logging.getLogger("stages.encode")
VERSION = 1  # bump when the cache format changes
BATCH = 8
SHARD_ROWS = 256


def cache_key(p, data_hash: str, text_quantization: str = "none") -> str:
    t = p.train
    blob = json.dumps({"v": VERSION, "seed": p.seed, "base": p.model.base, "revision": p.model.revision,
                       **({"t5": text_quantization} if text_quantization != "none" else {}),
                       "resolution": t.resolution, "buckets": t.buckets, "flip": t.flip,
                       "max_sequence_length": t.max_sequence_length, "data": data_hash}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_captions(curated: Path, split: str) -> list[dict]:
    folder = curated / split
    if not folder.exists():
        return []
    return list(iter_rows(folder, columns=["id", "caption", "repeats"]))


def data_hash(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["id"]):
        rep = r.get("repeats") or 1  # kohya repeats change what is trained on (1 = none: the old hash)
        h.update((f"{r['id']}\t{r['caption']}" + (f"\t{rep}" if rep != 1 else "") + "\n").encode())
    return h.hexdigest()[:16]


def to_tensor(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize to cover ``size`` (w, h), centre-crop, scale to [-1, 1], CHW."""
    w, h = size
    scale = max(w / img.width, h / img.height)
    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.LANCZOS)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    arr = np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


class TextEncoder:
    """CLIP + T5 (T5 quantized on small cards, stages.models.memory), alone on the device."""

    def __init__(self, p, device, dtype, plan):
        from stages.models import flux

        self.pipe = flux.load_text_encoders(p.model, device=device, dtype=dtype,
                                            text_quantization=plan.text_encoder_quantization)
        self.seq, self.batch = p.train.max_sequence_length, plan.text_batch

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return render.encode_texts(self.pipe, prompts, self.seq, self.batch)


class ImageEncoder:
    """The VAE alone on the device: images -> latents, shift and scale applied."""

    def __init__(self, p, device, dtype):
        from stages.models import flux

        self.vae = flux.load_vae(p.model, device=device, dtype=dtype)
        self.device, self.dtype = device, dtype
        self.gen = torch.Generator(device).manual_seed(p.seed)
        self.shift, self.scale = self.vae.config.shift_factor or 0.0, self.vae.config.scaling_factor

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return ((dist.sample(generator=self.gen) - self.shift) * self.scale).cpu()




def load_pixels(rows: list[dict], size, rejects: list[dict], shards: Path) -> list[dict]:
    """Decode the rows' images (read from ``shards`` by id) into tensors of ``size``."""
    images = {r["id"]: r["image"] for r in iter_rows(shards, columns=["id", "image"],
                                                      ids={r["id"] for r in rows})}
    out = []
    for r in rows:
        try:
            out.append({**r, "pixels": to_tensor(decode(images[r["id"]]), size)})
        except Exception as err:  # a broken image is recorded, never a crash
            rejects.append({"id": r["id"], "reason": f"undecodable: {type(err).__name__}: {err}"})
    return out


def encode_images(enc: ImageEncoder, rows: list[dict], size, flip: bool) -> dict[str, torch.Tensor]:
    out = defaultdict(list)
    # the VAE encoder's activations grow with the pixels: 8 images at 64-256 px, 1 at 1024 px
    batch = max(1, min(BATCH, (1024 * 1024) // (size[0] * size[1])))
    for i in range(0, len(rows), batch):
        pix = torch.stack([r["pixels"] for r in rows[i:i + batch]])
        out["latents"].append(enc(pix))
        if flip:
            out["latents_flip"].append(enc(pix.flip(-1)))
    return {k: torch.cat(v).contiguous() for k, v in out.items()}


def plan_shards(by_bucket: dict) -> list[tuple[tuple[int, int], int, list[dict]]]:
    """(bucket, shard number, rows) for every shard the cache will hold."""
    return [((w, h), k // SHARD_ROWS, items[k:k + SHARD_ROWS])
            for (w, h), items in sorted(by_bucket.items()) for k in range(0, len(items), SHARD_ROWS)]


def shard_name(size, k: int) -> str:
    return f"bucket-{size[0]}x{size[1]}-{k:03d}.safetensors"


def assign_buckets(shards: Path, sizes) -> tuple[dict, list[dict]]:
    """Rows (id, caption, size) per bucket from the recorded sizes, without decoding an image; the
    rows without a caption or a size as rejects."""
    by_bucket, rejects = defaultdict(list), []
    for row in iter_rows(shards, columns=["id", "caption", "width", "height", "repeats"]):
        if not (row["caption"] or "").strip():
            rejects.append({"id": row["id"], "reason": "empty_caption"})
        elif not row["width"] or not row["height"]:
            rejects.append({"id": row["id"], "reason": "unknown_size"})
        else:
            by_bucket[cache_lib.nearest_bucket(row["width"], row["height"], sizes)].append(row)
    return by_bucket, rejects


def encode_texts(text: TextEncoder, shards: list, tmp: Path) -> None:
    """Pass 1: every caption through the text encoders (a temp file per shard) and the empty prompt."""
    for size, k, part in logs.progress(shards, desc="encode captions", unit="shard"):
        e, pooled = text([r["caption"] for r in part])
        save_file({"prompt_embeds": e, "pooled": pooled}, tmp / f"text-{shard_name(size, k)}")
    e, pooled = text([""])
    tensorfiles.save({"prompt_embeds": e[0], "pooled": pooled[0]}, tmp / "empty.safetensors")


def encode_latents(images: ImageEncoder, shards: list, train: Path, flip: bool, rejects: list[dict],
                   tmp: Path) -> dict:
    """Pass 2: the VAE alone; each shard = its latents + the rows' text embeddings from pass 1.
    Returns {bucket size: [(file, rows)]}."""
    files = defaultdict(list)
    for size, k, part in logs.progress(shards, desc="encode images", unit="shard"):
        texts = load_file(tmp / f"text-{shard_name(size, k)}")
        (tmp / f"text-{shard_name(size, k)}").unlink()
        decoded = load_pixels(part, size, rejects, train)
        if not decoded:
            continue
        ok = {d["id"] for d in decoded}
        keep = torch.tensor([i for i, r in enumerate(part) if r["id"] in ok])
        tensors = encode_images(images, decoded, size, flip)
        tensors.update({n: t[keep].contiguous() for n, t in texts.items()})
        # one metadata key, one JSON object (stages/core/tensorfiles.py)
        tensorfiles.save(tensors, tmp / shard_name(size, k), {"rows": json.dumps({
            "ids": [r["id"] for r in decoded], "captions": [r["caption"] for r in decoded],
            "repeats": [r.get("repeats") or 1 for r in decoded]})})
        files[size].append((shard_name(size, k), len(decoded)))
    return files


def run(p: params.Params, paths: Encode = Encode()) -> dict:
    """The whole stage; returns the cache's index (``paths.cache``/index.json). With the same key
    as the cache already there, it does nothing."""
    rows = read_captions(paths.curated, "train")
    if not rows:
        raise SystemExit(f"{paths.curated}/train holds no images: run the caption stage first")
    from stages.models import flux, memory

    device = default_device()
    dtype = default_dtype(device)
    plan = memory.plan(p.model, device)
    dhash = data_hash(rows)
    key = cache_key(p, dhash, plan.text_encoder_quantization)
    index_file = paths.cache / "index.json"
    if index_file.exists() and read_json(index_file).get("key") == key:
        log.info("cache %s is up to date (key %s): nothing to do", paths.cache, key)
        return read_json(index_file)
    log.info("memory plan: %s", plan.describe())
    flux.preflight("encode", p, device, plan)
    by_bucket, rejects = assign_buckets(paths.curated / "train", cache_lib.buckets(p.train.resolution, p.train.buckets))
    index = {"key": key, "version": VERSION, "base": p.model.base, "revision": p.model.revision,
             "resolution": p.train.resolution, "flip": p.train.flip, "data_hash": dhash,
             "max_sequence_length": p.train.max_sequence_length, "dtype": str(dtype).replace("torch.", ""),
             "count": 0, "rejects": rejects, "buckets": []}
    shards = plan_shards(by_bucket)
    with atomic_dir(paths.cache) as tmp:
        text = TextEncoder(p, device, dtype, plan)  # T5-XXL is 8.9 GiB: freed before the VAE loads
        encode_texts(text, shards, tmp)
        del text
        render.free_memory()
        images = ImageEncoder(p, device, dtype)
        files = encode_latents(images, shards, paths.curated / "train", p.train.flip, rejects, tmp)
        del images
        render.free_memory()
        for (w, h), entries in sorted(files.items()):
            count = sum(n for _, n in entries)
            index["buckets"].append({"width": w, "height": h, "count": count, "files": [f for f, _ in entries]})
            index["count"] += count
            log.info("bucket %dx%d: %d images", w, h, count)
        for r in rejects:
            log.warning("skipped %s: %s", r["id"], r["reason"])
        write_json(tmp / "index.json", index)
    log.info("cached %d images in %d buckets (%d rejected) -> %s", index["count"], len(index["buckets"]),
             len(rejects), paths.cache)
    return index


def main() -> None:
    p = params.load()
    gpus.claim("encode")  # a free GPU before CUDA starts (stages/core/gpus.py)
    logs.setup("encode")
    run(p, Encode())


if __name__ == "__main__":
    main()
