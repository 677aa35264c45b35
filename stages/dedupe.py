"""dedupe: one image per group of (near-)duplicates, every decision recorded.

Reads ``data/raw/shards``; writes ``data/interim/dedupe.parquet`` (one row per raw id: ``id``,
``phash``, ``dhash`` (hex), ``width``, ``height``, ``bytes_per_pixel``, ``cluster_id`` (the id of
the cluster's keeper), ``cluster_size``, ``phash_to_keeper``, ``kept``, ``reason``) and
``reports/dedupe/`` (``summary.json``: counts, pairs left after each vote, the cluster-size
histogram; ``cluster_sizes.csv``; ``largest_clusters.png``).

- Exact duplicates: rows with the same content id (sha256 of the bytes); the first is kept.
- Near duplicates: pHash Hamming distance <= ``dedupe.threshold``; with ``dedupe.second_vote`` a
  pair also needs dHash distance <= ``dedupe.dhash_threshold``; with ``dedupe.verify`` it must also
  keep the same fine detail (correlation >= ``dedupe.verify_min``, ``hashing.detail_signature``):
  pHash alone merges different paintings of one composition. Pairs are linked transitively.
- Keep rule, per cluster: the largest pixel count, then the higher quality score, then the
  smallest id. Filter scores do not exist yet when dedupe runs (it runs first), so the quality
  score here is the encoded bytes per pixel: of two same-size copies the less compressed wins.

Reasons: ``unique`` (a cluster of one), ``best_of_cluster`` (the keeper of a larger cluster),
``near_duplicate`` (another member was kept: see ``cluster_id``), ``exact_duplicate``,
``unreadable`` (the bytes do not decode; ``cluster_id`` null).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from stages.core import images, io, log, params, shards
from stages.curation import hashing

RAW = "data/raw/shards"
OUT = "data/interim/dedupe.parquet"
REPORTS = "reports/dedupe"

SCHEMA = pa.schema([
    ("id", pa.string()), ("phash", pa.string()), ("dhash", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("bytes_per_pixel", pa.float64()),
    ("cluster_id", pa.string()), ("cluster_size", pa.int32()), ("phash_to_keeper", pa.int32()),
    ("kept", pa.bool_()),
    ("reason", pa.string()),
])


def hash_raw(folder: str, cfg, logger) -> dict:
    """Hash every distinct id in the raw shards (``cfg.workers`` processes); columns as lists.
    ``exact`` lists the ids that occur again after their first row."""
    h = {"ids": [], "sizes": [], "bpp": [], "exact": []}
    seen = set()
    n_rows = shards.read_table(folder, columns=["id"]).num_rows
    bar = tqdm(total=n_rows, desc="hash", unit="img", disable=log.progress_disabled())

    def blobs():
        for row in shards.iter_rows(folder, columns=["id", "image", "width", "height"]):
            if row["id"] in seen:
                h["exact"].append(row["id"])
                bar.update(1)
                continue
            seen.add(row["id"])
            w, ht = row["width"] or 0, row["height"] or 0
            h["ids"].append(row["id"])
            h["sizes"].append((w, ht))
            h["bpp"].append(len(row["image"]) / max(1, w * ht))
            yield row["image"]

    h["hashes"] = hashing.hash_many(blobs(), cfg.hash_size, cfg.workers, progress=bar.update)
    bar.close()
    logger.info("hashed %d images (%d exact duplicate rows)", len(h["ids"]), len(h["exact"]))
    return h


def raw_signatures(folder: str, workers: int):
    """A callable: ids -> {id: detail signature}, decoding only those images from the shards."""
    def fetch(ids: set[str]) -> dict:
        rows = {r["id"]: r["image"] for r in shards.iter_rows(folder, columns=["id", "image"], ids=ids)}
        keys = sorted(rows)
        return dict(zip(keys, hashing.signatures_many((rows[k] for k in keys), workers)))
    return fetch


def decide(h: dict, cfg, signatures=None) -> tuple[list[dict], dict]:
    """Cluster the readable hashes and apply the keep rule. ``signatures``: ids -> {id: detail
    signature} (needed when ``cfg.verify``). Returns (rows, pair counts per step)."""
    ok = np.array([r is not None for r in h["hashes"]], bool)
    good = np.flatnonzero(ok)
    nbytes = (cfg.hash_size ** 2 + 7) // 8
    ph = np.stack([h["hashes"][i][0] for i in good]) if len(good) else np.zeros((0, nbytes), np.uint8)
    dh = np.stack([h["hashes"][i][1] for i in good]) if len(good) else np.zeros((0, nbytes), np.uint8)
    pairs = hashing.near_pairs(ph, cfg.threshold, workers=cfg.workers)
    steps = {"phash": len(pairs)}
    if cfg.second_vote and len(pairs):
        pairs = pairs[hashing.hamming(dh[pairs[:, 0]], dh[pairs[:, 1]]) <= cfg.dhash_threshold]
        steps["dhash_vote"] = len(pairs)
    ids = [h["ids"][i] for i in good]
    if cfg.verify and len(pairs):
        sig = signatures({ids[i] for i in np.unique(pairs)})
        sim = np.array([hashing.pair_similarity(sig[ids[a]], sig[ids[b]])
                        if sig.get(ids[a]) is not None and sig.get(ids[b]) is not None else -1.0
                        for a, b in pairs])
        pairs = pairs[sim >= cfg.verify_min]
        steps["verified"] = len(pairs)
    labels = hashing.cluster(len(good), pairs)
    pixels = np.array([h["sizes"][i][0] * h["sizes"][i][1] for i in good], np.int64)
    keep = hashing.choose_keepers(labels, pixels, ids, np.array([h["bpp"][i] for i in good]))
    keeper_of = {int(labels[i]): i for i in np.flatnonzero(keep)}
    size_of = np.bincount(labels, minlength=len(good)) if len(good) else np.zeros(0, int)
    rows = []
    for k, i in enumerate(good):
        size = int(size_of[labels[k]])
        reason = ("unique" if size == 1 else "best_of_cluster") if keep[k] else "near_duplicate"
        rows.append(dict(id=ids[k], phash=hashing.to_hex(ph[k]), dhash=hashing.to_hex(dh[k]),
                         width=h["sizes"][i][0], height=h["sizes"][i][1], bytes_per_pixel=h["bpp"][i],
                         cluster_id=ids[keeper_of[int(labels[k])]], cluster_size=size,
                         phash_to_keeper=int(hashing.hamming(ph[k], ph[keeper_of[int(labels[k])]])),
                         kept=bool(keep[k]), reason=reason))
    for i in np.flatnonzero(~ok):
        rows.append(dict(id=h["ids"][i], width=h["sizes"][i][0], height=h["sizes"][i][1],
                         bytes_per_pixel=h["bpp"][i], cluster_size=0, kept=False, reason="unreadable"))
    by_id = {r["id"]: r for r in rows}
    for dup in h["exact"]:  # the same id again: recorded once more, never kept
        rows.append(dict(by_id[dup], kept=False, reason="exact_duplicate"))
    return rows, steps


def largest_clusters_sheet(rows: list[dict], folder: str, n_clusters: int = 8, max_cols: int = 8):
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
        "cluster_size_histogram": {str(s): c for s, c in sorted(sizes.items())},
    }


def main() -> None:
    p = params.load()
    logger = log.setup("dedupe")
    cfg = p.dedupe
    h = hash_raw(RAW, cfg, logger)
    rows, steps = decide(h, cfg, raw_signatures(RAW, cfg.workers))
    shards.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), OUT)
    summary = {**summarize(rows), "pairs": steps}
    logger.info("kept %d of %d; %s", summary["kept"], summary["rows"], summary["by_reason"])
    with io.atomic_dir(REPORTS) as tmp:
        io.write_json(tmp / "summary.json", summary)
        csv = "cluster_size,clusters\n" + "".join(
            f"{s},{c}\n" for s, c in summary["cluster_size_histogram"].items())
        io.write_text(tmp / "cluster_sizes.csv", csv)
        largest_clusters_sheet(rows, RAW).save(tmp / "largest_clusters.png")


if __name__ == "__main__":
    main()
