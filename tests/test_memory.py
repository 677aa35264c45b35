"""The small-card path (issue 13) on the tiny model: streamed and cached quantized loads give the
weights of the plain path, the cache is reused and invalidated correctly, rendering one model at a
time gives FluxPipeline's images, sample loads no text encoder once embeddings exist, activation
offload trains the same adapter, and the memory preflight names the knob."""
import os
import shutil

import numpy as np
import pytest
import torch

from stages.core import params
from stages.core.params import Model
from stages.models import flux, memory, quant, quant_cache, render, streaming


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return flux.build_tiny_random(tmp_path_factory.mktemp("tiny") / "flux")


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXIMP_QUANT_CACHE", str(tmp_path / "qcache"))
    return tmp_path / "qcache"


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_streamed_load_equals_from_pretrained(tiny):
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    ref = FluxTransformer2DModel.from_pretrained(tiny, subfolder="transformer")
    assert same_state(flux.load_transformer(Model(base=str(tiny)), device="cpu"), ref)
    old_nf4 = quant.quantize(FluxTransformer2DModel.from_pretrained(tiny, subfolder="transformer"), "nf4", "cpu")
    streamed = streaming.load(FluxTransformer2DModel, tiny / "transformer", mode="nf4", device="cpu",
                              dtype=torch.float32, block_lists=quant.BLOCK_LISTS)
    assert quant.quantized_linears(streamed) == quant.quantized_linears(old_nf4) > 0
    assert same_state(streamed, old_nf4)
    t5 = T5EncoderModel.from_pretrained(tiny, subfolder="text_encoder_2")
    assert same_state(flux.load_text_encoders(Model(base=str(tiny)), device="cpu").text_encoder_2, t5)


def test_streamed_load_names_missing_tensors(tiny, tmp_path):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "transformer"
    shutil.copytree(tiny / "transformer", folder)
    f = next(folder.glob("*.safetensors"))
    t = load_file(f)
    save_file({k: v for k, v in t.items() if not k.startswith("proj_out")}, f)
    with pytest.raises(streaming.WeightsError, match="lacks .*proj_out"):
        streaming.load(FluxTransformer2DModel, folder, mode="none", device="cpu", dtype=torch.float32,
                       block_lists=quant.BLOCK_LISTS)


def test_quantize_once_cache_is_reused_and_invalidated(tiny, tmp_path, cache_root, monkeypatch):
    base = tmp_path / "base"
    shutil.copytree(tiny, base)
    m = Model(base=str(base), quantization="nf4")
    first = flux.load_transformer(m, device="cpu")
    entries = sorted(p.name for p in cache_root.iterdir())
    assert len(entries) == 1 and (cache_root / entries[0] / "meta.json").exists()

    calls = []
    real = streaming.read
    monkeypatch.setattr(streaming, "read", lambda names, *a, **k: calls.append(list(names)) or real(names, *a, **k))
    second = flux.load_transformer(m, device="cpu")
    assert same_state(first, second)
    assert not any(n.startswith("transformer_blocks.") for c in calls for n in c), "blocks re-read from bf16"

    # another quantization is another key (int8 is not cached: the nf4 entry stays untouched)
    assert quant_cache.key(base / "transformer", "nf4", torch.float32) != \
        quant_cache.key(base / "transformer", "int8", torch.float32)
    # the base's weights change (a new revision downloaded, a retrained base): a new entry replaces the old
    f = next((base / "transformer").glob("*.safetensors"))
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10 ** 9))
    calls.clear()
    flux.load_transformer(m, device="cpu")
    assert any(n.startswith("transformer_blocks.") for c in calls for n in c)
    after = sorted(p.name for p in cache_root.iterdir())
    assert len(after) == 1 and after != entries
    # another base folder gets its own entry
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    flux.load_transformer(Model(base=str(other), quantization="nf4"), device="cpu")
    assert len(list(cache_root.iterdir())) == 2


def float_dtypes(model: torch.nn.Module) -> set:
    return {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}


