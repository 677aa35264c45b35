"""Run candidates through normalisation on all cores, and account for every one of them.

:func:`parallel_map` keeps a bounded number of tasks in flight (so a source streaming image bytes
never holds the whole dataset in memory) and returns results in input order (so the shards are
the same whatever the number of workers). :class:`Collector` turns results into stored rows,
byte-duplicates and rejects, and keeps the statistics the report needs.
"""
from __future__ import annotations

import concurrent.futures as cf
import io
import itertools
import multiprocessing as mp
import random
import unicodedata
from collections import Counter
from typing import Callable, Iterable, Iterator, Optional

import pyarrow as pa
from PIL import Image

from stages.data.normalize import REASONS

REJECTS_SCHEMA = pa.schema([("path", pa.string()), ("id", pa.string()), ("reason", pa.string()),
                            ("detail", pa.string())])
TRUTH_SCHEMA = pa.schema([("id", pa.string()), ("kind", pa.string()), ("defect", pa.string()),
                          ("dup_of", pa.string()), ("detail", pa.string())])


def parallel_map(fn: Callable, items: Iterable, workers: int, window: int = 256,
                 pool: Optional[cf.Executor] = None) -> Iterator:
    """``map(fn, items)`` over ``workers`` processes (in-process when 1), in order, bounded."""
    if workers <= 1 and pool is None:
        yield from map(fn, items)
        return
    own = pool is None
    pool = pool or cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
    try:
        it = iter(items)
        while batch := list(itertools.islice(it, window)):
            yield from pool.map(fn, batch, chunksize=max(1, len(batch) // (4 * workers)))
    finally:
        if own:
            pool.shutdown(cancel_futures=True)


class Collector:
    """Consumes ``normalize.process`` results; yields the rows to store (first of equal bytes)."""

    def __init__(self, seed: int, sample_size: int = 48, thumb: int = 128):
        self.rejects: list[dict] = []
        self.first_path: dict[str, str] = {}
        self.truth: list[dict] = []
        self.sizes: list[tuple[int, int]] = []
        self.counts = {k: Counter() for k in ("source", "artist", "style", "genre", "format")}
        self.reencoded = Counter()
        self.candidates = 0
        self._rng = random.Random(seed)
        self._sample_size, self._thumb = sample_size, thumb
        self.sample: list[tuple[Image.Image, str]] = []

    def rows(self, results: Iterable[dict]) -> Iterator[dict]:
        for r in results:
            self.candidates += 1
            truth = r.pop("_truth", None)
            if not r["ok"]:
                self.rejects.append({k: r.get(k) for k in REJECTS_SCHEMA.names})
                continue
            if r["id"] in self.first_path:
                self.rejects.append({"path": r["path"], "id": r["id"], "reason": "duplicate_bytes",
                                     "detail": f"same bytes as {self.first_path[r['id']]}"})
                continue
            self.first_path[r["id"]] = r["path"]
            self._account(r)
            if truth is not None:
                self.truth.append({**truth, "id": r["id"]})
            yield r

    def _account(self, r: dict) -> None:
        n = len(self.sizes)
        self.sizes.append((r["width"], r["height"]))
        for k, c in self.counts.items():
            c[r.get(k) or "unknown"] += 1
        if r.get("reencoded"):
            self.reencoded[r.get("note") or "re-encoded"] += 1
        # reservoir sample for the contact sheet (seeded: the same images every run)
        slot = n if n < self._sample_size else self._rng.randrange(n + 1)
        if slot < self._sample_size:
            img = Image.open(io.BytesIO(r["image"])).convert("RGB")
            img.thumbnail((self._thumb, self._thumb))
            label = r.get("artist") or r.get("title") or r["path"].rsplit("/", 1)[-1]
            label = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode()  # bitmap font
            if slot < len(self.sample):
                self.sample[slot] = (img, label)
            else:
                self.sample.append((img, label))

    def rejects_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rejects, schema=REJECTS_SCHEMA)

    def truth_table(self) -> pa.Table:
        """Planted ground truth with ``of`` keys resolved to the originals' content ids."""
        by_key = {t["key"]: t["id"] for t in self.truth}
        rows = [{"id": t["id"], "kind": t["kind"], "defect": t["defect"], "dup_of": by_key.get(t["of"]),
                 "detail": t["detail"]} for t in self.truth]
        return pa.Table.from_pylist(rows, schema=TRUTH_SCHEMA)

    def summary(self) -> dict:
        by_reason = Counter(r["reason"] for r in self.rejects)
        return {
            "candidates": self.candidates,
            "stored": len(self.sizes),
            "rejected": len(self.rejects),
            "rejects_by_reason": {k: by_reason.get(k, 0) for k in REASONS},
            "reencoded_png": sum(self.reencoded.values()),
            "kept_original_bytes": len(self.sizes) - sum(self.reencoded.values()),
            "formats": dict(sorted(self.counts["format"].items())),
            "sources": dict(sorted(self.counts["source"].items())),
            "artists": len([a for a in self.counts["artist"] if a != "unknown"]),
        }
