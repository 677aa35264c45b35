"""dedupe: one image per group of (near-)duplicates, every decision recorded.

Reads ``data/raw/shards``; writes ``data/interim/dedupe.parquet`` (one row per raw id: ``id``,
``phash``, ``dhash``, ``phash_fold``, ``dhash_fold``, ``phash_band_fold``, ``dhash_band_fold``
(hex, see ``hashing.VIEWS``), ``width``, ``height``, ``bytes_per_pixel`` (informational), ``quant_step``
(``hashing.quant_step``), ``cluster_id`` (the id of the cluster's keeper), ``cluster_size``,
``phash_to_keeper`` (the smallest pHash distance over the views), ``match_to_keeper``
(detail similarity to the keeper), ``kept``, ``reason``, ``keep_reason``) and ``reports/dedupe/``
(``summary.json``: counts, pairs left after each step, the cluster-size histogram;
``cluster_sizes.csv``; ``largest_clusters.png``).

- Exact duplicates: rows with the same content id (sha256 of the bytes); the first is kept.
- Near duplicates: candidate pairs from :data:`SEARCHES`, each a multi-index search within
  ``dedupe.threshold`` bits: pHash of the images, pHash of their folds (flipped copies), dHash of
  the folds of their central 2:1 bands (copies cropped to another aspect). With
  ``dedupe.second_vote`` a candidate also needs the other hash of the same view within
  ``dedupe.dhash_threshold``; with ``dedupe.verify`` it must keep the same fine detail
  (``verify.match`` >= ``dedupe.verify_min``): pHash alone merges different paintings of one
  composition (a series). Pairs are linked transitively.
- Keep rule, per cluster (:data:`KEEP_RULE`; the first criterion that separates the keeper from
  the runner-up is recorded in ``keep_reason`` on every row of the cluster):
  1. the most pixels: the original over a downscale or a crop;
  2. orientation: the member that most other members match unmirrored (a flipped copy is the odd
     one out; two members, one mirrored, tie);
  3. colour consensus: the smallest mean colour gap to the other members, to 0.01 (a colour-jittered
     copy departs from the colours its source shares with every other copy; two members tie);
  4. the finer JPEG quantisation (``quant_step``; 1 = lossless): the less compressed encoding;
  5. the smallest id.
  Bytes per pixel is no criterion (a re-encode at a higher quality has more bytes and no more
  picture), and ``quant_step`` comes late for the same reason: a re-encode at a finer step than its
  source's (a JPEG q60 source saved again at q90) still wins step 4 when nothing before separates
  them (two members of equal size, orientation and colours): bytes alone cannot tell which came first.

Reasons: ``unique`` (a cluster of one), ``best_of_cluster`` (the keeper of a larger cluster),
``near_duplicate`` (another member was kept: see ``cluster_id``), ``exact_duplicate``,
``unreadable`` (the bytes do not decode; ``cluster_id`` null).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from stages.core import images, io, log, params, shards
from stages.core.paths import Dedupe
from stages.curation import hashing, verify

logger = logging.getLogger("stages.dedupe")

# (view, hash searched: 0 = pHash, 1 = dHash), each a self-search within dedupe.threshold. Measured
# on ../shared/realart (benchmarks/bench_curation_realart.py): the fold's pHash finds flipped copies
# (0-2 bits, 24-34 for the images themselves); the band fold's dHash the Starry Night crops (full
# pHash 18-20, band fold dHash 7-9), a second scan of Impression, Sunrise (full pHash 12, 8) and of
# the Bedroom in Arles (full dHash 17, 10).
SEARCHES = (("full", 0), ("fold", 0), ("band_fold", 1))
KEEP_RULE = ("pixels", "orientation", "colour", "quant_step", "id")
COLOUR_TIE = 0.01

SCHEMA = pa.schema([
    ("id", pa.string()), ("phash", pa.string()), ("dhash", pa.string()),
    ("phash_fold", pa.string()), ("dhash_fold", pa.string()),
    ("phash_band_fold", pa.string()), ("dhash_band_fold", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("bytes_per_pixel", pa.float64()),
    ("quant_step", pa.float64()),
    ("cluster_id", pa.string()), ("cluster_size", pa.int32()), ("phash_to_keeper", pa.int32()),
    ("match_to_keeper", pa.float64()),
    ("kept", pa.bool_()), ("reason", pa.string()), ("keep_reason", pa.string()),
])


def hash_rows(rows, cfg, progress=None) -> dict:
    """Hash every distinct id of ``rows`` (dicts with ``id``, ``image`` bytes, ``width``,
    ``height``) in ``cfg.workers`` processes; columns as lists. ``exact`` lists the ids that occur
    again after their first row."""
    h = {"ids": [], "sizes": [], "bpp": [], "exact": []}
    seen = set()

    def blobs():
        for row in rows:
            if row["id"] in seen:
                h["exact"].append(row["id"])
                if progress:
                    progress(1)
                continue
            seen.add(row["id"])
            w, ht = row["width"] or 0, row["height"] or 0
            h["ids"].append(row["id"])
            h["sizes"].append((w, ht))
            h["bpp"].append(len(row["image"]) / max(1, w * ht))
            yield row["image"]

    h["hashes"] = hashing.hash_many(blobs(), cfg.hash_size, cfg.workers, progress=progress)
    return h


def hash_raw(folder: Path, cfg, logger) -> dict:
    """:func:`hash_rows` over the raw shards, with a progress bar."""
    n_rows = shards.read_table(folder, columns=["id"]).num_rows
    bar = log.progress(total=n_rows, desc="hash", unit="img")
    h = hash_rows(shards.iter_rows(folder, columns=["id", "image", "width", "height"]), cfg, bar.update)
    bar.close()
    logger.info("hashed %d images (%d exact duplicate rows)", len(h["ids"]), len(h["exact"]))
    return h


def raw_signatures(folder: Path, workers: int):
    """A callable: ids -> {id: signature}, decoding only those images from the shards."""
    def fetch(ids: set[str]) -> dict:
        rows = {r["id"]: r["image"] for r in shards.iter_rows(folder, columns=["id", "image"], ids=ids)}
        keys = sorted(rows)
        return dict(zip(keys, hashing.signatures_many((rows[k] for k in keys), workers)))
    return fetch


def candidate_pairs(hashes: np.ndarray, cfg) -> tuple[np.ndarray, dict]:
    """Pairs (i < j) from :data:`SEARCHES` over ``hashes`` (N, views, 2, bytes), after the second
    vote; and the pair counts per search."""
    found, counts = [], {}
    for view, which in SEARCHES:
        v = hashing.VIEWS.index(view)
        pairs = hashing.near_pairs(hashes[:, v, which], cfg.threshold, cfg.workers)
        counts[f"{view} {'pHash' if which == 0 else 'dHash'}"] = len(pairs)
        if cfg.second_vote and len(pairs):
            other = hashes[:, v, 1 - which]
            pairs = pairs[hashing.hamming(other[pairs[:, 0]], other[pairs[:, 1]]) <= cfg.dhash_threshold]
        found.append(pairs)
    pairs = np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), np.int64)
    return pairs.reshape(-1, 2).astype(np.int64), counts


def view_distance(a: np.ndarray, b: np.ndarray) -> int:
    """The smallest pHash distance between two images' hashes (views, 2, bytes) over the views."""
    return int(hashing.hamming(a[:, 0], b[:, 0]).min())


