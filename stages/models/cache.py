"""The encode cache (``data/cache/``): what the encode stage writes and the train stage reads.

Layout::

    data/cache/index.json                 key, inputs, buckets, files, data hash
    data/cache/bucket-<W>x<H>-<k>.safetensors
        latents        (N, C, H/8, W/8)   VAE latents, shift and scale applied
        latents_flip   (N, C, H/8, W/8)   the horizontally flipped image's latents (train.flip)
        prompt_embeds  (N, L, D)          T5 last hidden states
        pooled         (N, P)             CLIP pooled output
        metadata: one key, rows: a JSON object of lists ids, captions, repeats (kohya N_name folders)
    data/cache/empty.safetensors          prompt_embeds/pooled of "" (caption dropout)

Flip augmentation is cached (both latents are encoded once) rather than applied at train
time: flipping latents is not the same as encoding a flipped image, and the extra encode is
cheaper than keeping the VAE around while training.

Batches are a pure function of (seed, step): every epoch is a seeded shuffle of bucket-pure
batches, so a resumed run sees exactly the batches an uninterrupted one would. An image with
``repeats`` N (kohya's ``N_name`` folders, stages/data/folder.py) appears N times per epoch.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file

ASPECTS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)  # width / height


def buckets(resolution: int, enabled: bool = True) -> list[tuple[int, int]]:
    """(width, height) pairs with about resolution² pixels, sides divisible by 16."""
    if not enabled:
        side = max(16, round(resolution / 16) * 16)
        return [(side, side)]
    out = []
    for aspect in ASPECTS:
        w = max(16, round(resolution * math.sqrt(aspect) / 16) * 16)
        h = max(16, round(resolution / math.sqrt(aspect) / 16) * 16)
        if (w, h) not in out:
            out.append((w, h))
    return out


def nearest_bucket(width: int, height: int, choices: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(choices, key=lambda wh: abs(math.log(wh[0] / wh[1]) - ratio))


@dataclass
class Batch:
    latents: torch.Tensor        # (B, C, h, w)
    prompt_embeds: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor         # (B, P)
    ids: list[str]

    def to(self, device, dtype=None) -> "Batch":
        return Batch(self.latents.to(device, dtype), self.prompt_embeds.to(device, dtype),
                     self.pooled.to(device, dtype), self.ids)


class Cache:
    """Read side of the encode cache: the tensors of every bucket, kept in memory."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        index_file = self.folder / "index.json"
        if not index_file.exists():
            raise FileNotFoundError(f"{index_file} missing: run the encode stage first")
        self.index = json.loads(index_file.read_text())
        self.buckets: list[dict] = []
        for b in self.index["buckets"]:
            tensors: dict[str, list] = {}
            ids: list[str] = []
            repeats: list[int] = []
            for name in b["files"]:
                path = self.folder / name
                with safe_open(path, "pt") as fh:
                    meta = fh.metadata()
                # one key "rows" (a JSON object); caches written before that have one key per list
                rows = json.loads(meta["rows"]) if "rows" in meta else {k: json.loads(v) for k, v in meta.items()}
                ids += rows["ids"]
                repeats += rows.get("repeats") or [1] * len(rows["ids"])
                for k, v in load_file(path).items():
                    tensors.setdefault(k, []).append(v)
            self.buckets.append({"size": (b["width"], b["height"]), "ids": ids, "repeats": repeats,
                                 **{k: torch.cat(v) for k, v in tensors.items()}})
        empty = load_file(self.folder / "empty.safetensors")
        self.empty = (empty["prompt_embeds"], empty["pooled"])

    def __len__(self) -> int:
        return sum(len(b["ids"]) for b in self.buckets)

    def epoch_plan(self, seed: int, epoch: int, batch_size: int, world: int = 1) -> list[tuple[int, list[int]]]:
        """Bucket-pure batches of one epoch, (bucket, rows), shuffled by (seed, epoch);
        trimmed to a multiple of ``world`` so every process gets the same number."""
        rng = random.Random(f"{seed}/{epoch}")
        plan = []
        for b, bucket in enumerate(self.buckets):
            rows = [r for r, n in enumerate(bucket.get("repeats") or [1] * len(bucket["ids"])) for _ in range(n)]
            rng.shuffle(rows)
            plan += [(b, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
        rng.shuffle(plan)
        keep = len(plan) - len(plan) % world
        if keep == 0:
            raise ValueError(f"the cache has {len(plan)} batches per epoch, fewer than {world} processes")
        return plan[:keep]

    def batch(self, seed: int, index: int, batch_size: int, rank: int = 0, world: int = 1,
              flip: bool = False, generator: Optional[torch.Generator] = None) -> Batch:
        """The ``index``-th batch (a global micro-step counter) for process ``rank``."""
        per_epoch = len(self.epoch_plan(seed, 0, batch_size, world)) // world
        epoch, pos = divmod(index, per_epoch)
        b, rows = self.epoch_plan(seed, epoch, batch_size, world)[pos * world + rank]
        bucket = self.buckets[b]
        rows_t = torch.tensor(rows)
        latents = bucket["latents"][rows_t]
        if flip and "latents_flip" in bucket:
            use = torch.rand(len(rows), generator=generator) < 0.5
            latents = torch.where(use[:, None, None, None], bucket["latents_flip"][rows_t], latents)
        return Batch(latents, bucket["prompt_embeds"][rows_t], bucket["pooled"][rows_t],
                     [bucket["ids"][r] for r in rows])
