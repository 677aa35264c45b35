"""Crash-safe training checkpoints: ``models/checkpoints/step-<N>/``.

Each checkpoint folder holds ``lora.safetensors`` (the adapter), ``state.pt`` (optimizer,
scheduler, RNG states, step) and ``meta.json`` (step, fingerprint). It is written into a temp
folder and renamed into place (``core.io.atomic_dir``), so a kill -9 at any moment leaves either
the previous set of checkpoints or the new one — never a half-written one. The last ``keep``
are kept. A checkpoint resumes a run only when its fingerprint (everything that shapes the
training trajectory: base, quantization, LoRA, train params, data) matches; stale ones (say,
after ``-S lora.rank=8``) are removed with a log line instead of being resumed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from stages.core.io import atomic_dir, write_json

log = logging.getLogger(__name__)
# train params that do not change what is learned (so changing them keeps checkpoints valid)
NEUTRAL = {"checkpoint_every", "keep_checkpoints", "validate_every", "compile",
           "save_every", "keep_last", "validation_steps", "validation_prompts", "validation_seeds",
           "validation_guidance", "validation_resolution"}


def fingerprint(p, data_key: str) -> str:
    train = {k: v for k, v in p.train.model_dump().items() if k not in NEUTRAL}
    blob = json.dumps({"seed": p.seed, "model": p.model.model_dump(), "lora": p.lora.model_dump(),
                       "train": train, "data": data_key}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _complete(folder: Path) -> list[tuple[int, Path]]:
    out = []
    for d in folder.glob("step-*"):
        if (d / "meta.json").exists() and d.is_dir():
            out.append((json.loads((d / "meta.json").read_text())["step"], d))
    return sorted(out)


def save(folder: Path | str, trainer, step: int, fp: str, keep: int) -> Path:
    folder = Path(folder)
    state = trainer.state_dict()
    target = folder / f"step-{step:06d}"
    with atomic_dir(target) as tmp:
        save_file(state.pop("lora"), tmp / "lora.safetensors")
        torch.save({**state, "rng": rng_state(), "step": step}, tmp / "state.pt")
        write_json(tmp / "meta.json", {"step": step, "fingerprint": fp})
    for _, old in _complete(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest(folder: Path | str, fp: str, max_step: int) -> Optional[Path]:
    """The newest checkpoint with this fingerprint (at most ``max_step``); stale ones are removed."""
    folder = Path(folder)
    if not folder.exists():
        return None
    good = []
    for step, d in _complete(folder):
        meta = json.loads((d / "meta.json").read_text())
        if meta["fingerprint"] != fp or step > max_step:
            log.info("removing checkpoint %s: made with other params (fingerprint %s, now %s)",
                     d.name, meta["fingerprint"], fp)
            shutil.rmtree(d, ignore_errors=True)
        else:
            good.append(d)
    for junk in folder.glob(".step-*"):  # temp folders of a run killed while saving
        shutil.rmtree(junk, ignore_errors=True)
    return good[-1] if good else None


def load(path: Path, trainer) -> int:
    """Restore the trainer (LoRA, optimizer, scheduler) and RNG states; returns the step."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    trainer.load_state_dict({"lora": load_file(path / "lora.safetensors"), **state})
    set_rng_state(state["rng"])
    return state["step"]
