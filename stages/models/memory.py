"""What fits on the user's card: one knob, ``model.vram_gb``, picks the memory-saving settings.

``model.vram_gb`` is ``auto`` (the GPU's total memory, rounded down to a card class) or one of
the classes 8 / 12 / 16 / 24 / 40 / 80. Each class is a :class:`Plan`, measured at real size on FLUX.1-dev's
shapes (benchmarks/bench_real_path.py, reports/bench/real_path.md, reports/bench/speed.md):

| class | cards | T5-XXL in encode/sample | train: checkpointed block inputs | text batch | VAE decode batch | images per transformer call (``sample.batch_size: auto``) | validation images per call |
|---|---|---|---|---|---|---|---|
| 8  | RTX 3070/4060 | int8 weight-only (torchao), quantized while loading (4.6 GiB instead of 8.9) | offloaded to pinned host memory | 4 | 1 | 2 | 1 |
| 12 | RTX 3060/4070 | bf16 | on the GPU | 4 | 2 | 2 | 1 |
| 16 | RTX 4080, A4000 | bf16 | on the GPU; offloaded with the fp8 base (:func:`with_base`) | 16 | 2 | 2 | 1 |
| 24 | RTX 3090/4090, A10, L4 | bf16 | on the GPU | 32 | 4 | 4 | 1 |
| 40 | A100 40GB, A6000, L40S | bf16 | on the GPU | 32 | 8 | 8 | 1 |
| 80 | A100/H100 80GB, H200 | bf16 | on the GPU | 32 | 8 | 8 | 4 |

(Sampling at 1024² on an fp8 base, H200, reports/bench/speed.md: 8 images per call 0.1048 s per denoising step
and image at 20.2 GiB reserved, 4 per call 0.107-0.109 s at 13.6 GiB, 2 per call 0.115 s at 11.9 GiB.)

The larger the class, the more blocks train without gradient checkpointing (:func:`kept_blocks`): at
1024² on an fp8 base, 9 of FLUX.1-dev's 57 at 24 GiB, about 30 at 40 GiB, all of them at 80 GiB.

(The VAE decodes one 1024² image in about 1.5 GiB of activations; with the VAE alone on the device, the
batch only has to fit beside the allocator's slack. No class tiles: at 1024² the 8 GiB class's sample
stage peaks at 6.4 GiB, reports/bench/speed.md.)

Independent of the class, every stage keeps one large model on the GPU at a time (encode: text
encoders, then the VAE; sample: text encoders, then the transformer, then the VAE), the
transformer is quantized while loading (never materialised in bf16 on the host) and, for nf4,
read from the quantize-once cache after the first run (stages.models.quant_cache).

On a machine without CUDA, ``auto`` is the unconstrained plan (nothing quantized or offloaded
beyond ``model.quantization``); a class given explicitly applies there too, which is how the
tests exercise the low-memory paths on CPU.

:func:`preflight` estimates a stage's peak GPU memory and host RAM from the base's file sizes
before anything is loaded and stops with the knob to change when they do not fit.
"""
from __future__ import annotations

import dataclasses

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

log = logging.getLogger(__name__)
GIB = 2 ** 30
CARDS = (8, 12, 16, 24, 40, 80)
# bytes of a quantized weight relative to its bf16 checkpoint (nf4: 4 bits + absmax; torchao: 8 bits)
QUANT_FACTOR = {"none": 1.0, "nf4": 0.27, "int8": 0.52, "fp8": 0.52}


class MemoryError_(SystemExit):
    """A stage that will not fit (clear message naming the knob, clean exit)."""


@dataclass(frozen=True)
class Plan:
    card_gib: Optional[int]          # the class planned for; None = unconstrained (CPU, auto)
    text_encoder_quantization: str   # "none" | "int8" | "nf4": T5 in encode and sample
    offload_activations: bool        # train: checkpointed block inputs in pinned host memory
    text_batch: int                  # prompts per T5 call
    vae_batch: int = 1               # latents per VAE decode call (sample, operating point)
    sample_batch: int = 2            # sample.batch_size: auto, images per transformer call (sample, operating point)
    # images per transformer (and VAE) call of train's validation, beside the training state: more than one
    # only where the class leaves room after every block kept out of recompute (80 GiB: 31 GiB reserved)
    validation_batch: int = 1

    def describe(self) -> str:
        card = f"{self.card_gib} GiB card" if self.card_gib else "no memory limit"
        return (f"{card}: T5 {self.text_encoder_quantization if self.text_encoder_quantization != 'none' else 'as stored'}, "
                f"activation offload {'on' if self.offload_activations else 'off'}, text batch {self.text_batch}")


