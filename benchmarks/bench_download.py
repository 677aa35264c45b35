"""Download-stage speed: folder ingest of ~1 MP JPEGs and synthetic generation, in images/s.

    .venv/bin/python -m benchmarks.bench_download            # 2,000 images, workers 1 and 2
    .venv/bin/python -m benchmarks.bench_download --n 500 --workers 2

Target (issue 3): folder ingest of 2,000 images of ~1 MP at >= 100 images/s on 2 cores. The
ingest measured is the stage's own path: scan, read + decode + verify + hash on all workers,
collect, write the parquet shards (reports excluded; their fixed cost is printed apart).
The test images are cached under benchmarks/out/ (gitignored) between runs.
"""
from __future__ import annotations

import argparse
import functools
import io
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stages.core.shards import write_shards
from stages.data import folder, normalize
from stages.core.pool import parallel_map
from stages.data.collect import Collector

OUT = Path(__file__).resolve().parent / "out" / "download_images"


def _make_image(i: int, out: Path) -> None:
    """A ~1 MP JPEG (1152x864) with photo-like content: smooth colour fields, edges, grain."""
    path = out / f"img_{i:05d}.jpg"
    if path.exists():
        return
    rng = np.random.default_rng(i)
    small = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((1152, 864), Image.BICUBIC)
    arr = np.asarray(small, np.int16) + rng.integers(-12, 12, (864, 1152, 1), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue())


def make_images(n: int) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    with mp.get_context("fork").Pool(os.cpu_count()) as pool:  # making them is not what is measured
        pool.map(functools.partial(_make_image, out=OUT), range(n), chunksize=16)
    return OUT


def bench_folder(root: Path, n: int, workers: int) -> tuple[float, Collector]:
    t0 = time.perf_counter()
    cands, _ = folder.scan(root)
    cands = cands[:n]
    results = parallel_map(functools.partial(normalize.process, min_side=32, max_pixels=10**9), cands, workers)
    collector = Collector(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(collector.rows(results), tmp, 256)
    return time.perf_counter() - t0, collector


def bench_synthetic(n: int, size: int, workers: int) -> float:
    from stages.data import synthetic

    items = [it for it in synthetic.plan(n, 0, 0, 0)]
    task = functools.partial(synthetic.generate, seed=0, size=size, min_side=32)
    t0 = time.perf_counter()
    for _ in parallel_map(task, items, workers):
        pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    t0 = time.perf_counter()
    root = make_images(args.n)
    files = sorted(root.glob("*.jpg"))[: args.n]
    mb = sum(f.stat().st_size for f in files) / 2**20
    print(f"test set: {len(files)} JPEGs of 1152x864 ({mb:.0f} MiB) ready in {time.perf_counter() - t0:.1f} s")
    print(f"{'what':<34}{'workers':>8}{'seconds':>10}{'images/s':>10}")
    for w in args.workers:
        secs, coll = bench_folder(root, args.n, w)
        assert coll.summary()["stored"] == len(files), coll.summary()
        print(f"{'folder ingest (~1 MP JPEG)':<34}{w:>8}{secs:>10.2f}{len(files) / secs:>10.1f}")
    try:  # the parts below need matplotlib / imagehash (the project's venv has them)
        from stages.data import report

        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            report.write(coll, Path(tmp), {})
        print(f"{'reports (figures, fixed cost)':<34}{'':>8}{time.perf_counter() - t1:>10.2f}")
        for w in args.workers:
            secs = bench_synthetic(240, 128, w)
            print(f"{'synthetic paintings (128 px)':<34}{w:>8}{secs:>10.2f}{240 / secs:>10.1f}")
    except ImportError as exc:
        print(f"(skipped reports and synthetic: {exc})")


if __name__ == "__main__":
    main()
