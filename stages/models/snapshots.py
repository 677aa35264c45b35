"""Adapter files: the final adapter (``models/lora/``) and snapshots during training (``models/snapshots/``).

:func:`write_adapter` writes one loadable adapter folder: diffusers ``pytorch_lora_weights.safetensors``
(``FluxPipeline.load_lora_weights``), a kohya/ComfyUI copy ``lora_kohya.safetensors``
(stages.models.export) and ``adapter.json`` (what it was trained on and with).

``train.save_every`` = N: :func:`save_snapshot` writes such a folder every N steps as
``models/snapshots/step-<N>/`` and keeps the newest ``train.keep_last`` (0 = all). Snapshots hold no
optimizer state (that is models/checkpoints/, for resuming) and are not a DVC output: DVC does not hash
or cache them and experiment commits never contain them (.gitignore). ``sample.adapter_step`` renders
one of them instead of the final adapter, so a user can pick the best step; ``best`` (:func:`resolve_best`)
takes the step, and ``sample.lora_scale: best`` the scale, that the operating-point grid recorded.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

from stages.core import paths
from stages.core.io import atomic_dir, read_json, write_json

SNAPSHOTS = paths.Train().snapshots  # the default root (stages/core/paths.py)
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
log = logging.getLogger(__name__)


def adapter_info(p, trainer, steps: int, data_hash: str, cache_key: str) -> dict:
    """``adapter.json``: base, LoRA shape, optimizer and data the adapter was trained with."""
    from stages.models import lora

    cfg = lora.adapter_config(trainer.transformer)
    tp = p.train
    optimizer = {"name": tp.optimizer, "lr": tp.lr, "weight_decay": tp.weight_decay,
                 **({tp.optimizer: getattr(tp, tp.optimizer).model_dump()}
                    if tp.optimizer in ("prodigy", "adafactor") else {})}
    return {
        "base": p.model.base, "revision": p.model.revision, "quantization": p.model.quantization,
        "rank": p.lora.rank, "alpha": p.lora.alpha if p.lora.alpha is not None else p.lora.rank,
        "rank_map": p.lora.rank_map, "targets": p.lora.targets, "double_blocks": p.lora.double_blocks,
        "single_blocks": p.lora.single_blocks, "target_modules": cfg["target_modules"],
        "dropout": p.lora.dropout, "steps": steps, "data_hash": data_hash, "cache_key": cache_key,
        "resolution": tp.resolution, "seed": p.seed, "optimizer": optimizer, "ema_decay": tp.ema_decay,
        "lora_parameters": sum(t.numel() for t in lora.lora_state_dict(trainer.transformer).values()),
        "files": {"diffusers": DIFFUSERS_FILE, "kohya": KOHYA_FILE}}


def write_adapter(transformer, folder: Path, info: dict) -> None:
    """The transformer's current LoRA as diffusers + kohya files and ``adapter.json`` in ``folder``."""
    from stages.core import tensorfiles
    from stages.models import export as kohya, lora

    from stages.models.divergence import TrainingDiverged, nonfinite

    folder.mkdir(parents=True, exist_ok=True)
    state = lora.lora_state_dict(transformer)
    if nonfinite(state):  # never a NaN adapter on disk
        raise TrainingDiverged(f"the adapter after step {info.get('steps')} has non-finite weights "
                               f"({nonfinite(state)[0]}): not exported")
    alphas = lora.module_alphas(transformer)  # (peft shortens cfg["target_modules"] past 20 modules)
    lora.save_diffusers(transformer, folder)  # alpha/rank folded into lora_B: scale 1 = trained strength
    # one metadata key (stages/core/tensorfiles.py): the base version, which UIs read to sort LoRAs
    tensorfiles.save(kohya.to_kohya(state, dict(transformer.config), alphas), folder / KOHYA_FILE,
                     {"ss_base_model_version": "flux1"})
    write_json(folder / "adapter.json", {**info, "diffusers_alpha_folded": True})


def steps_saved(root: Path = SNAPSHOTS) -> list[int]:
    """Steps of the complete snapshots under ``root``, ascending."""
    if not root.exists():
        return []
    return sorted(int(d.name.split("-")[1]) for d in root.glob("step-*")
                  if d.is_dir() and (d / "adapter.json").exists() and d.name.split("-")[1].isdigit())


def snapshot_dir(step: int, root: Path = SNAPSHOTS) -> Path:
    return root / f"step-{step:06d}"


def save_snapshot(transformer, step: int, info: dict, keep_last: int, root: Path = SNAPSHOTS) -> Path:
    """``root/step-<step>/`` written atomically; older snapshots beyond the newest ``keep_last`` go."""
    target = snapshot_dir(step, root)
    with atomic_dir(target) as tmp:
        write_adapter(transformer, tmp, {**info, "steps": step})
    if keep_last:
        for old in steps_saved(root)[:-keep_last]:
            shutil.rmtree(snapshot_dir(old, root), ignore_errors=True)
    log.info("snapshot at step %d -> %s", step, target)
    return target


def discard_after(step: int, root: Path = SNAPSHOTS) -> None:
    """Remove snapshots later than ``step`` (all of them for 0: a fresh run), and half-written ones."""
    for s in steps_saved(root):
        if s > step:
            shutil.rmtree(snapshot_dir(s, root), ignore_errors=True)
    for junk in root.glob(".step-*") if root.exists() else []:
        shutil.rmtree(junk, ignore_errors=True)


def resolve(step: Optional[int], final: Path, root: Path = SNAPSHOTS) -> Path:
    """The adapter folder to render: ``final`` for None, else the snapshot of ``step`` (a clear error
    naming the saved steps when there is none)."""
    if step is None:
        return final
    folder = snapshot_dir(step, root)
    if not (folder / "adapter.json").exists():
        saved = steps_saved(root)
        raise SystemExit(f"sample.adapter_step={step}: no snapshot {folder} (saved steps: {saved or 'none'}; "
                         "set train.save_every to write them)")
    return folder


def recorded(path) -> dict:
    """The recorded operating point (``operating_point.json``) for ``sample.*=best``: a clear error when
    the grid did not run or chose nothing."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"sample.*=best: no {path}: run the operating_point stage first (dvc repro operating_point)")
    rec = read_json(path)
    if not rec.get("enabled") or not rec.get("recommended"):
        raise SystemExit(f"sample.*=best: {path} holds no operating point ({rec.get('reason', 'grid off')}); "
                         "set eval.grid.enabled=true")
    return rec


def resolve_best(adapter_step, lora_scale, path) -> tuple[int | None, float | None]:
    """``sample.adapter_step`` / ``sample.lora_scale`` with ``best`` replaced by the recorded point; the
    final adapter's step becomes None (render models/lora itself, not a snapshot of the same step)."""
    if "best" not in (adapter_step, lora_scale):
        return adapter_step, lora_scale
    rec = recorded(path)
    best = rec["recommended"]
    if adapter_step == "best":
        adapter_step = None if best["step"] == rec["final_step"] else int(best["step"])
    if lora_scale == "best":
        lora_scale = float(best["scale"])
    return adapter_step, lora_scale
