"""Smaller hygiene points (issue 26.7): safetensors outputs get the umask's mode (not 0600), a
corrupt shard names its file, and normalising an image leaves Pillow's process-wide limit alone."""
import io
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from stages.core import params, shards, tensorfiles
from tests import trainkit


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_safetensors_outputs_are_group_and_world_readable(umask_022, tmp_path):
    from stages.models import checkpoint

    assert _mode(tensorfiles.save({"a": torch.zeros(2)}, tmp_path / "bucket.safetensors")) == 0o644

    class Trainer:  # what checkpoint.save asks of the trainer
        def state_dict(self):
            return {"lora": {"w": torch.ones(2)}, "optimizer": {}}

    folder = checkpoint.save(tmp_path / "ckpt", Trainer(), step=3, ident={"x": 1}, keep=2)
    assert _mode(folder / "lora.safetensors") == 0o644


def test_diffusers_adapter_file_is_readable(umask_022, tmp_path):
    from stages.models import lora
    from tests.pubkit import tiny_transformer

    _, transformer = tiny_transformer()
    lora.add_lora(transformer, params.Lora(rank=2))
    lora.save_diffusers(transformer, tmp_path)
    assert _mode(tmp_path / "pytorch_lora_weights.safetensors") == 0o644


def test_encode_on_a_corrupt_shard_names_the_file(tmp_path):
    from stages import encode
    from stages.core.paths import Encode

    trainkit.make_curated(tmp_path, n=3, sizes=((32, 32),))
    bad = tmp_path / "data/curated/train/part-00001.parquet"
    good = (tmp_path / "data/curated/train/part-00000.parquet").read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated
    p = trainkit.write_params(tmp_path, **trainkit.FAST)
    with pytest.raises(shards.ShardError, match=f"cannot read parquet shard {bad}.*rerun the stage"):
        encode.run(p, Encode().under(tmp_path))
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(shards.ShardError, match=str(bad)):
        shards.read_table(bad.parent)


def test_normalize_leaves_pillows_limit_as_it_was():
    from stages.data import normalize

    before = Image.MAX_IMAGE_PIXELS
    buf = io.BytesIO()
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(buf, format="PNG")
    normalize.normalize(buf.getvalue(), 8, 10_000)
    with pytest.raises(normalize.Reject):
        normalize.normalize(buf.getvalue(), 8, 1_000)
    assert Image.MAX_IMAGE_PIXELS == before