def keep_criteria(labels: np.ndarray, pixels: np.ndarray, quant: np.ndarray, ids: list[str],
                  sig: dict) -> dict:
    """The :data:`KEEP_RULE` scores (higher is better) of every member: ``orientation`` counts the
    other members it matches unmirrored, ``colour`` is minus its mean ``verify.colour_gap`` to
    them (rounded to :data:`COLOUR_TIE`: closer is a tie). Both are 0 without signatures."""
    orientation, colour = np.zeros(len(ids)), np.zeros(len(ids))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2 or any(sig.get(ids[m]) is None for m in members):
            continue
        for m in members:
            others = [sig[ids[o]] for o in members if o != m]
            orientation[m] = sum(not verify.match(sig[ids[m]], o)[1].endswith("mirror") for o in others)
            colour[m] = -round(np.mean([verify.colour_gap(sig[ids[m]], o) for o in others]) / COLOUR_TIE) * COLOUR_TIE
    return {"pixels": pixels.astype(float), "orientation": orientation, "colour": colour,
            "quant_step": -quant}


def explain(criterion: str, best: dict, runner_up: dict) -> str:
    """One line: why the keeper beat the runner-up."""
    if criterion == "pixels":
        return f"pixels: {best['width']}x{best['height']} over {runner_up['width']}x{runner_up['height']}"
    if criterion == "orientation":
        return (f"orientation: matches {best['_orientation']:.0f} other members unmirrored, "
                f"the runner-up {runner_up['_orientation']:.0f}")
    if criterion == "colour":
        return (f"colour: mean colour gap {-best['_colour']:.2f} to the other members, "
                f"the runner-up {-runner_up['_colour']:.2f}")
    if criterion == "quant_step":
        return f"quant_step: {best['quant_step']:.2f} finer than {runner_up['quant_step']:.2f}"
    return "id: a full tie, the smallest id"