def test_bf16_loads_keep_every_tensor_in_bf16(tiny, cache_root):
    """A bf16 load (the GPU default) leaves no float32 tensor behind: the trainer takes its compute
    dtype from the model, and one float32 norm made it run the whole step in float32 (2.5x slower)."""
    from diffusers import FluxTransformer2DModel

    ref = FluxTransformer2DModel.from_pretrained(tiny, subfolder="transformer", torch_dtype=torch.bfloat16)
    plain = flux.load_transformer(Model(base=str(tiny)), device="cpu", dtype=torch.bfloat16)
    assert float_dtypes(plain) == {torch.bfloat16} and same_state(plain, ref)
    for _ in range(2):  # first load fills the quantize-once cache, the second reads it
        nf4 = flux.load_transformer(Model(base=str(tiny), quantization="nf4"), device="cpu", dtype=torch.bfloat16)
        assert quant.quantized_linears(nf4) > 0 and float_dtypes(nf4) == {torch.bfloat16}
        assert quant.compute_dtype(nf4) == torch.bfloat16
    t5 = flux.load_text_encoders(Model(base=str(tiny)), device="cpu", dtype=torch.bfloat16).text_encoder_2
    assert float_dtypes(t5) == {torch.bfloat16}


def test_cache_write_failure_does_not_stop_the_load(tiny, cache_root, monkeypatch):
    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(quant_cache, "save_block", full_disk)
    model = flux.load_transformer(Model(base=str(tiny), quantization="nf4"), device="cpu")
    assert quant.quantized_linears(model) > 0
    assert not any(cache_root.glob("*/meta.json"))


def test_render_in_phases_gives_the_pipeline_images(tiny):
    m = Model(base=str(tiny))
    prompts, seeds = ["a harbour at dawn", "pears on a table"], [3, 4]
    pipe = flux.load_pipeline(m, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=prompts, num_inference_steps=2, guidance_scale=3.5, height=64, width=64,
               generator=[torch.Generator().manual_seed(s) for s in seeds], max_sequence_length=32).images
    embeds, pooled = render.embed_prompts(m, prompts, 32, memory.UNCONSTRAINED, device="cpu")
    tpipe = render.transformer_pipeline(m, flux.load_transformer(m, device="cpu"))
    latents = render.denoise(tpipe, embeds, pooled, seeds, steps=2, guidance=3.5, height=64, width=64, batch_size=2)
    vae = flux.load_vae(m, device="cpu")
    for batch in (1, 2):  # one latent per VAE call, or the plan's batch (Plan.vae_batch)
        images = render.decode(vae, latents, 64, 64, batch)
        assert len(images) == 2
        for a, b in zip(ref, images):
            diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
            assert diff.max() <= 1, diff.max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pixels_made_where_the_vae_ran_are_the_pipelines_bytes(dtype):
    from diffusers.image_processor import VaeImageProcessor

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 3, 40, 48, generator=g) * 0.7).to(dtype)  # some beyond [-1, 1]: clamped
    ties = (torch.arange(256, dtype=torch.float32) + 0.5) / 255 * 2 - 1  # 255 v lands on k + 0.5: ties to even
    x[0, 0, 0, :48] = ties[:48].to(dtype)
    ours = render.to_pil(x)
    ref = VaeImageProcessor(vae_scale_factor=16).postprocess(x, output_type="pil")
    assert [im.mode for im in ours] == ["RGB"] * 3 and ours[0].size == (48, 40)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, ref))


