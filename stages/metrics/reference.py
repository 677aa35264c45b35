"""The held-out paintings as a reference, and the models that measure samples against them.

Shared by the evaluate stage and the operating-point grid (stages/operating_point.py): the held-out
set is decoded once (:func:`load_holdout`), its CLIP embeddings come from the filter stage's cache when
they match (:func:`holdout_clip_embeddings`), and :class:`Embedders` holds CLIP, the aesthetic head and
CSD when ``eval.csd_weights`` is set (the style embeddings: CSD's, else CLIP's). :func:`measure_reference`
measures the held-out set once for both stages and every later experiment (stages.metrics.refcache).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from stages.core import images as core_images
from stages.core import params, shards
from stages.metrics import traits

logger = logging.getLogger("stages.evaluate")


HOLDOUT_SIDE = 512  # held-out paintings are kept in memory at most this large (CLIP sees 224 px)


def load_holdout(folder: Path) -> tuple[list[str], list[Image.Image]]:
    """Decode the held-out paintings, each shrunk to HOLDOUT_SIDE on its long side (WikiArt scans
    run to several megapixels; a thousand of them at full size would not fit in memory)."""
    ids, imgs = [], []
    for row in shards.iter_rows(folder, columns=["id", "image"]):
        try:
            img = core_images.decode(row["image"])
            img.thumbnail((HOLDOUT_SIDE, HOLDOUT_SIDE), Image.LANCZOS)
            imgs.append(img)
            ids.append(row["id"])
        except Exception as err:  # a broken held-out image is skipped, loudly
            logger.warning("held-out image %s unreadable (%s): skipped", row["id"], err)
    if len(imgs) < 2:
        raise SystemExit(f"{folder}: {len(imgs)} held-out images; need at least 2 (raise data.holdout)")
    return ids, imgs


def holdout_clip_embeddings(clip, ids, imgs, cache: Path) -> np.ndarray:
    """Reuse the filter stage's cached embeddings (``cache``) when they come from the same CLIP model."""
    from stages.models.clip import load_embeddings

    if cache.exists():
        cached_ids, emb, model = load_embeddings(cache)
        row = {i: k for k, i in enumerate(cached_ids)}
        if model == clip.name and all(i in row for i in ids):
            logger.info("held-out CLIP embeddings from %s", cache)
            return emb[[row[i] for i in ids]]
        logger.info("embedding cache is for %r / misses ids: re-embedding the held-out set", model)
    return clip.embed_images(imgs)


@dataclass
class Embedders:
    """The models evaluate measures with: CLIP, the aesthetic head on CLIP, CSD when configured."""
    clip: object
    head: object
    csd: Optional[object] = None

    @classmethod
    def load(cls, p: params.Params) -> "Embedders":
        from stages.models import aesthetic
        from stages.models.clip import load_clip

        clip = load_clip(p.clip, seed=p.seed)
        head = aesthetic.load_aesthetic_head(p.filter.aesthetic.head, clip.dim, seed=p.seed, device=clip.device)
        csd = None
        if p.eval.csd_weights:
            from stages.metrics.csd import load_csd
            csd = load_csd(p.eval.csd_weights, p.eval.csd_model, device=clip.device)
        return cls(clip, head, csd)

    def style(self, imgs, clip_embeddings: np.ndarray) -> np.ndarray:
        """Style embeddings: CSD's when loaded, else the CLIP image embeddings."""
        return self.csd.embed_images(imgs) if self.csd else clip_embeddings

    def note(self) -> str:
        return f"style embeddings: {self.csd.name}" if self.csd else \
            f"style embeddings: {self.clip.name} (CLIP image embeddings; set eval.csd_weights for CSD)"


@dataclass
class Reference:
    """The held-out paintings, measured once: what every sample set is compared against."""
    ids: list[str]
    clip: np.ndarray
    style: np.ndarray
    traits: dict = field(default_factory=dict)  # per-image trait table (traits.trait_table)


def measure_reference(p: params.Params, holdout: Path, embeddings: Path, models: Embedders,
                      with_traits: bool = True) -> Reference:
    """The held-out paintings' ids, CLIP and style embeddings and traits: from the stage cache
    (stages.metrics.refcache; ``eval.reference_cache``) when it holds them, else measured and stored.
    Evaluate and the operating-point grid (which runs first in an experiment) read the same entry.
    ``with_traits=False`` (the grid) skips the traits when nothing is stored (the cache off)."""
    from stages.core import stagecache
    from stages.metrics import refcache

    use_cache = p.eval.reference_cache
    if use_cache:
        fields = refcache.fields(p, holdout, embeddings, models.clip, HOLDOUT_SIDE)
        key = stagecache.digest(fields)
        payload = stagecache.get(refcache.KIND, key)
        if payload is not None:
            logger.info("held-out measurements from the stage cache (%s/%s)", refcache.KIND, key[:16])
            return Reference(*refcache.unpack(payload))
    ids, imgs = load_holdout(holdout)
    hold_clip = holdout_clip_embeddings(models.clip, ids, imgs, embeddings)
    table = traits.trait_table(imgs, p.eval.trait_size) if with_traits or use_cache else {}
    ref = Reference(ids, hold_clip, models.style(imgs, hold_clip), table)
    if use_cache:
        stagecache.put(refcache.KIND, key, fields, refcache.pack(ref.ids, ref.clip, ref.style, ref.traits))
    return ref
