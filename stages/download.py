"""download: a source (synthetic / wikiart / folder) -> ``data/raw/`` parquet shards.

Outputs (see stages/README.md for the contracts):

- ``data/raw/shards/part-*.parquet``: ``core.shards.IMAGE_SCHEMA``, one row per distinct image
  (id = sha256 of the stored bytes);
- ``data/raw/rejects.parquet``: every candidate that was not stored, with a reason code;
- ``data/raw/truth.parquet`` (synthetic only): the planted ground truth;
- ``data/raw/contrast/part-*.parquet`` (synthetic, ``data.synthetic.contrast`` > 0): photo-like
  renderings of the same scenes, a contrast set for style metrics (never trained on);
- ``reports/data/``: ``download.json`` (DVC metric), ``sizes.csv`` (DVC plot), ``figures/``.
"""
from __future__ import annotations

import functools
import logging
import random
import time
from pathlib import Path


from stages.core import log as logmod
from stages.core import params, preflight
from stages.core.io import atomic_dir
from stages.core.paths import Download
from stages.core.shards import write_shards, write_table
from stages.data import folder, normalize, report, synthetic, wikiart
from stages.core.pool import parallel_map
from stages.data.collect import Collector

log = logging.getLogger("stages.download")


def _ingest(candidate: dict, min_side: int, max_pixels: int, max_bytes: int | None = None) -> dict:
    return normalize.process(candidate, min_side, max_pixels, max_bytes)


def _synthetic_task(item, seed, size, min_side, max_pixels, original=None) -> dict:
    cand = synthetic.generate(item, seed, size, min_side, original)
    truth = cand.pop("_truth")
    out = normalize.process(cand, min_side, max_pixels)
    out["_truth"] = truth
    return out


def _synthetic_results(d, seed: int, workers: int):
    """Generate and normalise the planted set on all cores: originals and defects first, then the
    near-duplicates (which need their originals' bytes)."""
    n = min(d.synthetic.count, d.limit or d.synthetic.count)
    items = synthetic.plan(n, d.synthetic.near_duplicates, d.synthetic.defects, seed)
    needed = {it.of for it in items if it.of}
    first = [it for it in items if it.kind != "near_duplicate"]
    dups = [it for it in items if it.kind == "near_duplicate"]
    task = functools.partial(_synthetic_task, seed=seed, size=d.synthetic.size, min_side=d.min_side,
                             max_pixels=d.max_pixels)
    originals = {}
    for item, res in zip(first, parallel_map(task, first, workers)):
        if item.key in needed and res["ok"]:
            originals[item.key] = res["image"]
        yield res
    dups = [it for it in dups if it.of in originals]
    yield from parallel_map(_dup_task, [(it, originals[it.of], task) for it in dups], workers)


def _dup_task(args) -> dict:
    item, original, task = args
    return task(item, original=original)


def _candidates(p):
    """The chosen source's candidates (dicts with ``path``, maybe ``data``, metadata) and report extras."""
    d = p.data
    if d.source == "folder":
        cands, extra = folder.scan(d.path, d.folder, d.max_bytes)
        if d.limit and len(cands) > d.limit:
            keep = sorted(random.Random(p.seed).sample(range(len(cands)), d.limit))
            cands = [cands[i] for i in keep]
        log.info("folder %s: %d candidate files, %d other files ignored", d.path, len(cands), extra["ignored_files"])
        return cands, extra
    w = d.wikiart
    log.info("wikiart %s@%s: styles %s, artists %s, genres %s, limit %s", w.dataset, w.revision, w.styles,
             w.artists or "all", w.genres or "all", d.limit)
    return wikiart.candidates(w, p.seed, d.limit, wikiart.default_cache_root()), {"dataset": w.dataset,
                                                                                   "revision": w.revision}


def run(p: params.Params, paths: Download = Download()) -> dict:
    """The whole stage: the source's candidates, normalised, into ``paths.raw``; returns the report's
    metrics (``paths.reports``/download.json)."""
    d, t0 = p.data, time.time()
    collector = Collector(p.seed)
    if d.source == "synthetic":
        n = min(d.synthetic.count, d.limit or d.synthetic.count)
        results, extra, total = _synthetic_results(d, p.seed, d.workers), {}, n
        log.info("synthetic: %d images at %d px (seed %d)", n, d.synthetic.size, p.seed)
    else:
        cands, extra = _candidates(p)
        total = len(cands) if isinstance(cands, list) else d.limit
        results = parallel_map(functools.partial(_ingest, min_side=d.min_side, max_pixels=d.max_pixels,
                                                 max_bytes=d.max_bytes), cands, d.workers)
    bar = logmod.progress(results, total=total, desc="download", unit="img")
    with atomic_dir(paths.raw) as tmp:
        shards = write_shards(collector.rows(bar), Path(tmp) / "shards", d.shard_rows)
        if not collector.sizes:  # fail before the empty set replaces the previous data/raw
            reasons = {k: v for k, v in collector.summary()["rejects_by_reason"].items() if v}
            raise SystemExit(f"download: no image was stored from data.source={d.source}"
                             f"{' (' + str(d.path) + ')' if d.path else ''}: {collector.candidates} candidates, "
                             f"rejected {reasons or 'none'}; {paths.raw} is left as it was")
        write_table(collector.rejects_table(), Path(tmp) / "rejects.parquet")
        if d.source == "synthetic":
            write_table(collector.truth_table(), Path(tmp) / "truth.parquet")
            if d.synthetic.contrast:
                photos = map(functools.partial(_ingest, min_side=d.min_side, max_pixels=d.max_pixels),
                             synthetic.contrast(d.synthetic.contrast, p.seed, d.synthetic.size))
                write_shards((r for r in photos if r["ok"]), Path(tmp) / "contrast", d.shard_rows)
    secs = time.time() - t0
    metrics = report.write(collector, paths.reports, {"source": d.source, **extra})
    log.info("stored %d images in %d shards, rejected %d %s, in %.1f s (%.0f img/s)", metrics["stored"],
             len(shards), metrics["rejected"], {k: v for k, v in metrics["rejects_by_reason"].items() if v},
             secs, metrics["candidates"] / max(secs, 1e-9))
    return metrics


def main() -> None:
    p = params.load()
    logmod.setup("download")
    preflight.check(p)  # fail in seconds if the profile needs what this machine lacks
    run(p, Download())


if __name__ == "__main__":
    main()