PLANS = {
    8: Plan(8, "int8", True, 4, vae_batch=1, sample_batch=2),
    12: Plan(12, "none", False, 4, vae_batch=2, sample_batch=2),
    16: Plan(16, "none", False, 16, vae_batch=2, sample_batch=2),
    24: Plan(24, "none", False, 32, vae_batch=4, sample_batch=4),
    # 8 images per sampling call from 40 GiB: 0.1048 s per denoising step and image against 0.1093 at 4,
    # 20.2 GiB reserved (H200, fp8, 1024², 2026-12-03 call 18)
    40: Plan(40, "none", False, 32, vae_batch=8, sample_batch=8),
    80: Plan(80, "none", False, 32, vae_batch=8, sample_batch=8, validation_batch=4),
}
# the CPU: one image per VAE call, as before; 8 images per transformer call (the smoke profile's batch)
UNCONSTRAINED = Plan(None, "none", False, 32, vae_batch=1, sample_batch=8)


def card_class(total_bytes: int) -> int:
    """The largest class a card of ``total_bytes`` holds (a "12 GB" card reports ~11.6 GiB, an 80 GB
    one ~79.2 GiB)."""
    gib = total_bytes / GIB + max(0.6, 0.03 * total_bytes / GIB)
    fits = [c for c in CARDS if c <= gib]
    return fits[-1] if fits else CARDS[0]


def plan(model_params, device: Optional[torch.device] = None) -> Plan:
    """The plan of the card class (``model.vram_gb``, or the device's) for the base ``model.quantization``
    resolves to there (``auto`` too: every caller gets the same plan, resolved params or not)."""
    pl = class_plan(model_params, device)
    mode = getattr(model_params, "quantization", "none")
    if mode == "auto":
        mode = quantization(model_params, device) if device is not None else "none"
    return with_base(pl, mode)


def class_plan(model_params, device: Optional[torch.device] = None) -> Plan:
    """The card class's plan, whatever the base."""
    setting = getattr(model_params, "vram_gb", "auto")
    if setting != "auto":
        return PLANS[int(setting)]
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return UNCONSTRAINED
    total = torch.cuda.get_device_properties(device).total_memory
    if os.environ.get("FLUXIMP_VRAM_LIMIT_GIB"):  # an emulated smaller card (benchmarks)
        total = min(total, float(os.environ["FLUXIMP_VRAM_LIMIT_GIB"]) * GIB)
    return PLANS[card_class(int(total))]


# the classes where the fp8 base (~11 GiB of weights) leaves no room for the block inputs autograd saves:
# they go to pinned host memory (16 GiB: 12.6 GiB reserved, 4.1 GiB host RAM, measured)
FP8_OFFLOAD_CLASSES = (16,)


def with_base(pl: Plan, quantization_mode: str) -> Plan:
    """``pl`` for the transformer base ``quantization_mode`` (resolved): the fp8 base on a 16 GiB card
    trains with activation offload."""
    if pl.card_gib in FP8_OFFLOAD_CLASSES and quantization_mode == "fp8":
        return dataclasses.replace(pl, offload_activations=True)
    return pl


# ----------------------------------------------------------------------------- model.quantization: auto
BF16_MIN_GIB = 40  # a class this large holds the bf16 base (24.9 GiB reserved training at 1024², measured) with room


