"""Base images once (stages.models.base_cache, stages.core.stagecache): the sample stage's scale-0
images come from the shared cache in a second experiment, byte for byte; any key field renders
again; damaged entries are re-rendered; temp/queued experiments find the main repo's cache."""
import json
import shutil
from pathlib import Path

import pytest

from stages import sample
from stages.core import params, stagecache
from stages.models import base_cache
from tests import samplekit
from tests.samplekit import make_adapter
from tests.stagerun import run_stage, write_params

SAMPLING = ["sample.prompts=prompts.txt", "sample.seeds=[0,1]", "sample.steps=2", "sample.lora_scales=[0.0,0.5,1.0]",
            "data.holdout=0.2"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty stage cache of this test's own."""
    monkeypatch.setenv("FLUXIMP_STAGE_CACHE", str(tmp_path / "stage-cache"))
    return tmp_path / "stage-cache" / base_cache.KIND


@pytest.fixture
def counted(monkeypatch) -> dict:
    """Counts the images the transformer renders (per LoRA-enabled state) and its forward calls."""
    return samplekit.count_renders(monkeypatch)


def outputs(root: Path) -> dict[str, bytes]:
    out = root / "reports/samples"
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*.png"))}


def base_files(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k.endswith("-l0.00.png")}


def project(root: Path, *extra: str, rank: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    p = write_params(root, *SAMPLING, *extra)
    (root / "prompts.txt").write_text("a harbour at dawn with fishing boats\na bowl of pears on a table\n")
    if not (root / "models/lora").exists():
        make_adapter(p, root / "models/lora", rank=rank)
    return root


@pytest.mark.slow
def test_second_experiment_renders_no_base_image_and_the_same_bytes(tmp_path, cache, counted, monkeypatch):
    # the reference: the cache off (every image rendered, nothing read or written)
    ref = project(tmp_path / "ref", "sample.base_cache=false", "sample.batch_size=4")
    run_stage(sample.main, ref)
    assert counted["images"] == 12 and not cache.exists()
    # experiment 1, cold cache: renders everything and fills the cache
    one = tmp_path / "one"
    shutil.copytree(ref / "models", one / "models")
    run_stage(sample.main, project(one, "sample.batch_size=4"))
    assert counted["images"] == 24 and len(list(cache.rglob("*.bin"))) == 4
    assert outputs(one) == outputs(ref)  # same adapter: every file byte for byte
    # experiment 2: another adapter (rank 8): only the LoRA images are rendered
    counted.update(images=0, forward=0)
    two = project(tmp_path / "two", "sample.batch_size=4", rank=8)
    run_stage(sample.main, two)
    assert counted["images"] == 8  # 2 LoRA scales x 4 jobs; no base image
    assert counted["forward"] == 2 * 2  # 2 scales x 2 steps x one batch of 4: no base forward at all
    assert base_files(outputs(two)) == base_files(outputs(ref))
    assert outputs(two) != outputs(ref)  # the LoRA images are experiment two's own
    index_one, index_two = (json.loads((r / "reports/samples/index.json").read_text()) for r in (one, two))
    keys = [im.get("base_key") for im in index_one["images"] if im["kind"] == "base"]
    assert len(set(keys)) == 4 and all(len(k) == 64 for k in keys)
    assert [im.get("base_key") for im in index_two["images"] if im["kind"] == "base"] == keys
    assert all("base_key" not in im for im in index_two["images"] if im["kind"] == "lora")
    index_ref = json.loads((ref / "reports/samples/index.json").read_text())
    assert index_ref == index_one  # the index never depends on the cache (on/off, cold/warm)


@pytest.mark.slow
def test_only_missing_batches_are_rendered_and_scale_zero_alone_loads_no_transformer(tmp_path, cache, counted):
    # batch size 1: every image is its own pipeline call
    one = project(tmp_path / "one", "sample.batch_size=1", "sample.lora_scales=[0.0]")
    run_stage(sample.main, one)
    assert counted["images"] == 4
    # a third seed: only its two images are rendered
    counted.update(images=0)
    write_params(one, *SAMPLING, "sample.batch_size=1", "sample.lora_scales=[0.0]", "sample.seeds=[0,1,2]")
    run_stage(sample.main, one)
    assert counted["images"] == 2
    # everything cached and only the base asked for: the transformer is not even loaded
    from stages.models import flux

    counted.update(images=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flux, "load_transformer", lambda *a, **k: pytest.fail("transformer loaded"))
        run_stage(sample.main, one)
    assert counted["images"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate", "no-json", "no-payload", "bad-json"])
def test_damaged_entry_is_detected_and_rendered_again(tmp_path, cache, counted, capsys, damage):
    one = project(tmp_path / "one", "sample.batch_size=1", "sample.lora_scales=[0.0]", "sample.seeds=[0]")
    run_stage(sample.main, one)
    cold = outputs(one)
    payload = next(cache.rglob("*.bin"))
    meta = payload.with_suffix(".json")
    if damage == "flip":
        data = bytearray(payload.read_bytes())
        data[len(data) // 2] ^= 0x01
        payload.write_bytes(bytes(data))
    elif damage == "truncate":
        payload.write_bytes(payload.read_bytes()[:100])
    elif damage == "no-json":
        meta.unlink()
    elif damage == "no-payload":
        payload.unlink()
    else:
        meta.write_text('{"key": ')
    counted.update(images=0)
    run_stage(sample.main, one)
    assert counted["images"] == 1  # just the damaged one
    assert "damaged base-images cache entry" in capsys.readouterr().err  # (log.setup: the stage's stderr)
    assert outputs(one) == cold
    counted.update(images=0)
    run_stage(sample.main, one)  # the entry was repaired
    assert counted["images"] == 0 and outputs(one) == cold


@pytest.fixture(scope="module")
def fields():
    """The key fields of the test project (no rendering)."""
    p = params.validate(params.compose(SAMPLING))
    return p, base_cache.run_fields(p, "cpu")


PROMPT = "a bowl, impressionism style"
KEY_CHANGES = {  # field: (a params override, the prompt, the seed)
    "prompt": (None, PROMPT + " at noon", 0),
    "seed": (None, PROMPT, 7),
    "steps": ("sample.steps=3", PROMPT, 0),
    "guidance": ("sample.guidance=4.0", PROMPT, 0),
    "resolution": ("sample.resolution=80", PROMPT, 0),
    "base revision": ("model.revision=abc123", PROMPT, 0),
    "quantization": ("model.quantization=nf4", PROMPT, 0),
    "max_sequence_length": ("train.max_sequence_length=128", PROMPT, 0),
    "compile": ("sample.compile=true", PROMPT, 0),
}


def first_key(common: dict, prompt: str = PROMPT, seed: int = 0, scale: float = 1.0, batch_size: int = 2) -> str:
    import torch

    embeds, pooled = torch.ones(2, 8, 4), torch.ones(2, 4)
    return base_cache.keys(common, [prompt, PROMPT], [seed, 1], embeds * scale, pooled, batch_size)[0][0]


@pytest.mark.parametrize("change", sorted(KEY_CHANGES))
def test_any_key_field_change_misses(fields, change):
    p, common = fields
    override, prompt, seed = KEY_CHANGES[change]
    if override:
        common2 = base_cache.run_fields(params.validate(params.compose(SAMPLING + [override])), "cpu")
        assert common2 != common
    else:
        common2 = common
    assert first_key(common2, prompt, seed) != first_key(common)


def test_key_is_stable_and_knows_nothing_of_the_adapter(fields):
    p, common = fields
    assert first_key(base_cache.run_fields(p, "cpu")) == first_key(common)
    assert first_key(common, scale=2.0) != first_key(common)  # other text encoders or T5 quantization
    assert first_key(common, batch_size=1) != first_key(common)  # a batch of one differs in the last bit
    adapter = params.validate(params.compose(SAMPLING + ["lora.rank=8", "train.steps=300", "sample.adapter_step=2",
                                                         "sample.lora_scales=[0.0,1.0]", "sample.base_cache=false"]))
    assert base_cache.run_fields(adapter, "cpu") == common


def test_folder_identity_is_the_content_not_the_path(tmp_path):
    from stages.models import flux

    a = Path(flux.resolve_base(params.validate(params.compose([])).model)) / "transformer"
    shutil.copytree(a, tmp_path / "copy")  # e.g. the tiny model rebuilt in a temp experiment's copy
    assert stagecache.folder_identity(tmp_path / "copy") == stagecache.folder_identity(a)
    (tmp_path / "copy" / "config.json").write_text("{}")
    assert stagecache.folder_identity(tmp_path / "copy") != stagecache.folder_identity(a)


def test_root_from_a_temp_experiment_is_the_main_repos(tmp_path, monkeypatch):
    """`dvc exp run --temp` / queued runs work in <repo>/.dvc/tmp/exps/<name>: a relative cache
    path is the main repo's, with or without DVC_ROOT; the default is outside any checkout."""
    repo = tmp_path / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("FLUXIMP_STAGE_CACHE", ".cache/stage")
    assert stagecache.root() == repo.resolve() / ".cache/stage"
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert stagecache.root() == repo.resolve() / ".cache/stage"
    monkeypatch.delenv("FLUXIMP_STAGE_CACHE")
    monkeypatch.setenv("FLUXIMP_CACHE", "shared")
    assert stagecache.root() == repo.resolve() / "shared" / "stage-cache"
    monkeypatch.delenv("FLUXIMP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert stagecache.root() == tmp_path / "home/.cache/flux-impressionism/stage-cache"
    monkeypatch.chdir(repo)
    assert stagecache.root() == tmp_path / "home/.cache/flux-impressionism/stage-cache"


def test_unwritable_cache_only_warns(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FLUXIMP_STAGE_CACHE", str(blocker))
    stagecache.put("kind", "ab" * 32, {"x": 1}, b"payload")
    assert "could not write" in caplog.text
    assert stagecache.get("kind", "ab" * 32) is None


def test_an_edit_of_the_render_code_misses(fields, tmp_path, monkeypatch):
    p, common = fields
    for src in base_cache.CODE:
        (tmp_path / src).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(stagecache.CODE_ROOT / src, tmp_path / src)
    monkeypatch.setattr(stagecache, "CODE_ROOT", tmp_path)
    assert base_cache.run_fields(p, "cpu") == common
    with open(tmp_path / "stages/models/render.py", "a") as fh:
        fh.write("\n# a faster sampler\n")
    assert first_key(base_cache.run_fields(p, "cpu")) != first_key(common)


def test_the_code_in_the_key_is_the_code_of_the_stages_that_render_base_images():
    """index.json names each base image's key, which follows CODE's source: an edit there must rerun
    sample (a dep), or the lock's outputs are not what the code now writes. Neither stage's own module is
    in it (an edit of the grid's scoring re-rendered every base image, and reran nothing in DVC)."""
    import yaml

    stages = yaml.safe_load((stagecache.CODE_ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("sample", "operating_point"):
        assert set(base_cache.CODE) <= set(stages[name]["deps"]), name
    assert not {"stages/sample.py", "stages/operating_point.py"} & set(base_cache.CODE)


@pytest.mark.slow
def test_compiled_sampling_within_one_grey_level(tmp_path, cache, counted):
    """sample.compile=true: the same images within one grey level, and never the eager run's base
    images from the cache (the switch is part of the key)."""
    import numpy as np
    import torch._dynamo
    from PIL import Image

    extra = ("sample.batch_size=4", "sample.lora_scales=[0.0,1.0]")
    eager = project(tmp_path / "eager", *extra)
    run_stage(sample.main, eager)
    compiled = tmp_path / "compiled"
    shutil.copytree(eager / "models", compiled / "models")
    counted.update(images=0)
    try:
        run_stage(sample.main, project(compiled, *extra, "sample.compile=true"))
    finally:
        torch._dynamo.reset()
    assert counted["images"] == 8  # base and LoRA rendered: the eager base images are not reused
    for name in (eager / "reports/samples/images").iterdir():
        a = np.asarray(Image.open(name), dtype=int)
        b = np.asarray(Image.open(compiled / "reports/samples/images" / name.name), dtype=int)
        assert np.abs(a - b).max() <= 1, name.name
    keys = [[im.get("base_key") for im in json.loads((r / "reports/samples/index.json").read_text())["images"]]
            for r in (eager, compiled)]
    assert keys[0] != keys[1]


@pytest.mark.slow
def test_vae_batches_follow_the_pipeline_calls_so_a_partial_miss_gives_cold_bytes(tmp_path, cache, counted,
                                                                                 monkeypatch):
    """The 24 GiB plan decodes up to 4 latents per VAE call; each pipeline call's latents are decoded together,
    so a base-cache miss (re-rendering whole calls) decodes exactly the batches a cold run decodes."""
    from stages.models import render

    calls = []
    real = render.decode
    monkeypatch.setattr(render, "decode", lambda vae, lat, h, w, batch=1: calls.append((len(lat), batch))
                        or real(vae, lat, h, w, batch))
    both = ("model.vram_gb=24", "sample.batch_size=2", "sample.lora_scales=[0.0,1.0]")
    ref = project(tmp_path / "ref", *both, "sample.seeds=[0,1,2]", "sample.base_cache=false")
    run_stage(sample.main, ref)  # 2 prompts x 3 seeds = 6 jobs: pipeline calls of 2, 2, 2
    assert calls == [(2, 4)] * 6  # per scale, one VAE call per pipeline call, with the plan's batch
    one = tmp_path / "one"
    shutil.copytree(ref / "models", one / "models")
    # seeds 0, 1: calls [(p0, s0), (p0, s1)] and [(p1, s0), (p1, s1)]; with seed 2 the calls are
    # [(p0, s0), (p0, s1)] (cached), [(p0, s2), (p1, s0)] and [(p1, s1), (p1, s2)] (rendered whole)
    run_stage(sample.main, project(one, *both, "sample.seeds=[0,1]"))
    calls.clear()
    write_params(one, *SAMPLING, *both, "sample.seeds=[0,1,2]")
    run_stage(sample.main, one)
    assert calls == [(2, 4)] * 2 + [(2, 4)] * 3  # base: the 2 calls missing; LoRA: all 3
    assert base_files(outputs(one)) == base_files(outputs(ref))
    assert outputs(one) == outputs(ref)