def decide(h: dict, cfg, signatures=None) -> tuple[list[dict], dict]:
    """Cluster the readable hashes and apply the keep rule. ``signatures``: ids -> {id: signature}
    (needed when ``cfg.verify``; also for orientation and colour). Returns (rows, pair counts per step)."""
    ok = np.array([r is not None for r in h["hashes"]], bool)
    good = np.flatnonzero(ok)
    nbytes = (cfg.hash_size ** 2 + 7) // 8
    hashes = (np.stack([h["hashes"][i][0] for i in good]) if len(good)
              else np.zeros((0, len(hashing.VIEWS), 2, nbytes), np.uint8))
    quant = np.array([h["hashes"][i][1] for i in good], float)
    ids = [h["ids"][i] for i in good]
    pairs, steps = candidate_pairs(hashes, cfg)
    steps = {"candidates": steps, "after_vote": len(pairs)}
    sig = {}
    if signatures is not None and len(pairs):
        sig = signatures({ids[i] for i in np.unique(pairs)})
    if cfg.verify and len(pairs):
        sim = np.array([verify.match(sig[ids[a]], sig[ids[b]])[0]
                        if sig.get(ids[a]) is not None and sig.get(ids[b]) is not None else -1.0
                        for a, b in pairs])
        pairs = pairs[sim >= cfg.verify_min]
        steps["verified"] = len(pairs)
    labels = hashing.cluster(len(good), pairs)
    pixels = np.array([h["sizes"][i][0] * h["sizes"][i][1] for i in good], np.int64)
    criteria = keep_criteria(labels, pixels, quant, ids, sig)
    keep, why = hashing.choose_keepers(labels, ids, [criteria[c] for c in KEEP_RULE[:-1]])
    keeper_of = {int(labels[i]): i for i in np.flatnonzero(keep)}
    size_of = np.bincount(labels, minlength=len(good)) if len(good) else np.zeros(0, int)
    rows = []
    for k, i in enumerate(good):
        size, kk = int(size_of[labels[k]]), keeper_of[int(labels[k])]
        reason = ("unique" if size == 1 else "best_of_cluster") if keep[k] else "near_duplicate"
        both = sig.get(ids[k]) is not None and sig.get(ids[kk]) is not None
        hexes = {f"{'pd'[w]}hash{'' if v == 'full' else '_' + v}": hashing.to_hex(hashes[k, n, w])
                 for n, v in enumerate(hashing.VIEWS) for w in (0, 1)}
        rows.append(dict(
            id=ids[k], **hexes, width=h["sizes"][i][0], height=h["sizes"][i][1], bytes_per_pixel=h["bpp"][i],
            quant_step=float(quant[k]), cluster_id=ids[kk], cluster_size=size,
            phash_to_keeper=view_distance(hashes[k], hashes[kk]),
            match_to_keeper=(round(verify.match(sig[ids[k]], sig[ids[kk]])[0], 4)
                             if both and k != kk else None),
            kept=bool(keep[k]), reason=reason, _orientation=float(criteria["orientation"][k]),
            _colour=float(criteria["colour"][k])))
    for k, i in enumerate(good):  # why the keeper won, on every row of its cluster
        if size_of[labels[k]] > 1:
            rival = rows[int(why[k][1])] if why[k][1] >= 0 else rows[k]
            rows[k]["keep_reason"] = explain(KEEP_RULE[why[k][0]], rows[keeper_of[int(labels[k])]], rival)
    for r in rows:
        del r["_orientation"], r["_colour"]
    for i in np.flatnonzero(~ok):
        rows.append(dict(id=h["ids"][i], width=h["sizes"][i][0], height=h["sizes"][i][1],
                         bytes_per_pixel=h["bpp"][i], cluster_size=0, kept=False, reason="unreadable"))
    by_id = {r["id"]: r for r in rows}
    for dup in h["exact"]:  # the same id again: recorded once more, never kept
        rows.append(dict(by_id[dup], kept=False, reason="exact_duplicate"))
    return rows, steps