def pick_quantization(card_gib: Optional[int], capability: tuple[int, int]) -> str:
    """The fastest transformer base that fits, by card class and GPU generation (train step at 1024²,
    rank 16; measured on an H200, reports/bench/speed.md, 2026-12-03):

    - 8 and 12 GiB classes: nf4 (the only base that fits with room for activations);
    - 16 GiB and up with fp8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell): fp8
      compute (stages.models.fp8), 0.407 s/step at 24 GiB, faster than the bf16 base (0.480) even where
      it fits; at 16 GiB with activation offload (:func:`with_base`): 0.485-0.501 s/step against nf4's
      0.639 on the same card class (12.6 and 12.5 GiB reserved, 2026-12-03 calls 22-23);
    - 16 GiB without them: nf4;
    - without them (Ampere: RTX 3090, A100, A6000): the bf16 base (``none``) from the
      :data:`BF16_MIN_GIB` GiB class up (0.480 s/step against nf4's 0.591, measured with the Ampere
      fallback forced on the H200), else nf4. torchao int8 weight-only trains about 2x slower than
      compiled nf4 (reports/bench/gpu_train.md)."""
    if card_gib is not None and card_gib <= 12:
        return "nf4"
    if tuple(capability) >= (8, 9):
        return "fp8"
    return "none" if card_gib is None or card_gib >= BF16_MIN_GIB else "nf4"


def capability(device: torch.device) -> tuple[int, int]:
    """The GPU's compute capability; ``FLUXIMP_GPU_CAPABILITY=8.0`` pretends another (benchmarks:
    the Ampere fallback measured on a Hopper card)."""
    forced = os.environ.get("FLUXIMP_GPU_CAPABILITY")
    if forced:
        major, _, minor = forced.partition(".")
        return int(major), int(minor or 0)
    return torch.cuda.get_device_capability(device)


def quantization(model_params, device) -> str:
    """``model.quantization`` with ``auto`` resolved for ``device`` (CPU: none)."""
    mode = model_params.quantization
    if mode != "auto":
        return mode
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "none"
    return pick_quantization(class_plan(model_params, device).card_gib, capability(device))


def resolve(p, device):
    """``p`` with ``model.quantization: auto`` and ``sample.batch_size: auto`` replaced by what this device
    gets (logged once): what the stage loads and renders with, and what its checkpoints, adapter.json, the
    sample index and the base-image keys record."""
    mode = quantization(p.model, device)
    if mode != p.model.quantization:
        if torch.device(device).type == "cuda":
            cap = capability(device)
            log.info("model.quantization auto -> %s (%s, compute capability %d.%d)", mode,
                     plan(p.model, device).describe().split(":")[0], cap[0], cap[1])
        else:
            log.info("model.quantization auto -> %s (no GPU)", mode)
        p = p.model_copy(update={"model": p.model.model_copy(update={"quantization": mode})})
    if p.sample.batch_size == "auto":
        batch = plan(p.model, device).sample_batch
        log.info("sample.batch_size auto -> %d", batch)
        p = p.model_copy(update={"sample": p.sample.model_copy(update={"batch_size": batch})})
    return p


def configure_allocator(device: torch.device) -> None:
    """Expandable segments: reserved memory follows allocated memory instead of keeping
    fragmented blocks (what decides whether a stage fits an 8 GiB card)."""
    if device.type == "cuda" and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        try:
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        except (AttributeError, RuntimeError) as err:  # older torch: keep the default allocator
            log.debug("expandable segments unavailable: %s", err)


# ----------------------------------------------------------------------------- estimates
@dataclass
class Need:
    vram: int
    host: int
    what: str
    kept_blocks: int = 0  # train: blocks whose activations stay on the GPU instead of being recomputed


# train: the activations one block keeps for its backward when it is not checkpointed, in units of one
# block input (tokens x hidden x 2 bytes). Measured on FLUX.1-dev's shapes at 1024² (H200, 2026-12-03,
# reports/bench/speed.md): 0.35 GiB a double block with fp8 (12 units; 9 kept: 14.1 -> 17.2 GiB reserved),
# 0.39 GiB with nf4 (14 units; 6 kept at the 16 GiB class: 10.1 -> 12.5 GiB). Counted twice that, so a
# count no bench has run stays well inside its class. What the class leaves free beside the estimate,
# less SLACK of the card, is what the kept blocks may use.
ACTIVATIONS_PER_BLOCK = 24
SLACK = 0.1


