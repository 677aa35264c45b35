"""The real FLUX.1-dev path at real size on emulated 8 / 12 / 16 / 24 GiB cards (needs a CUDA GPU).

Builds once per machine a FLUX.1-dev-shaped pipeline folder with random weights from the real
configs (transformer 11.9B with guidance embeds, T5 v1.1 XXL encoder, CLIP ViT-L/14 text model,
the Flux VAE with 16 latent channels, FLUX.1-dev's scheduler; offline tokenizers), then runs the
stages' own ``main()`` (encode, train, sample, evaluate) on a small curated set (8 + 2 synthetic
1024² images), each stage in its own process, with the card emulated by
``torch.cuda.set_per_process_memory_fraction`` and ``model.vram_gb`` set to the card. Memory and
speed depend on shapes, not on weights. Tracking is off (``FLUXIMP_MLFLOW=0``); dvc is not needed.

In the same run: the transformer load through the project (cold: quantized while loading; cached:
read from the quantize-once cache) beside diffusers' documented low-memory recipe
(``BitsAndBytesConfig`` nf4 while loading; sampling with 8-bit T5, with and without
``enable_model_cpu_offload``), the anchor ANCHORS.md names.

    python benchmarks/bench_real_path.py run --base /tmp/flux-dev-shaped --cards 8,12,16,24 --out reports/bench

writes ``real_path.jsonl`` (one JSON object per stage and card: stage, card_gib, vram_peak_gib,
vram_reserved_gib, host_rss_gib, seconds, ok, and per-stage timings) and ``real_path.md``.
``--phases`` limits a run to some of ``load,peer,stages`` (a lease is short: the jsonl is appended,
so runs can be split; ``report`` rewrites the table from the jsonl).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GIB = 2 ** 30
STAGES = ("encode", "train", "sample", "evaluate")


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


# ----------------------------------------------------------------------------- the folder
def build(path: Path) -> dict:
    """FLUX.1-dev-shaped FluxPipeline with random bf16 weights, saved like the hub folder."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from stages.core import compat
    from stages.models.flux import _tiny_tokenizers

    compat.ensure_torchvision()
    clip_tok, t5_tok = _tiny_tokenizers()
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)  # FLUX.1-dev's defaults
        t5 = T5EncoderModel(T5Config(  # google/t5-v1_1-xxl
            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
            pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id))
        clip = CLIPTextModel(CLIPTextConfig(  # openai/clip-vit-large-patch14 text tower
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id))
        vae = AutoencoderKL(  # FLUX.1-dev's VAE
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
            latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
            shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    torch.set_default_dtype(torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
    built = time.time() - t0
    t0 = time.time()
    pipe.save_pretrained(path, safe_serialization=True)
    sizes = {c: round(sum(f.stat().st_size for f in (path / c).iterdir()) / GIB, 2)
             for c in ("transformer", "text_encoder", "text_encoder_2", "vae")}
    return {"phase": "build", "built_s": round(built, 1), "saved_s": round(time.time() - t0, 1), "GiB": sizes}


# ----------------------------------------------------------------------------- a project
def project(root: Path, base: Path, card: int, steps: int) -> Path:
    """A scratch project for one card: params.yaml (flux-dev settings at 1024², nf4, rank 16,
    batch 1; model.vram_gb = the card), a one-prompt file and 8 + 2 curated 1024² images."""
    import numpy as np
    import yaml
    from PIL import Image

    from stages.core import params, shards

    root.mkdir(parents=True, exist_ok=True)
    raw = params.Params().model_dump()
    raw["model"].update(base=str(base), quantization="auto", vram_gb=card)
    raw["lora"].update(rank=16)
    raw["train"].update(resolution=1024, batch_size=1, steps=steps, lr=1e-4, warmup_steps=0, buckets=False,
                        max_sequence_length=512, gradient_checkpointing=True, checkpoint_every=steps,
                        validate_every=0)
    raw["sample"].update(prompts="prompts.txt", seeds=[0, 1], steps=4, guidance=3.5, lora_scales=[0.0, 1.0],
                         resolution=1024, batch_size=1)
    raw["clip"].update(model="ViT-L-14", pretrained=None, batch_size=16)
    raw["eval"].update(trait_size=256, kid_subset_size=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params.validate(raw).model_dump()))
    (root / "prompts.txt").write_text("a harbour at dawn with fishing boats\n")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("holdout", 2)):
        rows = []
        for i in range(n):
            yy, xx = np.mgrid[0:1024, 0:1024]
            base_col = rng.uniform(60, 220, 3)
            arr = base_col + 30 * np.sin(xx[..., None] / rng.uniform(5, 40) + rng.uniform(0, 6, 3)) \
                + rng.normal(0, 12, (1024, 1024, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(arr, 0, 255).astype("uint8")).save(buf, "PNG")
            data = buf.getvalue()
            rows.append({"id": hashlib.sha256(data).hexdigest(), "image": data, "format": "png", "width": 1024,
                         "height": 1024, "caption": f"a painting of a harbour number {i}, impressionism style"})
        shards.write_shards(rows, root / "data" / "curated" / split, shard_rows=64)
    return root


# ----------------------------------------------------------------------------- one stage
def stage(name: str, root: Path, card: int, variant: str = "") -> dict:
    """Run ``stages.<name>.main()`` in this process (cwd = the project) under a ``card`` GiB limit.
    ``variant`` (tokens joined by ``+``) changes the plan for a measurement: ``nooffload`` / ``offload`` (activation
    offload off / on in every plan); ``res=512``, ``sbatch=N``, ``ssteps=N``, ``seeds=N``, ``cmode=MODE``,
    ``attn=flash|cudnn``, ``keep=N`` (blocks not checkpointed); ``validate`` turns on
    validation images every 4 steps; ``cvae`` compiles the VAE's decoder where a stage loads it (the cost of
    its compile, cold and from the cache, inside the stage); ``flux-dev`` samples (and validates) the flux-dev profile's prompts,
    seeds and LoRA scales (its image counts: per-image costs measured, not extrapolated); ``grid`` saves a
    snapshot every 4 train steps and takes the flux-dev profile's operating-point grid; ``q=fp8`` / ``compile=0`` / ``cap=8.0`` set model.quantization,
    train/sample.compile and a pretended GPU generation; ``profile`` also writes
    profile-train-<card>.txt (see profile_train_steps) to $OUT or the project."""
    import dataclasses
    import shutil

    import torch
    import yaml

    from stages.models import memory

    tokens = variant.split("+") if variant else []
    for cls, plan in list(memory.PLANS.items()):
        if "nooffload" in tokens or "offload" in tokens:
            memory.PLANS[cls] = dataclasses.replace(plan, offload_activations="offload" in tokens)
    # key=value tokens override params: q (model.quantization), compile (train/sample.compile), cap (a GPU
    # generation to pretend: FLUXIMP_GPU_CAPABILITY, e.g. 8.0 for the Ampere fallback)
    settings = dict(t.split("=", 1) for t in tokens if "=" in t)
    if "cap" in settings:
        os.environ["FLUXIMP_GPU_CAPABILITY"] = settings["cap"]
    if "cmode" in settings:  # a torch.compile mode for the blocks, e.g. reduce-overhead (CUDA graphs)
        os.environ["FLUXIMP_COMPILE_MODE"] = settings["cmode"]
    if "attn" in settings:  # the attention kernel forced: flash | cudnn
        os.environ["FLUXIMP_ATTENTION"] = settings["attn"]
    if "keep" in settings:  # blocks not checkpointed forced (else what memory.kept_blocks gives the card)
        memory.kept_blocks = lambda pl, vram, per_block, n, k=int(settings["keep"]): min(n, k)
    if "cvae" in tokens:  # the VAE's decoder compiled in the stage (its graphs in the project's compile cache)
        from stages.models import compiling, flux as flux_models

        real_vae = flux_models.load_vae

        def compiled_vae(*a, **k):
            vae = real_vae(*a, **k)
            compiling.configure_cache()
            vae.decoder.compile()
            return vae

        flux_models.load_vae = compiled_vae

    cuda = torch.cuda.is_available()  # without one: a dry run of the driver on the tiny model
    os.environ["FLUXIMP_VRAM_LIMIT_GIB"] = str(card)  # what the memory preflight sees as free
    if cuda:
        torch.cuda.set_per_process_memory_fraction(min(1.0, card * GIB / torch.cuda.get_device_properties(0).total_memory))
    os.chdir(root)
    from stages.core import paths
    from stages.models import flux, render

    timings: dict = {}

    def timed(mod, attr, key):
        real = getattr(mod, attr)

        def wrapper(*a, **k):
            if key == "denoise_s" and "warm" in tokens:  # compile / first-call costs out of the timing
                real(*a, **k)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = real(*a, **k)
            if cuda:
                torch.cuda.synchronize()
            timings[key] = round(timings.get(key, 0) + time.perf_counter() - t0, 2)
            timings.setdefault(key.replace("_s", "_calls_s"), []).append(round(time.perf_counter() - t0, 3))
            if key == "denoise_s":  # images in the timed calls (what an experiment's fixed cost is net of)
                timings["denoise_images"] = timings.get("denoise_images", 0) + len(a[1])
                timings.setdefault("denoise_images_calls", []).append(len(a[1]))
            return out
        setattr(mod, attr, wrapper)

    from stages.core import params as params_lib

    real_load = params_lib.load

    def load(path=None):
        p = real_load(path)
        # the card emulated, in any card's project (a card above the classes: auto, FLUXIMP_VRAM_LIMIT_GIB caps it)
        train, model, sample = {}, {"vram_gb": card if card in memory.CARDS else "auto"}, {}
        if "validate" in tokens:  # in-training validation images every 4 steps (the train.validate_every knob)
            train["validate_every"] = 4
        if "flux-dev" in tokens:  # the flux-dev profile's image counts: its prompts (sample, validation), seeds, scales
            prof = yaml.safe_load((REPO / "conf/profile/flux-dev.yaml").read_text())["sample"]
            shutil.copyfile(REPO / prof["prompts"], "prompts-flux-dev.txt")
            sample.update(prompts="prompts-flux-dev.txt", seeds=prof["seeds"], batch_size=prof["batch_size"],
                          lora_scales=params_lib.Sample().lora_scales)
        grid = {}
        if "grid" in tokens:  # a snapshot every 4 steps (the grid's step axis) and the flux-dev profile's grid
            train.update(save_every=4, keep_last=0)
            grid = yaml.safe_load((REPO / "conf/profile/flux-dev.yaml").read_text())["eval"]["grid"]
        if "q" in settings:
            model["quantization"] = settings["q"]
        if "seeds" in settings:
            sample["seeds"] = list(range(int(settings["seeds"])))
        if "ssteps" in settings:
            sample["steps"] = int(settings["ssteps"])
        if "sbatch" in settings:
            sample["batch_size"] = int(settings["sbatch"])
        if "res" in settings:  # another resolution (run encode with it first: the cache is per resolution)
            train["resolution"] = sample["resolution"] = int(settings["res"])
        if "compile" in settings:
            train["compile"] = sample["compile"] = settings["compile"] in ("1", "true", "on")
        return p.model_copy(update={"train": p.train.model_copy(update=train),
                                    "model": p.model.model_copy(update=model),
                                    "sample": p.sample.model_copy(update=sample),
                                    "eval": p.eval.model_copy(update={"grid": p.eval.grid.model_copy(update=grid)})})

    params_lib.load = load
    if "profile" in tokens:
        profile_train_steps(Path(os.environ.get("FLUXIMP_BENCH_OUT", root)) / f"profile-{name}-{card}.txt")
    real_estimate = memory.estimate

    def estimate(stage_name, *a, **k):  # what the card's plan gave: blocks kept out of checkpointing
        need = real_estimate(stage_name, *a, **k)
        if stage_name == "train":
            timings["kept_blocks"] = need.kept_blocks
        return need

    memory.estimate = estimate
    timed(flux, "load_transformer", "transformer_load_s")
    timed(flux, "load_text_encoders", "text_encoders_load_s")
    timed(render, "denoise", "denoise_s")
    from stages.models import validation

    timed(validation.Validator, "render", "validation_s")  # one call per validation (its images, PNGs, MLflow)
    module = __import__(f"stages.{name}", fromlist=["main"])
    # where the rest of a sampling stage goes (an experiment's fixed costs): prompt embeddings, the base-image
    # cache, the VAE (with the PNGs it overlaps), the output files and sheets, the grid's scoring, MLflow
    from stages.core import tracking
    from stages.models import base_cache

    timed(render, "embed_prompts", "embed_s")
    timed(base_cache, "lookup", "cache_read_s")
    timed(tracking, "log_artifacts", "mlflow_s")
    for attr, key in (("decode_pngs", "decode_s"), ("write_samples", "write_s"), ("measure", "measure_s"),
                      ("write_outputs", "write_s")):
        if hasattr(module, attr):
            timed(module, attr, key)
    if name == "operating_point":
        timed(render, "decode", "decode_s")
    out = {"stage": name + (f"-{variant}" if variant else ""), "card_gib": card}
    t0 = time.perf_counter()
    try:
        module.main()
        out["ok"] = True
    except BaseException as err:  # an OOM is a result, not a crash of the bench
        out["ok"], out["error"] = False, f"{type(err).__name__}: {str(err)[-300:]}"
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out.update(timings)
    try:  # where the first step's compile time went (dynamo, AOTAutograd, inductor), into stage_logs.txt
        from torch._dynamo.utils import compile_times

        print(compile_times(repr="str", aggregate=True), file=sys.stderr)
    except Exception as err:  # noqa: BLE001 - a report, never a failure of the bench
        print(f"compile_times: {err}", file=sys.stderr)
    if cuda:
        out["vram_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        out["vram_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
    out["host_rss_gib"] = round(rss_gib(), 2)
    if cuda:
        out["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    if name == "train" and out["ok"]:
        rows = [ln.split("\t") for ln in paths.Train().timings.read_text().splitlines()]
        col = rows[0].index("step_time")
        out["s_per_step"] = steady_step_time([float(r[col]) for r in rows[1:]])
        out["first_step_s"] = float(rows[1][col])  # compile (when on) + the first step
        out["quantization"] = json.loads(Path("models/lora/adapter.json").read_text()).get("quantization")
    if name == "evaluate" and out["ok"]:  # what it scored (the samples of the last sample row that finished)
        out["images"] = len(json.loads(Path("reports/samples/index.json").read_text())["images"])
    if name == "sample" and out["ok"]:
        images = len(json.loads(Path("reports/samples/index.json").read_text())["images"])
        out["s_per_image"] = round(timings.get("denoise_s", 0) / images, 2)
        idx = json.loads(Path("reports/samples/index.json").read_text())
        last = timings.get("denoise_calls_s", [0])[-1]  # the last LoRA scale: its images x steps denoising steps
        out["s_per_denoise_step"] = round(last / (timings.get("denoise_images_calls", [1])[-1] * idx["steps"]), 4)
    return out


def profile_train_steps(path: Path, first: int = 3, count: int = 3) -> None:
    """Variant ``profile``: the model the train stage built (module types, dtypes, LoRA, autocast) and a
    torch.profiler table of steps ``first`` .. ``first + count - 1``, written to ``path``: where does
    the stage's step spend its time compared with bench_gpu_train's step on a model built in place?"""
    import collections

    import torch
    from torch.profiler import ProfilerActivity, profile

    from stages.models import trainer

    real = trainer.Trainer.step
    state = {"n": 0}

    def step(self, batches, step_no):
        if state["n"] == 0:
            model = self.transformer
            kinds = collections.Counter(type(m).__name__ for m in model.modules())
            dtypes = collections.Counter(f"{p.dtype}/{p.device.type}/{'grad' if p.requires_grad else 'frozen'}"
                                         for p in model.parameters())
            q = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
            with open(path, "a") as fh:
                fh.write(f"base_dtype {self.base_dtype} autocast {self.autocast} device {self.device}\n"
                         f"modules {dict(kinds.most_common(15))}\nparams {dict(dtypes)}\n")
                if q:
                    w = q[0].weight
                    fh.write(f"Linear4bit[0] compute_dtype {q[0].compute_dtype} weight {w.dtype} {tuple(w.shape)} "
                             f"quant_state dtype {getattr(w.quant_state, 'dtype', None)} blocksize "
                             f"{getattr(w.quant_state, 'blocksize', None)} nested {getattr(w.quant_state, 'nested', None)}\n")
        state["n"] += 1
        if state["n"] - 1 != first:
            return real(self, batches, step_no)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.time()
            out = real(self, batches, step_no)
            for k in range(1, count):
                real(self, batches, step_no + k)  # extra steps (repeats the batch; timing only)
            wall = (time.time() - t0) / count
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events) / 1e6 / count
        with open(path, "a") as fh:
            fh.write(f"# profile: wall {wall:.3f} s/step, GPU busy {gpu:.3f} s/step\n")
            fh.write(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70) + "\n")
            fh.write(events.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=70) + "\n")
        return out

    trainer.Trainer.step = step


