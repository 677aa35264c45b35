"""Shared fixtures for the encode/train tests: a tiny curated set and params files in a temp dir."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.core import params
from stages.core.images import encode_png
from stages.core.shards import content_id, write_shards
from tests import stagerun

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
    """params.yaml in ``root`` = the smoke composition with ``overrides`` (``train__steps=5`` for
    ``train.steps=5``), composed by Hydra as ``dvc exp run -S`` does."""
    return stagerun.write_params(root, *(stagerun.override(k.replace("__", "."), v) for k, v in overrides.items()))


@contextlib.contextmanager
def tiny_cache(tmp_root: Path):
    """Build/reuse the tiny random Flux under ``tmp_root`` (not the repo's .cache) while active."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUXIMP_CACHE", str(tmp_root))
        yield


# small and fast: 32 px, no buckets, rank 4 (tests/test_train.py, tests/test_resume.py)
FAST = dict(train__resolution=32, train__buckets=False, train__batch_size=4, train__warmup_steps=0,
            lora__rank=4, train__lr=1e-2)


def run_train(workdir: Path, callbacks=(), **overrides) -> list[dict]:
    """Write params (FAST + ``overrides``), run the train stage on ``workdir``'s files with these
    per-step ``callbacks``; return loss.tsv rows."""
    from stages import train
    from stages.core import log
    from stages.core.paths import Train

    log.setup("train")  # as main() does: the stage's messages on stderr
    train.run(write_params(workdir, **{**FAST, **overrides}), Train().under(workdir), callbacks=callbacks)
    rows = (workdir / "reports/train/loss.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    return [dict(zip(header, map(float, r.split("\t")))) for r in rows[1:]]


def run_train_main(workdir: Path, **overrides) -> None:
    """The train stage as DVC runs it (``main()``: inside the MLflow run) in ``workdir``, the cwd."""
    from stages import train

    assert Path.cwd() == workdir.resolve(), "main() reads params.yaml and writes outputs in the cwd"
    write_params(workdir, **{**FAST, **overrides})
    train.main()