def test_prompt_embeddings_are_computed_once(tiny, cache_root, monkeypatch):
    m = Model(base=str(tiny))
    first = render.embed_prompts(m, ["a field of poppies"], 16, memory.UNCONSTRAINED, device="cpu")

    def no_text_encoders(*a, **k):
        raise AssertionError("the text encoders were loaded although the embeddings are cached")

    monkeypatch.setattr(flux, "load_text_encoders", no_text_encoders)
    again = render.embed_prompts(m, ["a field of poppies"], 16, memory.UNCONSTRAINED, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    with pytest.raises(AssertionError, match="were loaded"):  # another prompt is another key
        render.embed_prompts(m, ["a field of tulips"], 16, memory.UNCONSTRAINED, device="cpu")
    with pytest.raises(AssertionError, match="were loaded"):  # int8 T5 gives other embeddings
        render.embed_prompts(m, ["a field of poppies"], 16, memory.PLANS[8], device="cpu")


def test_activation_offload_trains_the_same_adapter(tiny):
    from stages.models import lora, offload
    from stages.models.cache import Batch
    from stages.models.trainer import Trainer

    p = params.Params()
    p.train.gradient_checkpointing = True
    gen = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 16, 32, generator=gen),
                  torch.randn(2, 32, generator=gen), ["a", "b"])
    adapters = []
    for off in (None, offload.Offloader(min_bytes=0)):
        t = Trainer(flux.load_transformer(Model(base=str(tiny)), device="cpu"), p.lora, p.train, seed=1,
                    device="cpu", offloader=off)
        for step in range(3):
            t.step([batch], step)
        adapters.append(lora.lora_state_dict(t.transformer))
    assert off.packed > 0, "the offload hooks never saw a tensor"
    a, b = adapters
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_card_classes_and_plans():
    gib = memory.GIB
    assert memory.card_class(int(11.6 * gib)) == 12  # a "12 GB" card
    assert memory.card_class(int(7.8 * gib)) == 8
    assert memory.card_class(int(23.6 * gib)) == 24 and memory.card_class(int(37 * gib)) == 24
    # A100 40GB (39.6 GiB), L40S (44.5), A6000 (47.5): 40; A100/H100 80GB (79.1), H200 (139.8): 80
    assert [memory.card_class(int(g * gib)) for g in (39.6, 44.5, 47.5, 79.1, 139.8)] == [40, 40, 40, 80, 80]
    assert memory.plan(Model(), torch.device("cpu")) == memory.UNCONSTRAINED  # auto on CPU
    small = memory.plan(Model(vram_gb=8))
    assert small.text_encoder_quantization == "int8" and small.offload_activations
    assert not memory.plan(Model(vram_gb=16)).offload_activations
    # the fp8 base fills a 16 GiB card: the saved block inputs go to host memory; not on larger classes
    assert memory.plan(Model(vram_gb=16, quantization="fp8")).offload_activations
    assert not memory.plan(Model(vram_gb=16, quantization="nf4")).offload_activations
    assert not memory.plan(Model(vram_gb=24, quantization="fp8")).offload_activations
    with pytest.raises(SystemExit, match="vram_gb"):
        params.validate({**params.Params().model_dump(), "model": {"vram_gb": 10}})


def test_preflight_names_the_knob():
    p = params.Params()
    p.model.quantization, p.train.resolution, p.train.max_sequence_length = "nf4", 1024, 512
    p.train.batch_size = 1
    sizes = {"transformer": int(22.2 * memory.GIB), "text_encoder_2": int(8.9 * memory.GIB),
             "text_encoder": int(0.23 * memory.GIB), "vae": int(0.16 * memory.GIB)}
    need = memory.estimate("train", sizes, 3072, 57, p, memory.PLANS[16])
    cuda = torch.device("cuda")
    with pytest.raises(SystemExit, match=r"model.vram_gb=12"):
        memory.check(need, "train", memory.PLANS[16], cuda, vram_free=int(9 * memory.GIB), host_free=64 * memory.GIB)
    small = memory.estimate("train", sizes, 3072, 57, p, memory.PLANS[8])
    assert small.vram < 8 * memory.GIB < need.vram
    memory.check(small, "train", memory.PLANS[8], cuda, vram_free=8 * memory.GIB, host_free=64 * memory.GIB)
    encode16 = memory.estimate("encode", sizes, 3072, 57, p, memory.PLANS[16])
    encode8 = memory.estimate("encode", sizes, 3072, 57, p, memory.PLANS[8])
    assert encode8.vram < 8 * memory.GIB < encode16.vram
    with pytest.raises(SystemExit, match="host RAM"):
        memory.check(small, "train", memory.PLANS[8], cuda, vram_free=8 * memory.GIB, host_free=memory.GIB)



