"""evaluate's held-out measurements kept in the stage cache (stages.metrics.refcache): a warm cache
decodes and measures no held-out painting and writes the same bytes; the key follows the data,
the embedders and the settings."""
import shutil
from pathlib import Path

import pytest

from stages import evaluate
from stages.core import params, stagecache
from stages.core.paths import Evaluate
from stages.metrics import refcache, reference, traits
from tests.stagerun import run_stage, write_params
from tests.test_evaluate import write_holdout

SAMPLING = ["sample.prompts=prompts.txt", "sample.seeds=[0,1]", "sample.steps=2", "sample.lora_scales=[0.0,0.5,1.0]",
            "sample.batch_size=4", "data.holdout=0.2"]


def outputs(root: Path) -> dict[str, bytes]:
    files = [root / "reports/metrics.json", root / "reports/report.html",
             *(root / "reports/eval").rglob("*"), *(root / "reports/plots").rglob("*")]
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(files) if f.is_file()}


@pytest.fixture
def project(sampled, tmp_path, monkeypatch) -> Path:
    """A copy of the sampled project with a held-out set and a stage cache of its own."""
    root = tmp_path / "proj"
    shutil.copytree(sampled, root, ignore=shutil.ignore_patterns("eval", "plots", "metrics.json", "report.html", "curated"))
    write_holdout(root)
    monkeypatch.setenv("FLUXIMP_STAGE_CACHE", str(tmp_path / "stage-cache"))
    return root


@pytest.mark.slow
def test_warm_reference_cache_measures_no_holdout_and_writes_the_same_bytes(project, tmp_path, monkeypatch):
    write_params(project, *SAMPLING, "eval.reference_cache=false")
    run_stage(evaluate.main, project)
    off = outputs(project)
    assert not (tmp_path / "stage-cache").exists()
    write_params(project, *SAMPLING)
    run_stage(evaluate.main, project)
    cold = outputs(project)
    assert len(list((tmp_path / "stage-cache" / refcache.KIND).rglob("*.bin"))) == 1
    # only the params table of the report names the switch
    assert {k for k in off if off[k] != cold[k]} == {"reports/report.html"}
    measured = []
    table = traits.trait_table
    monkeypatch.setattr(reference, "load_holdout", lambda *a: pytest.fail("held-out paintings decoded"))
    monkeypatch.setattr(traits, "trait_table", lambda imgs, size: measured.append(len(imgs)) or table(imgs, size))
    run_stage(evaluate.main, project)
    assert outputs(project) == cold
    assert measured == [4, 4, 4]  # the three sample scales' traits; none of the held-out set


def test_reference_key_follows_data_embedders_and_settings(tmp_path):
    from stages.models.clip import load_clip

    write_holdout(tmp_path)
    holdout, emb = tmp_path / "data/curated/holdout", tmp_path / "missing.safetensors"
    p = params.validate(params.compose([]))
    clip = load_clip(p.clip, device="cpu", seed=p.seed)
    key = stagecache.digest(refcache.fields(p, holdout, emb, clip, reference.HOLDOUT_SIDE))
    assert stagecache.digest(refcache.fields(p, holdout, emb, clip, reference.HOLDOUT_SIDE)) == key

    def other(p2=p, side=reference.HOLDOUT_SIDE) -> str:
        return stagecache.digest(refcache.fields(p2, holdout, emb, clip, side))

    assert other(params.validate(params.compose(["eval.trait_size=32"]))) != key
    assert other(params.validate(params.compose(["seed=7"]))) != key  # tiny CLIP's weights are seeded
    assert other(params.validate(params.compose(["clip.batch_size=4"]))) != key
    assert other(side=256) != key
    # nothing about the adapter or the samples
    assert other(params.validate(params.compose(["lora.rank=8", "sample.steps=2", "eval.ab_scale=0.5"]))) == key
    shard = sorted(holdout.rglob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes() + b"\0")  # other held-out data
    assert other() != key


def test_pack_round_trips_bit_for_bit():
    import numpy as np

    rng = np.random.default_rng(0)
    clip, style = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)
    table = {k: rng.standard_normal(3) for k in traits.NAMES}
    ids, c, s, t = refcache.unpack(refcache.pack(["a", "b", "c"], clip, style, table))
    assert ids == ["a", "b", "c"] and list(t) == list(traits.NAMES)
    assert c.tobytes() == clip.tobytes() and s.tobytes() == style.tobytes()
    assert all(t[k].dtype == table[k].dtype and t[k].tobytes() == table[k].tobytes() for k in table)