def largest_clusters_sheet(rows: list[dict], folder: Path, n_clusters: int = 8, max_cols: int = 8):
    """Contact sheet: one row per cluster (largest first), keeper first, members side by side."""
    from collections import defaultdict

    from PIL import Image

    members = defaultdict(list)
    for r in rows:
        if r["reason"] in ("best_of_cluster", "near_duplicate"):
            members[r["cluster_id"]].append(r)
    top = sorted(members.values(), key=lambda m: (-len(m), m[0]["cluster_id"]))[:n_clusters]
    want = {r["id"] for m in top for r in m}
    pics = {row["id"]: images.decode(row["image"])
            for row in shards.iter_rows(folder, columns=["id", "image"], ids=want)}
    cols = max([min(len(m), max_cols) for m in top] + [1])
    cells, labels = [], []
    for m in top:
        m = sorted(m, key=lambda r: not r["kept"])[:cols]
        for r in m + [None] * (cols - len(m)):
            cells.append(pics[r["id"]] if r else Image.new("RGB", (8, 8), "white"))
            labels.append((f"KEEP {r['width']}x{r['height']}" if r["kept"] else
                           f"drop {r['width']}x{r['height']}") if r else "")
    title = f"{len(members)} near-duplicate clusters; the {len(top)} largest (first = kept)"
    return images.contact_sheet(cells, labels, cols=cols, title=title)


def summarize(rows: list[dict]) -> dict:
    from collections import Counter

    reasons = Counter(r["reason"] for r in rows)
    sizes = Counter(r["cluster_size"] for r in rows if r["kept"])
    return {
        "rows": len(rows),
        "kept": sum(r["kept"] for r in rows),
        "removed": sum(not r["kept"] for r in rows),
        "by_reason": dict(sorted(reasons.items())),
        "clusters": sum(sizes.values()),
        "near_duplicate_clusters": sum(c for s, c in sizes.items() if s > 1),
        "keep_decided_by": dict(sorted(Counter(r["keep_reason"].split(":")[0] for r in rows
                                               if r["reason"] == "best_of_cluster").items())),
        "cluster_size_histogram": {str(s): c for s, c in sorted(sizes.items())},
    }


def run(p: params.Params, paths: Dedupe = Dedupe()) -> dict:
    """The whole stage; returns the summary (``paths.reports``/summary.json)."""
    cfg = p.dedupe
    h = hash_raw(paths.shards, cfg, logger)
    rows, steps = decide(h, cfg, raw_signatures(paths.shards, cfg.workers))
    shards.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), paths.table)
    summary = {**summarize(rows), "pairs": steps}
    logger.info("kept %d of %d; %s", summary["kept"], summary["rows"], summary["by_reason"])
    with io.atomic_dir(paths.reports) as tmp:
        io.write_json(tmp / "summary.json", summary)
        csv = "cluster_size,clusters\n" + "".join(
            f"{s},{c}\n" for s, c in summary["cluster_size_histogram"].items())
        io.write_text(tmp / "cluster_sizes.csv", csv)
        largest_clusters_sheet(rows, paths.shards).save(tmp / "largest_clusters.png")
    return summary


def main() -> None:
    p = params.load()
    log.setup("dedupe")
    run(p, Dedupe())


if __name__ == "__main__":
    main()
