"""Quantize once: the nf4 / fp8 blocks of a base model, saved by the first run and read by later ones.

Quantizing FLUX.1-dev while loading streams 22 GiB of bf16 weights; the nf4 blocks are 6 GiB, the
fp8 ones 11. The first run that loads a base with ``model.quantization: nf4`` (or ``fp8``) saves each
quantized block (packed weights + bitsandbytes quant state, or e4m3 weights + row scales; one
safetensors file a block) to ``<root>/<name>-<key>/``;
later runs, every ``dvc exp run`` included (whatever folder it runs in), read those instead. The
small unquantized rest (embedders, norms) and the config still come from the base folder.

The key covers what the quantized weights are a function of: the checkpoint's files (names, sizes
and modification times; for a hub download, the content-addressed blob each file points to), the
mode, the compute dtype, bitsandbytes' version and this module's :data:`VERSION`. Another base,
revision or quantization gives another key, so a stale entry is never read; building a new entry
removes the other entries of the same model name and mode, so the cache holds one per model and mode. It is derived
from the base alone: not a DVC output, never committed.

Root: ``$FLUXIMP_QUANT_CACHE``, else ``$FLUXIMP_CACHE/quantized``, else
``~/.cache/flux-impressionism/quantized``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from stages.core.io import atomic_dir, write_json
from stages.models import quant, streaming

log = logging.getLogger(__name__)
VERSION = 2  # 2: non-quantized tensors kept in the compute dtype (1 stored them in float32)
CACHED_MODES = ("nf4", "fp8")  # torchao int8 quantizes quickly on the GPU and is not cached


def root() -> Path:
    if os.environ.get("FLUXIMP_QUANT_CACHE"):
        return Path(os.environ["FLUXIMP_QUANT_CACHE"])
    if os.environ.get("FLUXIMP_CACHE"):
        return Path(os.environ["FLUXIMP_CACHE"]) / "quantized"
    return Path.home() / ".cache" / "flux-impressionism" / "quantized"


def key(folder: Path, mode: str, dtype: torch.dtype) -> str:
    import bitsandbytes

    files = []
    for f in sorted(Path(folder).iterdir()):
        if f.suffix in (".safetensors", ".json"):
            real = f.resolve()  # hub snapshots link to blobs named by their content hash
            st = real.stat()
            files.append([f.name, real.name, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"v": VERSION, "files": files, "mode": mode, "dtype": str(dtype),
                       "bitsandbytes": bitsandbytes.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def entry(folder: Path, name: str, mode: str, dtype: torch.dtype) -> Path:
    return root() / f"{name}-{mode}-{key(folder, mode, dtype)}"


def _block_file(entry_dir: Path, prefix: str) -> Path:
    return entry_dir / f"{prefix.rstrip('.')}.safetensors"


def save_block(entry_dir: Path, prefix: str, block: nn.Module) -> None:
    from stages.core import tensorfiles

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
    tensorfiles.save(tensors, _block_file(entry_dir, prefix))


def load_block(entry_dir: Path, prefix: str, block: nn.Module, device: torch.device, dtype: torch.dtype,
               mode: str = "nf4") -> None:
    """Fill an empty (meta) block with the quantized tensors saved for it."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors.torch import load_file

    quant.empty_linears(block, mode, dtype)
    state = load_file(_block_file(entry_dir, prefix), device=streaming.device_name(device))
    used = set()
    for name, module in block.named_modules():
        if type(module).__name__ == "Linear4bit":
            import bitsandbytes as bnb

            w = f"{name}.weight"
            stats = {k[len(w) + 1:]: v for k, v in state.items() if k.startswith(w + ".")}
            used |= {w, *(f"{w}.{k}" for k in stats)}  # (from_prequantized consumes ``stats``)
            module.weight = bnb.nn.Params4bit.from_prequantized(data=state[w], quantized_stats=stats,
                                                                requires_grad=False, device=device)
    for name, t in state.items():
        if name not in used:  # in the saved dtype (see streaming.assign)
            set_module_tensor_to_device(block, name, device, value=t, dtype=t.dtype)
    if mode == "fp8":
        from stages.models import fp8

        fp8.use_device(block, device)


def load(model_cls, folder: Path, name: str, *, mode: str, device, dtype: torch.dtype,
         block_lists) -> nn.Module:
    """``streaming.load`` through the cache: read the saved blocks when an entry with this key
    exists, else quantize while loading and save the blocks for the next run."""
    device = torch.device(device)
    if mode not in CACHED_MODES:
        return streaming.load(model_cls, folder, mode=mode, device=device, dtype=dtype, block_lists=block_lists)
    target = entry(folder, name, mode, dtype)
    if (target / "meta.json").exists():
        log.info("loading the %s blocks of %s from the quantize-once cache %s", mode, name, target)
        return streaming.load(model_cls, folder, mode=mode, device=device, dtype=dtype, block_lists=block_lists,
                              load_block=lambda prefix, block, dev: load_block(target, prefix, block, dev, dtype, mode))
    log.info("quantizing %s to %s while loading; saving the blocks to %s for later runs", name, mode, target)
    failed: list[OSError] = []

    def save(prefix: str, block: nn.Module) -> None:
        if not failed:  # the cache only saves time: a full or read-only disk must not stop a run
            try:
                save_block(tmp, prefix, block)
            except OSError as err:
                failed.append(err)
                log.warning("cannot write the quantize-once cache %s (%s): continuing without it", target, err)

    with atomic_dir(target) as tmp:
        model = streaming.load(model_cls, folder, mode=mode, device=device, dtype=dtype,
                               block_lists=block_lists, on_block=save)
        if not failed:
            write_json(tmp / "meta.json", {"model": model_cls.__name__, "source": str(folder), "mode": mode,
                                           "dtype": str(dtype), "version": VERSION})
    if failed:
        shutil.rmtree(target, ignore_errors=True)
        return model
    for other in target.parent.glob(f"{name}-{mode}-*"):
        if other != target and other.is_dir():
            log.info("removing the outdated cache entry %s", other)
            shutil.rmtree(other, ignore_errors=True)
    return model