def kept_blocks(pl: Plan, vram: int, per_block: int, n_blocks: int) -> int:
    """How many blocks may skip gradient checkpointing (no recompute in the backward) on ``pl``'s card
    when the rest of training needs ``vram``: none without a card class, with activation offload
    (the 8 GiB class) or when the class has no room left."""
    if pl.card_gib is None or pl.offload_activations or per_block <= 0:
        return 0
    room = pl.card_gib * GIB * (1 - SLACK) - vram
    return max(0, min(n_blocks, int(room // per_block)))


def tokens(resolution: int, seq: int) -> int:
    """Tokens the transformer attends over for one image: latent patches + text."""
    return (resolution // 16) ** 2 + seq


def estimate(stage: str, sizes: dict[str, int], hidden: int, n_blocks: int, p, pl: Plan) -> Need:
    """Peak GPU memory and host RAM of ``stage`` from the components' bf16 file sizes
    (``sizes``), the transformer's hidden size and block count, and the params. Calibrated on
    the real-size bench (reports/bench/real_path.md); deliberately a little pessimistic."""
    q = p.model.quantization
    tr = sizes.get("transformer", 0) * QUANT_FACTOR[q]
    t5 = sizes.get("text_encoder_2", 0) * QUANT_FACTOR[pl.text_encoder_quantization]
    clip, vae = sizes.get("text_encoder", 0), sizes.get("vae", 0)
    host_base = 3 * GIB  # torch + CUDA libraries + one streamed block
    res = p.train.resolution
    pixels = res * res
    vae_act = 1400 * pixels  # VAE encode/decode working set at bf16, bytes per pixel (measured)
    text_act = pl.text_batch * p.train.max_sequence_length * 4096 * 2 * 12
    if stage == "encode":
        return Need(int(max(t5 + clip + text_act, vae + vae_act)), host_base, "T5 + CLIP, then the VAE")
    if stage == "train":
        n = tokens(res, p.train.max_sequence_length) * p.train.batch_size
        # what autograd keeps between forward and backward (block inputs and the like), and one
        # checkpointed block's recompute + backward: 2.9 and 1.0 GiB for FLUX.1-dev at 1024²
        saved = 0 if pl.offload_activations else 2 * n_blocks * n * hidden * 2
        work = 36 * n * hidden * 2
        lora_state = 16 * 20e6 * max(1, p.lora.rank / 16)
        vram = int(tr + saved + work + lora_state)
        per_block = ACTIVATIONS_PER_BLOCK * n * hidden * 2
        keep = kept_blocks(pl, vram, per_block, n_blocks) if p.train.gradient_checkpointing else 0
        return Need(vram + keep * per_block, host_base + 2 * n_blocks * n * hidden * 2,
                    "the quantized transformer + training activations", kept_blocks=keep)
    if stage in ("sample", "operating_point"):  # the grid renders as sample does
        sres = p.sample.resolution
        n = tokens(sres, p.train.max_sequence_length) * p.sample.batch_size
        return Need(int(max(t5 + clip + text_act, tr + 24 * n * hidden * 2, vae + 1400 * sres * sres)),
                    host_base, "T5 + CLIP, then the transformer, then the VAE")
    return Need(2 * GIB, host_base, "CLIP for the metrics")


def host_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check(need: Need, stage: str, pl: Plan, device: torch.device, vram_free: Optional[int] = None,
          host_free: Optional[int] = None) -> None:
    """Stop before loading when ``need`` does not fit, naming the knob that would make it fit."""
    host_free = host_available() if host_free is None else host_free
    if need.host > host_free:
        raise MemoryError_(
            f"{stage} needs about {need.host / GIB:.1f} GiB of host RAM ({need.what}); "
            f"{host_free / GIB:.1f} GiB is available: close other programs, or lower train.resolution / "
            "train.batch_size")
    if device.type != "cuda":
        return
    if vram_free is None:
        vram_free = torch.cuda.mem_get_info(device)[0]
        if os.environ.get("FLUXIMP_VRAM_LIMIT_GIB"):
            vram_free = min(vram_free, int(float(os.environ["FLUXIMP_VRAM_LIMIT_GIB"]) * GIB))
    if need.vram > vram_free:
        smaller = [c for c in CARDS if c < (pl.card_gib or 10 ** 6)]
        hint = (f"set model.vram_gb={smaller[-1] if smaller else CARDS[0]} (or auto) to trade speed for memory"
                if pl.card_gib != CARDS[0] else
                "lower train.resolution / sample.resolution or train.batch_size; model.quantization=nf4 is the "
                "smallest base")
        raise MemoryError_(
            f"{stage} needs about {need.vram / GIB:.1f} GiB of GPU memory with model.vram_gb="
            f"{pl.card_gib or 'auto'} ({need.what}); {vram_free / GIB:.1f} GiB is free: {hint}")
