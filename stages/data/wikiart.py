"""The ``wikiart`` source: ``huggan/wikiart`` (or any dataset in its schema) through ``datasets``.

The schema: parquet shards ``data/<split>-NNNNN-of-NNNNN.parquet`` with columns ``image``
(``datasets.Image``) and ``artist``, ``genre``, ``style`` (``datasets.ClassLabel``). Label ids are
resolved from the dataset's own features (``ClassLabel.str2int``), never hard-coded.

``data.wikiart.dataset`` is a hub id (pinned by ``revision``) or a local folder holding shards in
the same layout; both go through the same ``datasets.load_dataset(location, data_files=[shard],
streaming=True)`` call, shard by shard:

- **sampling**: the shard list is shuffled with ``seed``; shards are read in that order until
  ``data.limit`` matching images are collected, so a small limit reads a few of the 72 shards;
  within a shard, matching rows are taken in a seeded order. Same seed -> same ids, same order.
- **resume**: each finished shard's matching rows are checkpointed under
  ``.cache/download/wikiart/<key>/`` (key = dataset, revision, split, filters); a rerun after an
  interruption reads finished shards from there and streams only the rest.
- **offline**: a hub id without network fails at once with a message suggesting
  ``data.source=folder`` or ``synthetic``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from stages.core.shards import write_table

log = logging.getLogger(__name__)

CACHE_ROOT = Path(".cache/download/wikiart")
OFFLINE_HINT = ("use data.source=folder (with data.path) for local images, or data.source=synthetic for the "
                "embedded generator")


class WikiartUnavailable(SystemExit):
    """The dataset cannot be reached or read: a clean exit with a message, not a traceback."""


def _pretty(label: Optional[str]) -> Optional[str]:
    """``claude-monet`` -> ``Claude Monet``; ``Post_Impressionism`` -> ``Post Impressionism``;
    ``still_life`` -> ``still life``; unknown labels -> None."""
    if label is None or label.lower().startswith("unknown"):
        return None
    if "-" in label and label == label.lower():
        return " ".join(w.capitalize() for w in label.split("-"))
    return label.replace("_", " ")


def is_local(dataset: str) -> bool:
    return Path(dataset).expanduser().exists()


def list_shards(dataset: str, revision: Optional[str], split: str) -> list[str]:
    """Shard paths relative to the dataset root, sorted."""
    if is_local(dataset):
        root = Path(dataset).expanduser()
        files = sorted(str(p.relative_to(root)) for p in root.rglob(f"{split}-*.parquet"))
    else:
        from huggingface_hub import HfApi

        from stages.core import hub

        if hub.offline():
            raise WikiartUnavailable(f"data.wikiart.dataset = {dataset!r} is a Hugging Face Hub id but the Hub is "
                                     f"offline (HF_HUB_OFFLINE is set): {OFFLINE_HINT}")
        try:
            names = HfApi().list_repo_files(dataset, repo_type="dataset", revision=revision)
        except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: all end the same way
            raise WikiartUnavailable(f"cannot list {dataset!r} at revision {revision!r} on the Hugging Face Hub "
                                     f"({type(exc).__name__}: {str(exc)[:200]}): offline or missing? "
                                     f"{OFFLINE_HINT}") from None
        files = sorted(n for n in names if n.endswith(".parquet") and Path(n).name.startswith(f"{split}-"))
    if not files:
        raise WikiartUnavailable(f"no '{split}-*.parquet' shards in {dataset!r}: {OFFLINE_HINT}")
    return files


def open_shard(dataset: str, shard: str, revision: Optional[str], split: str):
    """One shard as a streaming ``datasets.IterableDataset`` with undecoded images (bytes)."""
    import datasets

    location = str(Path(dataset).expanduser()) if is_local(dataset) else dataset
    try:
        ds = datasets.load_dataset(location, data_files={split: [shard]}, split=split, revision=revision,
                                   streaming=True)
    except Exception as exc:  # noqa: BLE001
        raise WikiartUnavailable(f"cannot open {shard} of {dataset!r} ({type(exc).__name__}: {str(exc)[:200]}): "
                                 f"{OFFLINE_HINT}") from None
    return ds.cast_column("image", datasets.Image(decode=False))


def label_ids(features, column: str, names: list[str]) -> Optional[set[int]]:
    """Resolve label names through the ClassLabel feature; unknown names are an error."""
    if not names:
        return None
    label = features[column]
    missing = [n for n in names if n not in label.names]
    if missing:
        raise SystemExit(f"data.wikiart.{column}s: {missing} not in the dataset's {column} labels "
                         f"(e.g. {label.names[:8]})")
    return {label.str2int(n) for n in names}


def _shard_rows(ds, filters: dict[str, Optional[set[int]]], shard: str, provenance: str) -> list[dict]:
    feats = ds.features
    rows = []
    for i, ex in enumerate(ds):
        if any(ids is not None and ex[col] not in ids for col, ids in filters.items()):
            continue
        img = ex["image"] or {}
        rows.append({"path": f"{shard}#{i}", "data": img.get("bytes"),
                     "artist": _pretty(feats["artist"].int2str(ex["artist"])),
                     "style": _pretty(feats["style"].int2str(ex["style"])),
                     "genre": _pretty(feats["genre"].int2str(ex["genre"])),
                     "source": "wikiart", "provenance": f"{provenance}:{shard}#{i}"})
    return rows


CHECKPOINT_SCHEMA = pa.schema([("path", pa.string()), ("data", pa.binary()), ("artist", pa.string()),
                               ("style", pa.string()), ("genre", pa.string()), ("source", pa.string()),
                               ("provenance", pa.string())])


def candidates(cfg, seed: int, limit: Optional[int], cache_root: Path = CACHE_ROOT) -> Iterator[dict]:
    """Matching rows as download candidates (``path``, ``data`` bytes, metadata), in the seeded order,
    at most ``limit``. ``cfg`` is ``params.data.wikiart``."""
    local = is_local(cfg.dataset)
    revision = None if local else cfg.revision  # a local folder has no revisions
    shards = list_shards(cfg.dataset, revision, cfg.split)
    random.Random(seed).shuffle(shards)
    where = str(Path(cfg.dataset).resolve()) if local else cfg.dataset
    key = json.dumps([where, revision, cfg.split, sorted(cfg.styles), sorted(cfg.artists), sorted(cfg.genres)])
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache = Path(cache_root) / key
    provenance = cfg.dataset if local else f"{cfg.dataset}@{revision or 'main'}"
    filters = None
    taken = 0
    for shard in shards:
        ckpt = cache / (shard.replace("/", "__") + ".parquet")
        if ckpt.exists():
            rows = pq.read_table(ckpt).to_pylist()
            log.info("wikiart: %s from checkpoint (%d matching rows)", shard, len(rows))
        else:
            ds = open_shard(cfg.dataset, shard, revision, cfg.split)
            if filters is None:
                filters = {c: label_ids(ds.features, c, getattr(cfg, c + "s")) for c in ("style", "artist", "genre")}
            rows = _shard_rows(ds, filters, shard, provenance)
            write_table(pa.Table.from_pylist(rows, schema=CHECKPOINT_SCHEMA), ckpt)
            log.info("wikiart: %s streamed (%d matching rows), checkpointed", shard, len(rows))
        random.Random(f"{seed}:{shard}").shuffle(rows)
        for row in rows:
            if limit is not None and taken >= limit:
                return
            taken += 1
            yield row
        if limit is not None and taken >= limit:
            return


def default_cache_root() -> Path:
    return Path(os.environ.get("FLUXIMP_DOWNLOAD_CACHE", CACHE_ROOT))
