"""The held-out paintings measured once: adapter-independent work, kept between experiments.

Every experiment's operating-point grid and evaluate compare its images with the same held-out
paintings: decoded, embedded with CLIP (or the filter stage's embeddings reused), with CSD when
configured (the style embeddings, which are also KID's and FID's reference features), their traits
measured (stages.metrics.reference.measure_reference).
None of it depends on the adapter, so it is stored in the content-addressed stage cache
(stages.core.stagecache, kind ``eval-reference``) as one safetensors payload (ids, CLIP and style
embeddings, the per-image trait table), under a key of everything those numbers are a function of
(:func:`fields`): the held-out shards' content (sha256 of each file), the filter stage's embedding
file (sha256), the CLIP params and seed (the tiny model's weights are seeded) and its weights file
when local, the CSD weights and architecture, ``eval.trait_size``, the decode size, the source of
the code that computes them, the device class and the torch / open_clip versions. A warm cache
gives the same arrays bit for bit, so the grid's and evaluate's outputs are the same bytes. ``eval.reference_cache:
false`` measures every time; delete ``<stagecache.root()>/eval-reference`` to clear it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from stages.core import stagecache
from stages.core.io import file_digest

KIND = "eval-reference"
VERSION = 1
# the code whose output is stored (any edit there measures again)
CODE = ("stages/metrics/reference.py", "stages/core/images.py", "stages/models/clip.py", "stages/metrics/csd.py",
        "stages/metrics/traits.py", "stages/metrics/texture.py", "stages/metrics/texture_weights.py",
        "stages/metrics/refcache.py")


def _local_identity(value: Optional[str]) -> Optional[str]:
    """A weights file named in the params: its identity (stagecache.file_identity), else None."""
    return stagecache.file_identity(Path(value).expanduser()) if value and Path(value).expanduser().is_file() else None


def fields(p, holdout: Path, embeddings: Path, clip, side: int) -> dict:
    """The key fields of the held-out measurements (``clip``: the loaded CLIP model)."""
    import open_clip

    return {"version": VERSION,
            "holdout": {str(f.relative_to(holdout)): file_digest(f) for f in sorted(holdout.rglob("*")) if f.is_file()},
            "filter_embeddings": file_digest(embeddings) if embeddings.exists() else None,
            "clip": {**p.clip.model_dump(), "label": clip.name, "seed": p.seed,
                     "weights": _local_identity(p.clip.pretrained)},
            "csd": {"weights": _local_identity(p.eval.csd_weights), "model": p.eval.csd_model}
            if p.eval.csd_weights else None,
            "trait_size": p.eval.trait_size, "side": side,
            "code": stagecache.code_identity(*CODE),
            "device": stagecache.device_class(clip.device),
            "torch": torch.__version__, "open_clip": open_clip.__version__}


def pack(ids: list[str], clip_emb: np.ndarray, style: np.ndarray, traits: dict[str, np.ndarray]) -> bytes:
    """One safetensors payload; ids and the trait names (in order) in its metadata."""
    from safetensors.numpy import save

    tensors = {"clip": np.ascontiguousarray(clip_emb), "style": np.ascontiguousarray(style),
               **{f"trait.{k}": np.ascontiguousarray(v) for k, v in traits.items()}}
    return save(tensors, metadata={"meta": json.dumps({"ids": ids, "traits": list(traits)})})


def unpack(payload: bytes) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(ids, CLIP embeddings, style embeddings, trait table) from :func:`pack`'s bytes."""
    from safetensors.numpy import load

    header = json.loads(payload[8:8 + int.from_bytes(payload[:8], "little")])
    meta = json.loads(header["__metadata__"]["meta"])
    t = load(payload)
    return meta["ids"], t["clip"], t["style"], {k: t[f"trait.{k}"] for k in meta["traits"]}
