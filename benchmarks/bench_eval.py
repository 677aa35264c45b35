"""Evaluate-stage building blocks on CPU: trait metrics per image and KID on embeddings.

    python benchmarks/bench_eval.py

Prints ms per image for the trait metrics (input 1024 px, measured at eval.trait_size 64 and 256)
and the time of one KID computation (64 samples vs 1000 held-out, 768-d, 100 subsets of 50).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.metrics import fidelity, traits  # noqa: E402


def main() -> None:
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)) for _ in range(8)]
    print("| measure | value |\n|---|---|")
    for size in (64, 256):
        traits.image_traits(imgs[0], size)  # warm-up
        t = time.perf_counter()
        for im in imgs:
            traits.image_traits(im, size)
        print(f"| trait metrics, 1024 px input, trait_size {size} | {1000 * (time.perf_counter() - t) / len(imgs):.1f} ms/image |")
    real, fake = rng.normal(size=(1000, 768)), rng.normal(size=(64, 768))
    fidelity.kid(real, fake, 50, subsets=2)  # warm-up (imports)
    t = time.perf_counter()
    fidelity.kid(real, fake, 50, subsets=100)
    print(f"| KID 64 vs 1000 x 768-d, 100 subsets of 50 | {time.perf_counter() - t:.2f} s |")


if __name__ == "__main__":
    main()
