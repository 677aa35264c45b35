"""Load a checkpoint into a model block by block, quantizing each block on its way to the device.

``from_pretrained`` followed by quantization materialises the whole bf16 model on the host first
(19.7 GiB RSS for FLUX.1-dev's transformer). Here the model is built empty from its config (meta
tensors, ``accelerate.init_empty_weights``), then for each repeated block only that block's
tensors are read from the safetensors shards, straight onto the device, quantized there
(``stages.models.quant.quantize_block``) and the full-precision copy dropped. Host memory stays
near one block; device memory near the quantized model plus one block. The same code loads the
tiny random model on CPU in the tests and FLUX.1-dev / T5-XXL on a GPU.

Works for diffusers models (``FluxTransformer2DModel``) and transformers models
(``T5EncoderModel``): ``block_lists`` names the repeated blocks (``transformer_blocks``,
``encoder.block``); everything else (embedders, norms) is loaded unquantized.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from stages.models import quant

log = logging.getLogger(__name__)


class WeightsError(SystemExit):
    """A checkpoint folder that cannot be loaded (clear message, clean exit)."""


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (sharded or single-file checkpoints)."""
    from safetensors import safe_open

    folder = Path(folder)
    for index in sorted(folder.glob("*.safetensors.index.json")):
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder}: no .safetensors weights (only safetensors checkpoints can be "
                           "streamed; convert .bin weights with save_pretrained(safe_serialization=True))")
    where = {}
    for f in files:
        with safe_open(f, "pt") as fh:
            where.update({name: f for name in fh.keys()})
    return where


def device_name(device: torch.device) -> str:
    """What safetensors accepts: ``cpu`` (never ``cpu:0``, which accelerate hands out) or ``cuda:N``."""
    device = torch.device(device)
    return "cpu" if device.type == "cpu" else str(device)


def read(names: Iterable[str], where: dict[str, Path], device: torch.device,
         dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """The named tensors, read file by file onto ``device`` (floats cast to ``dtype``). Each file is
    opened only for these names and closed again, so no more than them stays mapped."""
    from safetensors import safe_open

    by_file = defaultdict(list)
    for n in names:
        by_file[where[n]].append(n)
    out = {}
    for file, ns in by_file.items():
        with safe_open(file, "pt", device=device_name(device)) as fh:
            for n in ns:
                t = fh.get_tensor(n)
                out[n] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def empty_model(model_cls, folder: Path) -> nn.Module:
    """``model_cls`` built from the config in ``folder`` with meta tensors (no memory)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        if hasattr(model_cls, "load_config"):  # diffusers ModelMixin
            model = model_cls.from_config(model_cls.load_config(folder))
        else:  # transformers PreTrainedModel
            model = model_cls._from_config(model_cls.config_class.from_pretrained(folder))
    return model


def assign(model: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put loaded tensors in place of the model's (meta) parameters and buffers, in the tensors' own
    dtype: without ``dtype=`` accelerate casts each value to the empty model's dtype (float32), which
    left a bf16 load's norms and embedders in float32 and made the trainer run the whole transformer
    in float32 (2.5 s instead of 1.0 s per nf4 1024² step on an H200: reports/bench/real_path.md)."""
    from accelerate.utils import set_module_tensor_to_device

    for name, t in tensors.items():
        set_module_tensor_to_device(model, name, device, value=t, dtype=t.dtype)


def block_prefixes(model: nn.Module, block_lists: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """``("transformer_blocks.0.", block), ...`` for every repeated block."""
    out = []
    for path in block_lists:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        out += [(f"{path}.{i}.", b) for i, b in enumerate(obj or [])]
    return out


def finish(model: nn.Module, folder: Path) -> nn.Module:
    """Tie weights, refuse a model with parameters the checkpoint did not provide, freeze."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise WeightsError(f"{folder}: the checkpoint lacks {len(missing)} tensors of "
                           f"{type(model).__name__} (e.g. {missing[:3]}): is it the right model folder?")
    model.requires_grad_(False)
    return model.eval()


def load(model_cls, folder: Path | str, *, mode: str, device, dtype: torch.dtype,
         block_lists: Iterable[str], load_block: Optional[Callable] = None,
         on_block: Optional[Callable] = None) -> nn.Module:
    """Stream ``folder`` (a ``save_pretrained`` folder of ``model_cls``) into a model on ``device``
    with its blocks quantized per ``mode`` (``none`` | ``nf4`` | ``int8`` | ``fp8``).

    ``load_block(prefix, block, device)`` replaces reading a block from the checkpoint, and
    ``on_block(prefix, block)`` sees each block once it is quantized (the quantize-once cache
    uses them to read and to save quantized blocks)."""
    folder, device = Path(folder), torch.device(device)
    quant.check_supported(mode, device)
    model = empty_model(model_cls, folder)
    where = weight_files(folder)
    blocks = block_prefixes(model, block_lists)
    count = 0
    for prefix, block in blocks:
        if load_block is not None:
            load_block(prefix, block, device)
            continue
        tensors = read([n for n in where if n.startswith(prefix)], where, device, dtype)
        assign(model, tensors, device)
        del tensors
        if mode != "none":
            count += quant.quantize_block(block, mode, device, dtype)
        if on_block is not None:
            on_block(prefix, block)
    prefixes = tuple(p for p, _ in blocks)
    wanted = set(model.state_dict(keep_vars=True))  # tied weights under every name
    rest = [n for n in where if not n.startswith(prefixes) and n in wanted]
    assign(model, read(rest, where, device, dtype), device)
    if count:
        log.info("quantized %d linear layers of %s to %s on %s while loading", count, model_cls.__name__,
                 mode, device)
    return finish(model, folder)
