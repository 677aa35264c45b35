"""Dedupe speed: clustering N 64-bit pHashes (target: 100,000 in <= 10 s on 2 cores), and hashing
throughput with 1 and 2 worker processes.

    .venv/bin/python benchmarks/bench_dedupe.py [--n 100000] [--radius 10] [--workers 2]

The hashes are random with 5 % planted near-copies (0..radius+2 bits flipped), so the search
finds real pairs. Prints one table; the clustering time is near_pairs + cluster + choose_keepers.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from stages.curation import hashing


def planted_hashes(n: int, radius: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    k = n // 20
    src, dst = rng.integers(0, n, k), rng.choice(n, k, replace=False)
    bits[dst] = bits[src]
    flips = rng.integers(0, radius + 3, k)
    for row, f in zip(dst, flips):
        for b in rng.choice(64, f, replace=False):
            bits[row, b // 8] ^= 1 << (b % 8)
    return bits


def bench_cluster(n: int, radius: int, workers: int) -> dict:
    bits = planted_hashes(n, radius)
    t0 = time.perf_counter()
    pairs = hashing.near_pairs(bits, radius, workers=workers)
    t1 = time.perf_counter()
    labels = hashing.cluster(n, pairs)
    keep = hashing.choose_keepers(labels, np.ones(n), [f"{i:08d}" for i in range(n)])
    t2 = time.perf_counter()
    return {"n": n, "pairs": len(pairs), "clusters": int(keep.sum()), "search_s": t1 - t0,
            "cluster_keep_s": t2 - t1, "total_s": t2 - t0}


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
    sub = 10_000
    brute = bench_brute(sub, args.radius)
    print(f"blocked brute force on {sub:,}: {brute:.2f} s -> ~{brute * (args.n / sub) ** 2:.0f} s "
          f"extrapolated to {args.n:,}")
    h = bench_hashing(args.images)
    print(f"hashing 1024x768 JPEGs (decode + pHash + dHash): 1 process {h[1]:.0f} img/s, "
          f"2 processes {h[2]:.0f} img/s")


if __name__ == "__main__":
    main()
