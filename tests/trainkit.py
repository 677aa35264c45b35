"""Shared fixtures for the encode/train tests: a tiny curated set and params files in a temp dir."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from stages.core import params
from stages.core.images import encode_png
from stages.core.shards import content_id, write_shards

COLORS = [(200, 60, 40), (40, 120, 200), (230, 200, 60), (60, 160, 80)]


def painting(i: int, w: int, h: int) -> Image.Image:
    """A small deterministic image: a coloured field with stripes (enough structure to learn)."""
    rng = np.random.default_rng(i)
    arr = np.zeros((h, w, 3), np.uint8) + np.array(COLORS[i % len(COLORS)], np.uint8)
    for x in range(0, w, 8):
        arr[:, x:x + 3] = rng.integers(0, 255, 3)
    return Image.fromarray(arr)


def make_curated(root: Path, n: int = 12, sizes=((64, 64), (96, 64), (64, 96))) -> None:
    for split, count, offset in (("train", n, 0), ("holdout", 2, 1000)):
        rows = []
        for i in range(count):
            w, h = sizes[i % len(sizes)]
            data = encode_png(painting(i + offset, w, h))
            rows.append({"id": content_id(data), "image": data, "format": "png", "width": w, "height": h,
                         "caption": f"a striped field number {i % 4}, in the style of impressionism"})
        write_shards(rows, root / "data/curated" / split, shard_rows=8)


def write_params(root: Path, **overrides) -> params.Params:
    """params.yaml in ``root`` = the smoke params with dotted ``overrides`` (``train__steps=5``)."""
    raw = params.load(params.PARAMS_FILE).model_dump()
    for key, value in overrides.items():
        *path, last = key.split("__")
        d = raw
        for part in path:
            d = d[part]
        d[last] = value
    p = params.validate(raw)
    (root / "params.yaml").write_text(yaml.safe_dump(p.model_dump()))
    return p


@contextlib.contextmanager
def tiny_cache(tmp_root: Path):
    """Build/reuse the tiny random Flux under ``tmp_root`` (not the repo's .cache) while active."""
    old = os.environ.get("FLUXIMP_CACHE")
    os.environ["FLUXIMP_CACHE"] = str(tmp_root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FLUXIMP_CACHE", None)
        else:
            os.environ["FLUXIMP_CACHE"] = old


# small and fast: 32 px, no buckets, rank 4 (tests/test_train.py, tests/test_resume.py)
FAST = dict(train__resolution=32, train__buckets=False, train__batch_size=4, train__warmup_steps=0,
            lora__rank=4, train__lr=1e-2)


def run_train(workdir: Path, **overrides) -> list[dict]:
    """Write params (FAST + ``overrides``), run the train stage in ``workdir``; return loss.tsv rows."""
    from stages import train

    write_params(workdir, **{**FAST, **overrides})
    train.main()
    rows = (workdir / "reports/train/loss.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    return [dict(zip(header, map(float, r.split("\t")))) for r in rows[1:]]