def test_the_fp8_base_fits_a_16_gib_card_only_with_its_block_inputs_offloaded():
    """Measured at 12.6 GiB reserved with the offload (H200, 2026-12-03): the estimate says it fits the class
    with it, and leaves no room without it (the fp8 weights alone are ~11 GiB)."""
    p = params.Params()
    p.model.quantization, p.train.resolution, p.train.max_sequence_length, p.train.batch_size = "fp8", 1024, 512, 1
    sizes = {"transformer": int(22.2 * memory.GIB), "text_encoder_2": int(8.9 * memory.GIB),
             "text_encoder": int(0.23 * memory.GIB), "vae": int(0.16 * memory.GIB)}
    offloaded = memory.estimate("train", sizes, 3072, 57, p, memory.plan(p.model.model_copy(update={"vram_gb": 16})))
    on_gpu = memory.estimate("train", sizes, 3072, 57, p, memory.PLANS[16])
    assert 12.6 * memory.GIB <= offloaded.vram < 16 * 0.9 * memory.GIB < on_gpu.vram


def test_every_caller_gets_the_offload_of_the_base_auto_resolves_to(monkeypatch):
    """validate checks memory with params whose quantization is still ``auto``; train with resolved ones:
    on a 16 GiB card with fp8 tensor cores both must plan the offload that fp8 needs there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory, "capability", lambda device: (8, 9))
    cuda = torch.device("cuda")
    auto = Model(vram_gb=16, quantization="auto")
    assert memory.quantization(auto, cuda) == "fp8"
    assert memory.plan(auto, cuda).offload_activations
    assert memory.plan(Model(vram_gb=16, quantization="fp8"), cuda) == memory.plan(auto, cuda)
    monkeypatch.setattr(memory, "capability", lambda device: (8, 6))  # Ampere: nf4, nothing offloaded
    assert memory.quantization(auto, cuda) == "nf4" and not memory.plan(auto, cuda).offload_activations
    assert not memory.plan(auto).offload_activations  # no device: nothing resolved, the class's plan


def test_cache_key_follows_the_hub_revision(tmp_path):
    """Hub snapshots link each file to a blob named by its content hash: another revision of the
    same files (same names, same sizes) is another key."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    keys = []
    for rev, blob in (("rev-a", "1111"), ("rev-b", "2222")):
        (blobs / blob).write_bytes(b"x" * 64)
        snap = tmp_path / "snapshots" / rev / "transformer"
        snap.mkdir(parents=True)
        (snap / "diffusion_pytorch_model.safetensors").symlink_to(blobs / blob)
        (snap / "config.json").write_text("{}")
        for f in (blobs / blob, snap / "config.json"):
            os.utime(f, ns=(10 ** 18, 10 ** 18))  # same sizes, same times: only the blob differs
        keys.append(quant_cache.key(snap, "nf4", torch.bfloat16))
    assert keys[0] != keys[1]
    assert quant_cache.key(snap, "nf4", torch.bfloat16) == keys[1]  # stable


@pytest.mark.parametrize("card,cap,expected", [
    (8, (8, 9), "nf4"), (12, (9, 0), "nf4"),  # small cards: nf4 everywhere
    (16, (8, 9), "fp8"), (16, (9, 0), "fp8"), (16, (8, 6), "nf4"), (16, (8, 0), "nf4"),  # fp8 + offload: faster
    (24, (8, 9), "fp8"), (80, (9, 0), "fp8"), (80, (12, 0), "fp8"),  # fp8 tensor cores: fp8, large too
    (24, (8, 6), "nf4"), (24, (8, 0), "nf4"),  # Ampere below 40 GiB: nf4
    (40, (8, 0), "none"), (40, (8, 6), "none"), (80, (8, 0), "none"),  # A100 / A6000: bf16, faster
    (12, (7, 5), "nf4"), (24, (7, 5), "nf4"), (None, (8, 0), "none")])
def test_auto_quantization_per_card_class_and_generation(card, cap, expected):
    from stages.models.memory import pick_quantization

    assert pick_quantization(card, cap) == expected


def test_auto_resolves_to_none_without_a_gpu_and_explicit_modes_stay():
    from stages.core.params import Params
    from stages.models import memory

    p = Params()
    auto = p.model_copy(update={"model": p.model.model_copy(update={"quantization": "auto"})})
    assert memory.resolve(auto, torch.device("cpu")).model.quantization == "none"
    assert memory.resolve(p, torch.device("cpu")) is p  # nothing to resolve
    for mode in ("nf4", "int8", "fp8", "none"):
        assert memory.quantization(p.model.model_copy(update={"quantization": mode}), torch.device("cpu")) == mode