# ----------------------------------------------------------------------------- loads and the recipe
def warm_up() -> None:
    """Imports and the CUDA context, before any clock starts (the same for ours and the recipe)."""
    import accelerate  # noqa: F401
    import bitsandbytes  # noqa: F401
    import diffusers  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from stages.core import compat

    compat.ensure_torchvision()
    from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: F401
    from transformers import T5EncoderModel  # noqa: F401

    torch.zeros(1, device="cuda")


def load(kind: str, base: Path) -> dict:
    """The project's transformer load: ``cold`` (quantize while loading, cache emptied first) or
    ``cached`` (the quantize-once cache)."""
    import shutil

    import torch

    from stages.core.params import Model
    from stages.models import flux, quant_cache

    warm_up()
    if kind == "cold":
        shutil.rmtree(quant_cache.root(), ignore_errors=True)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    flux.load_transformer(Model(base=str(base), quantization="nf4"), device="cuda")
    torch.cuda.synchronize()
    return {"stage": f"load-{kind}", "card_gib": None, "ok": True, "seconds": round(time.perf_counter() - t0, 1),
            "vram_peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
            "vram_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2), "host_rss_gib": round(rss_gib(), 2)}


def t5_options(base: Path) -> dict:
    """T5-XXL as stored (bf16) vs int8 (the 8 GiB class) vs nf4: load time, peak VRAM, prompts/s
    and how far the quantized embeddings are from the bf16 ones (on random weights: errors compound
    through 24 random layers, so this bounds the arithmetic rather than real text)."""
    import torch

    from stages.core.params import Model
    from stages.models import flux

    warm_up()
    prompts = [f"a harbour at dawn with fishing boats, number {i}, impressionism style" for i in range(8)]
    out, embeds = {"stage": "t5-options", "card_gib": None, "ok": True}, {}
    for mode in ("none", "int8", "nf4"):
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        pipe = flux.load_text_encoders(Model(base=str(base)), device="cuda", text_quantization=mode)
        torch.cuda.synchronize()
        out[f"{mode}_load_s"] = round(time.perf_counter() - t0, 1)
        t1 = time.perf_counter()
        with torch.no_grad():
            e = pipe.encode_prompt(prompt=prompts, prompt_2=prompts, device="cuda", max_sequence_length=512)[0]
        torch.cuda.synchronize()
        out[f"{mode}_prompts_per_s"] = round(len(prompts) / (time.perf_counter() - t1), 1)
        out[f"{mode}_vram_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        embeds[mode] = e.float().cpu()
        del pipe
        torch.cuda.empty_cache()
    a = embeds["none"].flatten(1)
    for mode in ("int8", "nf4"):
        b = embeds[mode].flatten(1)
        out[f"{mode}_cosine_to_bf16"] = round(float(torch.nn.functional.cosine_similarity(a, b).mean()), 4)
        out[f"{mode}_rel_l2_diff"] = round(float((a - b).norm() / a.norm()), 4)
    out["host_rss_gib"] = round(rss_gib(), 2)
    return out


def vae_decode(base: Path, images: int = 32, batch: int = 8) -> dict:
    """Phase ``vae``: the sampling stages' decode (stages.models.render.decode, the plan's VAE batch) of
    ``images`` 1024² latents as shipped, with the VAE in channels-last memory, and with its decoder
    compiled (first call apart): seconds per image, and what the host-side pixels of diffusers' own
    postprocess cost against the uint8 pixels made on the GPU (render.to_pil)."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from stages.core.params import Model
    from stages.models import flux, render

    warm_up()
    vae = flux.load_vae(Model(base=str(base)), device="cuda")
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(1, 4096, 64, generator=g, dtype=torch.bfloat16) for _ in range(images)]
    out = {"stage": "vae-decode", "card_gib": None, "ok": True, "images": images, "vae_batch": batch}

    def timed(key):
        render.decode(vae, latents[:batch], 1024, 1024, batch)  # warm-up (cuDNN autotune, a compile)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        render.decode(vae, latents, 1024, 1024, batch)
        out[f"{key}_s_per_image"] = round((time.perf_counter() - t0) / images, 4)

    timed("shipped")
    x = torch.rand(batch, 3, 1024, 1024, device="cuda", dtype=vae.dtype) * 2 - 1
    for key, fn in (("host_postprocess", lambda: VaeImageProcessor(vae_scale_factor=16).postprocess(x, output_type="pil")),
                    ("gpu_postprocess", lambda: render.to_pil(x))):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        out[f"{key}_s_per_image"] = round((time.perf_counter() - t0) / batch, 4)
    vae.to(memory_format=torch.channels_last)
    timed("channels_last")
    try:
        vae.decoder.compile()
        timed("compiled")
    except Exception as err:  # noqa: BLE001 - a result
        out["compiled_error"] = f"{type(err).__name__}: {str(err)[-200:]}"
    out["vram_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    return out


def peer(kind: str, base: Path) -> dict:
    """diffusers' documented low-memory recipe on the same folder (what a user would pick instead)."""
    import torch
    from diffusers import BitsAndBytesConfig as DiffusersBnb, FluxPipeline, FluxTransformer2DModel
    from transformers import BitsAndBytesConfig as TransformersBnb, T5EncoderModel

    warm_up()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    nf4 = DiffusersBnb(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    transformer = FluxTransformer2DModel.from_pretrained(base, subfolder="transformer", torch_dtype=torch.bfloat16,
                                                         quantization_config=nf4)
    out = {"stage": f"recipe-{kind}", "card_gib": None, "ok": True, "load_s": round(time.perf_counter() - t0, 1)}
    if kind != "load":
        t5 = T5EncoderModel.from_pretrained(base, subfolder="text_encoder_2", dtype=torch.bfloat16,
                                            quantization_config=TransformersBnb(load_in_8bit=True))
        pipe = FluxPipeline.from_pretrained(base, transformer=transformer, text_encoder_2=t5, dtype=torch.bfloat16)
        if kind == "sample-offload":
            pipe.enable_model_cpu_offload()
        else:
            pipe.to("cuda")
        pipe.set_progress_bar_config(disable=True)
        out["load_s"] = round(time.perf_counter() - t0, 1)
        t1 = time.perf_counter()
        with torch.no_grad():
            pipe(prompt=["a harbour at dawn"], num_inference_steps=4, guidance_scale=3.5, height=1024, width=1024,
                 max_sequence_length=512, generator=torch.Generator("cpu").manual_seed(0))
        torch.cuda.synchronize()
        out["s_per_image"] = round(time.perf_counter() - t1, 2)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["vram_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    out["vram_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
    out["host_rss_gib"] = round(rss_gib(), 2)
    return out


def steady_step_time(times: list[float]) -> float:
    """The median of a run's ``step_time`` column after two warm-up steps and without the last step. The
    train stage times a step from when the step before was seen finished, and sees a step finished only
    after it has launched the next one (stages.models.trainer.StepPipeline); the last step has no next
    one, so its time is only what the GPU had left when the host got there (0.02 s against 0.30 s in
    2026-12-03 call 20). Rows before that call kept it in the median: a little low (0.310 against 0.316)."""
    steady = times[2:-1] if len(times) > 3 else times[-1:]
    return round(statistics.median(steady), 3)


# ----------------------------------------------------------------------------- one whole experiment
def experiment(rows: list[dict], card: int, evaluate_s: float) -> list[tuple[str, float, str]]:
    """Minutes of one ``dvc exp run`` on the flux-dev profile for ``card``, after a first run filled the
    caches, from the measured ``rows``: (phase, minutes, how it was obtained). The train figures come from
    the card's last train row (the last: warm caches), the time per denoising step from its last sample row
    with ``warm`` (an untimed call first: no compile in it; rows rendering the plan's images per call,
    ``sbatch=N``, before any other), the sample stage's fixed cost from its last
    sample row without ``warm`` (caches filled by an earlier row, as in a second experiment: loads, the
    first call's compile-cache reads, VAE, PNGs, grids), preferring one with the profile's image counts
    (``flux-dev``), and validation from a ``validate+flux-dev`` train row where there is one. The counts come
    from conf/profile/flux-dev.yaml; evaluate from an ``evaluate`` row with ``flux-dev`` (after such a sample row).
    """
    import yaml

    prof = yaml.safe_load((REPO / "conf/profile/flux-dev.yaml").read_text())
    tr, sp, grid = prof["train"], prof["sample"], prof["eval"]["grid"]
    prompts = [ln for ln in (REPO / sp["prompts"]).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    from stages.core.params import Grid, Sample, Train

    scales, vsteps = Sample().lora_scales, Train().validation_steps
    train = [r for r in rows if r.get("stage") == "train" and r.get("card_gib") == card and r.get("s_per_step")]
    sample = [r for r in rows if str(r.get("stage", "")).startswith("sample") and r.get("card_gib") == card
              and r.get("ok") and r.get("denoise_calls_s")]
    from stages.models.memory import PLANS

    # rows at the images per call the card's plan renders with now (sbatch=N) first: the rate depends on it
    batch = f"sbatch={PLANS[card].sample_batch}" if card in PLANS else None
    sample = sorted(sample, key=lambda r: batch in r["stage"].split("-", 1)[-1].split("+"))  # stable: the last wins
    warm = [r for r in sample if "warm" in r["stage"]]
    if not train or not warm:
        return []
    t, denoise = train[-1], warm[-1]["s_per_denoise_step"]
    # a second experiment's start: quantize-once and compile caches filled (rows of fresh machines are cold)
    first = min(train, key=lambda r: r["transformer_load_s"] + r["first_step_s"])
    lora_images = len(prompts) * len(sp["seeds"]) * sum(1 for x in scales if x > 0)
    cold = [r for r in sample if "warm" not in r["stage"] and r.get("denoise_images")]
    # the profile's counts with the base images read from the cache (a second experiment): a row that also
    # rendered its base images (a changed render code, a fresh machine) pays for 80 more VAE decodes and PNGs
    full = [r for r in cold if "flux-dev" in r["stage"].split("-", 1)[-1].split("+")
            and r["denoise_images"] == lora_images]
    if cold:  # everything but the rendering of its images at the warm rate (and the text encoders: cached)
        s = (full or cold)[-1]  # a run with the profile's image counts: its per-image costs (VAE, PNGs, grids) in
        fixed = net_of_denoising(s, denoise, sp["steps"])
        fixed_how = (f"fixed {fixed:.0f} s measured (a sample run with warm caches, "
                     + (f"the profile's {s['denoise_images']} LoRA images)" if full else
                        f"{s['denoise_images']} images: the per-image VAE/PNG/grid costs of 160 not in it)"))
    else:  # an older bench: the warm row's untimed first call (the compile) stays in the fixed cost
        s = warm[-1]
        fixed = s["seconds"] - s.get("text_encoders_load_s", 0) - s.get("denoise_s", 0)
        fixed_how = f"fixed {fixed:.0f} s measured (cold compile cache)"
    ops = [r for r in rows if str(r.get("stage", "")).startswith("operating_point") and r.get("card_gib") == card
           and r.get("ok") and r.get("denoise_images")]
    if ops:  # the grid stage (snapshots, CLIP/style models, bootstrap): the quickest run (warm caches, as in a
        # second experiment; the first grid run of a machine also compiles its shapes and embeds its prompts)
        quick = min(ops, key=lambda r: net_of_denoising(r, denoise, sp["steps"]))
        grid_fixed = net_of_denoising(quick, denoise, sp["steps"])
        grid_how = (f"extrapolated from s per denoising step; fixed {grid_fixed:.0f} s measured (the quickest of "
                    f"{len(ops)} grid runs: call {quick.get('call', '?')}, {quick['denoise_images']} images)")
    else:
        grid_fixed, grid_how = fixed, "extrapolated (grid not run at real size: the sample stage's fixed cost)"
    snapshots = len(range(tr["save_every"], tr["steps"] + 1, tr["save_every"]))
    grid_steps = min(snapshots, prof["train"]["keep_last"])
    grid_images = grid_steps * len(grid["scales"]) * grid["prompts"] * len(grid.get("seeds", Grid().seeds))
    events = tr["steps"] // tr["validate_every"]
    validations = events * len(prompts)
    val = [r for r in rows if str(r.get("stage", "")).startswith("train-") and r.get("card_gib") == card
           and r.get("ok") and r.get("validation_calls_s") and "flux-dev" in r["stage"].split("-", 1)[1].split("+")]
    if val:  # measured with the profile's prompts: the first call (its no-grad graphs compiled), then the others
        calls = val[-1]["validation_calls_s"]
        later = statistics.mean(calls[1:]) if len(calls) > 1 else calls[0]
        val_min, val_how = (calls[0] + (events - 1) * later) / 60, (
            f"measured: {calls[0]:.1f} s the first, {later:.1f} s each later one (images, PNGs; MLflow off)")
    else:
        val_min, val_how = validations * vsteps * denoise / 60, "extrapolated from the sample stage's s per denoising step"
    ev = [r for r in rows if str(r.get("stage", "")).startswith("evaluate-") and r.get("card_gib") == card
          and r.get("ok") and r.get("images") == len(prompts) * len(sp["seeds"]) * len(scales)]
    if ev:  # after a flux-dev sample row: the profile's 240 images scored; the last row has the held-out caches warm
        evaluate_s, ev_how = ev[-1]["seconds"], (f"measured: the profile's {len(prompts) * len(sp['seeds']) * len(scales)}"
                                                 f" images (call {ev[-1].get('call', '?')}, its {len(ev)}. evaluate row)")
    else:
        ev_how = "measured 2026-12-01 with 4 images (reports/bench/real_path.md)"
    m = 60.0
    return [
        ("train: load + first step", (first["transformer_load_s"] + first["first_step_s"]) / m,
         f"measured: the quickest of {len(train)} train rows (call {first.get('call', '?')}: warm caches when an earlier "
         "train row of its call filled them)"),
        (f"train: {tr['steps'] - 1} more steps x {t['s_per_step']} s ({t.get('quantization')}, "
         f"{t.get('kept_blocks', 0)} blocks not recomputed)", (tr["steps"] - 1) * t["s_per_step"] / m,
         "extrapolated from s/step"),
        (f"validation: {validations} images x {vsteps} steps", val_min, val_how),
        (f"operating point: {grid_images} LoRA images x {sp['steps']} steps + fixed",
         (grid_images * sp["steps"] * denoise + grid_fixed) / m, grid_how),
        ("sample: base images", 0.0, "base-image cache (first run: + the base images)"),
        (f"sample: {lora_images} LoRA images x {sp['steps']} steps + fixed", (lora_images * sp["steps"] * denoise + fixed) / m,
         f"extrapolated from {denoise} s per denoising step; {fixed_how}"),
        ("evaluate", evaluate_s / m, ev_how),
    ]


def net_of_denoising(row: dict, denoise: float, default_steps: int) -> float:
    """A stage row's seconds but the text encoders (cached prompts in an experiment) and its images denoised
    at the warm rate ``denoise`` (s per step and image; ``ssteps=N`` in the row's variant, else
    ``default_steps``): what the stage costs besides its images' denoising."""
    steps = int(row["stage"].partition("ssteps=")[2].split("+")[0] or default_steps)
    return row["seconds"] - row.get("text_encoders_load_s", 0) - row["denoise_images"] * steps * denoise


def experiment_report(paths: list[Path], cards: list[int], evaluate_s: float) -> str:
    rows = [json.loads(ln) for p in paths for ln in p.read_text().splitlines() if ln.strip()]
    out = []
    for card in cards:
        phases = experiment(rows, card, evaluate_s)
        if not phases:
            out.append(f"{card} GiB: no train + sample rows")
            continue
        out += [f"## {card} GiB class", "", "| phase | minutes | how |", "|---|---:|---|"]
        out += [f"| {name} | {mins:.1f} | {how} |" for name, mins, how in phases]
        core = sum(mins for name, mins, _ in phases if not name.startswith("operating point"))
        out += [f"| **train + validation + sample + evaluate** | **{core:.1f}** | |",
                f"| **with the operating-point grid** | **{core + phases[3][1]:.1f}** | |", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- driver and report
def fresh(root: Path) -> None:
    """No checkpoint of an earlier train run in the project: every train row trains all its steps."""
    import shutil

    for sub in ("models", "reports/train"):
        shutil.rmtree(root / sub, ignore_errors=True)


def run_killable(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    """``cmd`` in its own process group, killed with the bench: a SIGTERM to the bench (``timeout`` ending a
    segment of a device call) kills the phase too. Without this the phase ran on as an orphan and shared the
    GPU with the next rows of the call (2026-12-03, calls 9 and 10)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)

    def stop(signum, frame):
        os.killpg(proc.pid, signal.SIGKILL)  # the group this call started (the phase and what it spawned)
        proc.wait()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        out, err = proc.communicate()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def child(args: list[str], env: dict, logs: Path | None = None) -> dict:
    """One phase in a fresh process (peak RSS and VRAM are per process); its last line is JSON. The
    process's log (stderr, its last 150 lines) is appended to ``logs``."""
    proc = run_killable([sys.executable, __file__, *args], env)
    if logs is not None:
        with open(logs, "a") as fh:
            fh.write(f"===== {' '.join(args)} (exit {proc.returncode})\n")
            fh.write("\n".join(proc.stderr.splitlines()[-150:]) + "\n")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    return {"stage": args[1], "ok": False, "error": (proc.stderr or proc.stdout)[-600:], "card_gib": None}


def report(rows: list[dict], path: Path, command: str) -> None:
    def g(r, k, fmt="{}"):
        return fmt.format(r[k]) if r.get(k) is not None else "—"

    lines = ["# The real path at real size (FLUX.1-dev shapes, random weights)", "",
             f"Command: `{command}`", "",
             "Each row is one process. Cards are emulated with `torch.cuda.set_per_process_memory_fraction`; "
             "`model.vram_gb` = the card. 1024², nf4, rank 16, batch 1, 512 T5 tokens.", "",
             "| stage | card GiB | ok | VRAM peak alloc GiB | VRAM peak reserved GiB | host RSS peak GiB | seconds | "
             "transformer load s | s/step | s/image | note |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("phase") == "build":
            continue
        lines.append(f"| {r['stage']} | {g(r, 'card_gib')} | {'yes' if r.get('ok') else '**no**'} | "
                     f"{g(r, 'vram_peak_gib')} | {g(r, 'vram_reserved_gib')} | {g(r, 'host_rss_gib')} | "
                     f"{g(r, 'seconds')} | {g(r, 'transformer_load_s') if 'transformer_load_s' in r else g(r, 'load_s')} | "
                     f"{g(r, 's_per_step')} | {g(r, 's_per_image')} | {r.get('error', '')[:120]} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--base", type=Path, default=Path("/tmp/flux-dev-shaped"))
    r.add_argument("--work", type=Path, default=Path("/tmp/real-path"))
    r.add_argument("--cards", default="8,12,16,24")
    r.add_argument("--steps", type=int, default=8)
    r.add_argument("--phases", default="load,peer,t5,stages")
    r.add_argument("--stages", default=",".join(STAGES))
    r.add_argument("--variants", default="", help="extra train runs in that card's project (else the first card's), "
                                                  "LIMIT:VARIANT (24:nooffload = unconstrained; 24: = that plan uncapped)")
    r.add_argument("--out", type=Path, default=REPO / "reports" / "bench")
    sub.add_parser("build").add_argument("dir", type=Path)
    s = sub.add_parser("stage")
    s.add_argument("name", choices=STAGES + ("operating_point",))
    s.add_argument("root", type=Path)
    s.add_argument("card", type=int)
    s.add_argument("variant", nargs="?", default="")
    for n in ("load", "peer", "t5", "vae"):
        x = sub.add_parser(n)
        x.add_argument("kind")
        x.add_argument("base", type=Path)
    e = sub.add_parser("experiment", help="minutes of one flux-dev experiment per card, from measured rows")
    e.add_argument("rows", type=Path, nargs="+")
    e.add_argument("--cards", default="80,24,8")
    e.add_argument("--evaluate-s", type=float, default=23.1)
    rep = sub.add_parser("report")
    rep.add_argument("--out", type=Path, default=REPO / "reports" / "bench")
    a = ap.parse_args()

    if a.cmd == "build":
        print(json.dumps(build(a.dir)), flush=True)
    elif a.cmd == "stage":
        print(json.dumps(stage(a.name, a.root, a.card, a.variant)), flush=True)
    elif a.cmd == "load":
        print(json.dumps(load(a.kind, a.base)), flush=True)
    elif a.cmd == "t5":
        print(json.dumps(t5_options(a.base)), flush=True)
    elif a.cmd == "peer":
        print(json.dumps(peer(a.kind, a.base)), flush=True)
    elif a.cmd == "vae":
        print(json.dumps(vae_decode(a.base)), flush=True)
    elif a.cmd == "experiment":
        print(experiment_report(a.rows, [int(c) for c in a.cards.split(",")], a.evaluate_s))
    elif a.cmd == "report":
        rows = [json.loads(ln) for ln in (a.out / "real_path.jsonl").read_text().splitlines() if ln.strip()]
        report(rows, a.out / "real_path.md", "python benchmarks/bench_real_path.py run (see the jsonl)")
    else:
        a.out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "FLUXIMP_MLFLOW": "0", "FLUXIMP_PROGRESS": "0", "HF_HUB_OFFLINE": "1",
               "FLUXIMP_QUANT_CACHE": str(a.work / "qcache"), "FLUXIMP_CACHE": str(a.work / "cache"),
               "FLUXIMP_BENCH_OUT": str(a.out.resolve())}
        jsonl = a.out / "real_path.jsonl"
        logs = a.out / "stage_logs.txt"

        def emit(row):
            print(json.dumps(row), flush=True)
            with open(jsonl, "a") as fh:
                fh.write(json.dumps(row) + "\n")

        if not (a.base / "model_index.json").exists():
            emit(child(["build", str(a.base)], env))
        phases = a.phases.split(",")
        if "load" in phases:
            for kind in ("cold", "cached"):
                emit(child(["load", kind, str(a.base)], env))
        if "peer" in phases or "peer-load" in phases:
            for kind in ("load", "sample", "sample-offload") if "peer" in phases else ("load",):
                emit(child(["peer", kind, str(a.base)], env))
        if "t5" in phases:
            emit(child(["t5", "both", str(a.base)], env))
        if "vae" in phases:
            emit(child(["vae", "decode", str(a.base)], env))
        cards = [int(c) for c in a.cards.split(",")]
        if "stages" in phases:
            import shutil

            for card in cards:
                root = project(a.work / f"card-{card}", a.base, card, a.steps)
                for name in a.stages.split(","):
                    if name == "train":
                        fresh(root)
                    if name == "sample":  # worst case: the prompt embeddings are not cached yet
                        shutil.rmtree(a.work / "qcache" / "prompt-embeddings", ignore_errors=True)
                    emit(child(["stage", name, str(root), str(card)], env, logs))
        for v in filter(None, a.variants.split(",")):  # after the stages: they need the encode cache
            limit, _, v = v.rpartition(":")
            name, _, v = v.rpartition("/")  # "sample/q=fp8": another stage than train
            root = a.work / f"card-{limit}"  # the project of that card (its plan), else the first card's
            root = root if (root / "params.yaml").exists() else a.work / f"card-{cards[0]}"
            if (name or "train") == "train":
                fresh(root)
            emit(child(["stage", name or "train", str(root), limit or str(cards[0]), v], env, logs))
        rows = [json.loads(ln) for ln in jsonl.read_text().splitlines() if ln.strip()]
        report(rows, a.out / "real_path.md", "python benchmarks/bench_real_path.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
