"""Dedupe speed: clustering N images' hashes (target: 100,000 in <= 10 s on 2 cores), and hashing
throughput with 1 and 2 worker processes.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_dedupe.py [--n 100000] [--radius 10] [--workers 2]

Every image has the stage's hashes (``hashing.VIEWS`` x pHash/dHash, 64 bits each), random with
5 % planted near-copies (0..radius+2 bits flipped in every view), so the searches find real pairs.
The clustering time is what ``stages.dedupe.decide`` spends before decoding anything: the four
searches of ``dedupe.SEARCHES`` with the second vote (``dedupe.candidate_pairs``), then
``hashing.cluster`` and ``hashing.choose_keepers``. The single pHash search of the stage before
issue 19 is timed too, for comparison.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from stages import dedupe
from stages.core import params
from stages.curation import hashing


def planted_hashes(n: int, radius: int, seed: int = 0, shape=(8,)) -> np.ndarray:
    """(n, *shape) uint8 random hashes, 5 % of them near copies of another row: in every 8-byte
    hash of the row, 0..radius+2 bits flipped."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    k = n // 20
    src, dst = rng.integers(0, n, k), rng.choice(n, k, replace=False)
    bits[dst] = bits[src]
    flat = bits.reshape(n, -1, 8)
    for row, f in zip(dst, rng.integers(0, radius + 3, k)):
        for h in range(flat.shape[1]):
            for b in rng.choice(64, f, replace=False):
                flat[row, h, b // 8] ^= 1 << (b % 8)
    return bits


def bench_cluster(n: int, radius: int, workers: int) -> dict:
    hashes = planted_hashes(n, radius, shape=(len(hashing.VIEWS), 2, 8))
    cfg = params.Dedupe(threshold=radius, workers=workers)
    t0 = time.perf_counter()
    pairs, _ = dedupe.candidate_pairs(hashes, cfg)
    t1 = time.perf_counter()
    labels = hashing.cluster(n, pairs)
    keep, _ = hashing.choose_keepers(labels, [f"{i:08d}" for i in range(n)], [np.ones(n)])
    t2 = time.perf_counter()
    single = hashing.near_pairs(hashes[:, 0, 0], radius, workers=workers)
    t3 = time.perf_counter()
    return {"n": n, "pairs": len(pairs), "clusters": int(keep.sum()), "search_s": t1 - t0,
            "cluster_keep_s": t2 - t1, "total_s": t2 - t0, "single_s": t3 - t2, "single_pairs": len(single)}


def bench_brute(n: int, radius: int) -> float:
    """Blocked all-pairs popcount on a subset, extrapolated quadratically (for comparison)."""
    bits = planted_hashes(n, radius)
    t0 = time.perf_counter()
    hashing._brute_pairs(bits, radius)
    return time.perf_counter() - t0


def bench_hashing(count: int) -> dict:
    """Throughput on 1024x768 JPEGs (WikiArt-like: smooth colour fields plus brush noise)."""
    from PIL import Image, ImageFilter

    from stages.core.images import encode_jpeg

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(count):
        base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((1024, 768))
        noise = rng.normal(0, 18, (768, 1024, 3))
        arr = np.clip(np.asarray(base.filter(ImageFilter.GaussianBlur(2)), float) + noise, 0, 255)
        blobs.append(encode_jpeg(Image.fromarray(arr.astype(np.uint8)), quality=90))
    out = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        hashing.hash_many(blobs, 8, workers)
        out[workers] = count / (time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--radius", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--images", type=int, default=200, help="images for the hashing throughput")
    args = ap.parse_args()

    r = bench_cluster(args.n, args.radius, args.workers)
    print(f"cluster {r['n']:,} hashes, r={args.radius}, {args.workers} threads: "
          f"search {r['search_s']:.2f} s + cluster/keep {r['cluster_keep_s']:.2f} s = "
          f"{r['total_s']:.2f} s  ({r['pairs']:,} pairs, {r['clusters']:,} clusters)  "
          f"target <= 10 s: {'PASS' if r['total_s'] <= 10 else 'FAIL'}")
    print(f"  (one pHash search alone, as before issue 19: {r['single_s']:.2f} s, {r['single_pairs']:,} pairs; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores)")
    sub = 10_000
    brute = bench_brute(sub, args.radius)
    print(f"blocked brute force on {sub:,}: {brute:.2f} s -> ~{brute * (args.n / sub) ** 2:.0f} s "
          f"extrapolated to {args.n:,}")
    h = bench_hashing(args.images)
    print(f"hashing 1024x768 JPEGs (decode + pHash + dHash of the {len(hashing.VIEWS)} views): 1 process {h[1]:.0f} img/s, "
          f"2 processes {h[2]:.0f} img/s")


if __name__ == "__main__":
    main()