def test_forced_capability_pretends_another_generation(monkeypatch):
    from stages.models import memory

    monkeypatch.setenv("FLUXIMP_GPU_CAPABILITY", "8.0")
    assert memory.capability(torch.device("cpu")) == (8, 0)


def test_blocks_kept_out_of_checkpointing_fill_the_room_the_card_class_leaves():
    """train: where the class has room beside the estimate, that many blocks keep their activations
    (no recompute); none on the CPU, with activation offload, without checkpointing or without room."""
    sizes = {"transformer": int(22.2 * memory.GIB)}
    p = params.Params()
    p.train.resolution, p.train.max_sequence_length, p.train.batch_size = 1024, 512, 1
    p.train.gradient_checkpointing, p.model.quantization = True, "fp8"
    per_block = memory.ACTIVATIONS_PER_BLOCK * memory.tokens(1024, 512) * 3072 * 2
    plain = memory.estimate("train", sizes, 3072, 57, p, memory.PLANS[24])
    kept = plain.kept_blocks
    assert 4 <= kept < 19  # some of FLUX.1-dev's 19 double blocks on a 24 GiB card at 1024²
    base = plain.vram - kept * per_block
    assert base + kept * per_block <= 24 * memory.GIB * (1 - memory.SLACK) < base + (kept + 1) * per_block
    p.train.resolution = 512  # 3x fewer tokens: more blocks fit
    assert memory.estimate("train", sizes, 3072, 57, p, memory.PLANS[24]).kept_blocks > 2 * kept
    p.train.resolution = 1024
    p.model.quantization = "nf4"
    assert memory.estimate("train", sizes, 3072, 57, p, memory.PLANS[12]).kept_blocks == 0  # no room
    assert memory.estimate("train", sizes, 3072, 57, p, memory.PLANS[16]).kept_blocks > 0
    assert memory.estimate("train", sizes, 3072, 57, p, memory.PLANS[8]).kept_blocks == 0  # offload
    assert memory.estimate("train", sizes, 3072, 57, p, memory.UNCONSTRAINED).kept_blocks == 0  # CPU
    p.train.gradient_checkpointing = False
    assert memory.estimate("train", sizes, 3072, 57, p, memory.PLANS[24]).kept_blocks == 0
    assert memory.kept_blocks(memory.PLANS[24], 0, memory.GIB // 16, 57) == 57  # at most every block
    p.train.gradient_checkpointing = True
    p.model.quantization = "fp8"  # the larger classes: more blocks; at 80 GiB all (no recompute at all)
    counts = [memory.estimate("train", sizes, 3072, 57, p, memory.PLANS[c]).kept_blocks for c in (24, 40, 80)]
    assert counts[0] < counts[1] < counts[2] == 57, counts
    assert memory.estimate("train", sizes, 3072, 57, p, memory.PLANS[80]).vram <= 80 * memory.GIB * (1 - memory.SLACK)


def test_sample_batch_auto_follows_the_card_class_and_explicit_batches_stay():
    """``sample.batch_size: auto`` (the flux-dev profile): 2 images per transformer call on 8-16 GiB cards, 4
    at 24 GiB (0.107 against 0.115 s per denoising step at 1024², H200), 8 from 40 GiB (0.1048 against 0.1093),
    the smoke profile's 8 on the CPU."""
    p = params.Params()
    auto = p.model_copy(update={"sample": p.sample.model_copy(update={"batch_size": "auto"})})
    cpu = torch.device("cpu")
    assert memory.resolve(auto, cpu).sample.batch_size == 8
    for card, batch in ((8, 2), (12, 2), (16, 2), (24, 4), (40, 8), (80, 8)):
        sized = auto.model_copy(update={"model": auto.model.model_copy(update={"vram_gb": card})})
        assert memory.resolve(sized, cpu).sample.batch_size == batch, card
    assert memory.resolve(p, cpu) is p  # an explicit batch (and quantization): nothing to resolve
    with pytest.raises(ValueError, match="batch_size"):
        params.Sample(batch_size=0)
    assert params.Sample(batch_size="auto").batch_size == "auto"
