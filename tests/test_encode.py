"""encode stage: per-bucket latent/text caches with the right shapes, flip latents, rejects
recorded, and a cache that LoRA/optimizer param changes reuse."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages.core import shards
from stages.core.paths import Encode
from stages.models.cache import Cache
from tests import trainkit


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("encode")
    trainkit.make_curated(root, n=9)
    # one broken image: recorded as a reject, never a crash
    rows = [{"id": "broken", "image": b"not an image", "format": "png", "width": 64, "height": 64,
             "caption": "a broken file"}]
    shards.write_shards(rows, root / "data/curated/extra", 8)
    (root / "data/curated/extra/part-00000.parquet").rename(root / "data/curated/train/part-00099.parquet")
    p = trainkit.write_params(root, train__flip=True)
    with trainkit.tiny_cache(tmp_path_factory.getbasetemp() / "tiny-cache"):
        from stages import encode

        encode.run(p, Encode().under(root))  # the stage itself, no change of directory
        yield root


def test_cache_layout_and_shapes(workdir):
    index = json.loads((workdir / "data/cache/index.json").read_text())
    assert index["count"] == 9 and index["flip"] is True
    assert [r["id"] for r in index["rejects"]] == ["broken"] and "undecodable" in index["rejects"][0]["reason"]
    sizes = {(b["width"], b["height"]) for b in index["buckets"]}
    assert sizes == {(64, 64), (80, 48), (48, 80)}
    for b in index["buckets"]:
        t = load_file(workdir / "data/cache" / b["files"][0])
        n = b["count"]
        assert t["latents"].shape == (n, 4, b["height"] // 8, b["width"] // 8)
        assert t["latents_flip"].shape == t["latents"].shape
        assert not torch.equal(t["latents_flip"], t["latents"])
        assert t["prompt_embeds"].shape == (n, 64, 32) and t["pooled"].shape == (n, 32)
    c = Cache(workdir / "data/cache")
    assert len(c) == 9 and c.empty[0].shape == (64, 32) and c.empty[1].shape == (32,)
    batch = c.batch(seed=0, index=0, batch_size=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert batch.latents.shape[0] == batch.prompt_embeds.shape[0] == len(batch.ids) >= 1


def mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_cache_reused_across_lora_change_rebuilt_on_resolution_change(workdir, caplog):
    from stages import encode

    before = mtimes(workdir / "data/cache")
    in_workdir = Encode().under(workdir)
    encode.run(trainkit.write_params(workdir, train__flip=True, lora__rank=16, lora__targets="all", train__lr=0.5),
               in_workdir)
    assert mtimes(workdir / "data/cache") == before
    # DVC reruns encode only for its own params: none of them is a LoRA or optimizer key
    stage = yaml.safe_load(open(trainkit.params.ROOT / "dvc.yaml"))["stages"]["encode"]
    assert not [k for k in stage["params"] if str(k).startswith(("lora", "train.lr", "train.steps"))]
    encode.run(trainkit.write_params(workdir, train__flip=False, train__resolution=48), in_workdir)
    index = json.loads((workdir / "data/cache/index.json").read_text())
    assert index["resolution"] == 48 and index["flip"] is False
    assert (48, 48) in {(b["width"], b["height"]) for b in index["buckets"]}


def test_kohya_repeats_reach_the_sampler_and_the_data_hash(tmp_path, monkeypatch):
    from stages import encode

    root = tmp_path / "rep"
    trainkit.make_curated(root, n=4, sizes=((32, 32),))
    plain = encode.data_hash(list(shards.iter_rows(root / "data/curated/train", columns=["id", "caption", "repeats"])))
    rows = list(shards.iter_rows(root / "data/curated/train"))
    rows[0]["repeats"] = 5
    shards.write_shards(rows, root / "data/curated/train", 8)
    trainkit.write_params(root, train__resolution=32, train__buckets=False)
    monkeypatch.chdir(root)
    with trainkit.tiny_cache(tmp_path / "tiny-cache"):
        encode.main()
    index = json.loads((root / "data/cache/index.json").read_text())
    assert index["data_hash"] != plain  # repeats change what is trained on
    cache = Cache(root / "data/cache")
    reps = dict(zip(cache.buckets[0]["ids"], cache.buckets[0]["repeats"]))
    assert reps[rows[0]["id"]] == 5 and sorted(reps.values()) == [1, 1, 1, 5]
    seen = [r for _, rr in cache.epoch_plan(seed=0, epoch=0, batch_size=1) for r in rr]
    assert seen.count(cache.buckets[0]["ids"].index(rows[0]["id"])) == 5 and len(seen) == 8
