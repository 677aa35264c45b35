"""Account for every candidate that went through normalisation (on all cores, with
:func:`stages.core.pool.parallel_map`): :class:`Collector` turns results into stored rows,
byte-duplicates and rejects, and keeps the statistics the report needs.
"""
from __future__ import annotations

import random
import unicodedata
from collections import Counter
from typing import Iterable, Iterator

import pyarrow as pa
from PIL import Image

from stages.core import images
from stages.data.normalize import REASONS

REJECTS_SCHEMA = pa.schema([("path", pa.string()), ("id", pa.string()), ("reason", pa.string()),
                            ("detail", pa.string())])
TRUTH_SCHEMA = pa.schema([("id", pa.string()), ("kind", pa.string()), ("defect", pa.string()),
                          ("dup_of", pa.string()), ("detail", pa.string())])


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
            img = images.decode(r["image"])
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
