"""Crash-safe training checkpoints, ``models/checkpoints/step-<N>/``, and when to resume from one.

Each checkpoint folder holds ``lora.safetensors`` (the adapter), ``state.pt`` (optimizer,
scheduler, RNG states, step) and ``meta.json`` (step, the run's identity, the sha256 of both
files, ``finished``). It is written into a temp folder and renamed into place
(``core.io.atomic_dir``), so a kill -9 at any moment leaves either the previous set of checkpoints
or the new one. The last ``keep`` are kept.

A run's identity (:func:`identity`) is everything that shapes the training trajectory: the
training params (base, quantization, LoRA, train.* except the bookkeeping keys in
:data:`NEUTRAL`), the data (the encode cache's key) and the code (the sha256 of the train stage's
code deps as listed in dvc.yaml). :func:`plan` decides, and logs why:

- no checkpoint of this identity (other params, data or code): start fresh; the stale ones are removed
  by the new run's first :func:`save` (``Resume.stale``), so a run that fails before it loses nothing;
- the newest one is of an **interrupted** run (not ``finished``): resume from it;
- the newest one is of a **finished** run (the train stage marks its last checkpoint after the
  export): a rerun (``dvc repro -f``, the same params) trains from step 0 again. Only when
  ``train.steps`` grew and the lr schedule does not depend on the total (``constant``, warm-up
  included) does the run continue from it ("train N more steps"), ending with the adapter an
  uninterrupted run of the new length gives. ``cosine``/``linear`` schedules are stretched by
  the total, so a longer run is a different run: it starts fresh.

A damaged checkpoint (checksum mismatch, unreadable file, non-finite weights) is named in the
log, moved to ``models/checkpoints/bad/`` and the previous one is tried (or a fresh start).
Non-finite weights are never saved (stages.models.divergence).
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from stages.core import tensorfiles
from stages.core.io import atomic_dir, file_digest, no_space_errors, write_json
from stages.core.params import ROOT
from stages.models.divergence import TrainingDiverged, nonfinite

log = logging.getLogger(__name__)
# train params that do not change what is learned (so changing them keeps checkpoints valid)
NEUTRAL = {"checkpoint_every", "keep_checkpoints", "validate_every", "compile",
           "save_every", "keep_last", "validation_steps", "validation_prompts", "validation_seeds",
           "validation_guidance", "validation_resolution"}
FILES = ("lora.safetensors", "state.pt")
BAD = "bad"  # damaged checkpoints are set aside here (never resumed, kept for a look)


# ----------------------------------------------------------------------------- identity
def _code_files(stage: str, root: Path) -> list[Path]:
    """The Python files of ``stage``'s code deps in dvc.yaml (files and folders under stages/)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    files: set[Path] = set()
    for dep in spec["stages"][stage].get("deps", []):
        path = root / str(dep)
        if not str(dep).startswith("stages"):
            continue  # data deps are covered by the data key
        files.update(path.rglob("*.py") if path.is_dir() else [path] if path.exists() else [])
    return sorted(files)


def code_hash(stage: str = "train", root: Path = ROOT) -> str:
    """sha256 over the paths and contents of the code DVC re-runs ``stage`` for."""
    h = hashlib.sha256()
    for f in _code_files(stage, root):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def schedule_depends_on_total(train_params) -> bool:
    """True when the lr at a step depends on ``train.steps`` (cosine/linear decay to the end)."""
    return train_params.lr_scheduler != "constant"


def identity(p, data_key: str) -> dict:
    train = {k: v for k, v in p.train.model_dump().items() if k not in NEUTRAL | {"steps"}}
    return {"params": json.loads(json.dumps({"seed": p.seed, "model": p.model.model_dump(),
                                             "lora": p.lora.model_dump(), "train": train}, sort_keys=True)),
            "steps": p.train.steps, "data": data_key, "code": code_hash()}


def _differences(old: dict, new: dict, ignore_steps: bool) -> str:
    """'' when ``old`` (a checkpoint's identity) may resume ``new``; else why not, in words."""
    if not isinstance(old, dict) or not {"params", "data", "code", "steps"} <= old.keys():
        return "made by an older version of the trainer"
    if old["data"] != new["data"]:
        return "the training data changed"
    if old["code"] != new["code"]:
        return "the train stage's code changed"
    if old["params"] != new["params"]:
        flat_old, flat_new = _flat(old["params"]), _flat(new["params"])
        keys = sorted(k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k))
        return "params changed: " + ", ".join(f"{k} {flat_old.get(k)!r} -> {flat_new.get(k)!r}" for k in keys[:5])
    if not ignore_steps and old["steps"] != new["steps"]:
        return (f"train.steps changed ({old['steps']} -> {new['steps']}) and the "
                f"{new['params']['train']['lr_scheduler']} lr schedule depends on the total")
    return ""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# ----------------------------------------------------------------------------- RNG
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


# ----------------------------------------------------------------------------- files
@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict

    @property
    def finished(self) -> bool:
        return bool(self.meta.get("finished"))


def _read(d: Path) -> Checkpoint:
    meta = json.loads((d / "meta.json").read_text())
    return Checkpoint(d, int(meta["step"]), meta)


def set_aside(d: Path, why: str) -> None:
    dst = d.parent / BAD / f"{d.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(d), dst)
    log.warning("checkpoint %s is damaged (%s): moved to %s", d, why, dst)


def _complete(folder: Path) -> list[Checkpoint]:
    """Readable checkpoints, oldest first; unreadable ones are set aside."""
    out = []
    for d in sorted(folder.glob("step-*")):
        if not d.is_dir():
            continue
        try:
            out.append(_read(d))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            set_aside(d, f"meta.json unreadable: {type(exc).__name__}: {exc}")
    return sorted(out, key=lambda c: c.step)


def save(folder: Path | str, trainer, step: int, ident: dict, keep: int, stale: Sequence[Path] = ()) -> Path:
    """Write ``step-<step>/`` atomically, then remove ``stale`` (an earlier run's checkpoints) and all
    but the newest ``keep``."""
    folder = Path(folder)
    state = trainer.state_dict()
    bad = nonfinite(state["lora"])
    if bad:
        raise TrainingDiverged(f"non-finite LoRA weights after step {step} ({bad[0]}, {len(bad)} tensors): "
                               "training stopped, nothing saved; lower train.lr or raise train.warmup_steps")
    target = folder / f"step-{step:06d}"
    with no_space_errors(folder), atomic_dir(target) as tmp:
        tensorfiles.save(state.pop("lora"), tmp / "lora.safetensors")
        torch.save({**state, "rng": rng_state(), "step": step}, tmp / "state.pt")
        write_json(tmp / "meta.json", {"step": step, "identity": ident, "finished": False,
                                       "sha256": {f: file_digest(tmp / f) for f in FILES}})
    for old in stale:
        if Path(old) != target:  # (the same step of an earlier run was just replaced by this one)
            log.info("removing checkpoint %s of an earlier run", old.name)
            shutil.rmtree(old, ignore_errors=True)
    for old in _complete(folder)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return target


def mark_finished(folder: Path | str, step: int) -> None:
    """Flag the last checkpoint of a run whose adapter was exported: a rerun won't resume it."""
    meta_file = Path(folder) / f"step-{step:06d}" / "meta.json"
    if meta_file.exists():
        write_json(meta_file, {**json.loads(meta_file.read_text()), "finished": True})


def _load_verified(ck: Checkpoint) -> dict:
    """The checkpoint's tensors and state, checked against its checksums; ValueError when damaged."""
    sums = ck.meta.get("sha256") or {}
    for f in FILES:
        if not (ck.path / f).exists():
            raise ValueError(f"{f} missing")
        if sums.get(f) != file_digest(ck.path / f):
            raise ValueError(f"{f}: checksum mismatch")
    try:
        lora_state = load_file(ck.path / "lora.safetensors")
        state = torch.load(ck.path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unpickling/safetensors errors of a damaged file
        raise ValueError(f"unreadable: {type(exc).__name__}: {exc}") from None
    bad = nonfinite(lora_state)
    if bad:
        raise ValueError(f"non-finite LoRA weights in {bad[0]}")
    return {"lora": lora_state, **state}


# ----------------------------------------------------------------------------- the decision
@dataclass
class Resume:
    start: int                # 0 = fresh
    reason: str               # one line for the log
    state: Optional[dict] = None
    path: Optional[Path] = None
    continued: bool = False   # True: a finished run trained further ("train N more steps")
    stale: list[Path] = field(default_factory=list)  # an earlier run's checkpoints: go with the first save


def plan(folder: Path | str, ident: dict, train_params, cleanup: bool = True) -> Resume:
    """Decide where this run starts (see the module docstring); stale checkpoints are listed in
    ``Resume.stale`` (``cleanup``: :func:`save` removes them after the new run's first), damaged ones
    set aside."""
    folder = Path(folder)
    if not folder.exists():
        return Resume(0, "no checkpoint: training from step 0")
    if cleanup:
        for junk in folder.glob(".step-*"):  # temp folders of a run killed while saving
            shutil.rmtree(junk, ignore_errors=True)
    ignore_steps = not schedule_depends_on_total(train_params)
    steps = train_params.steps
    matching, stale, why_not = [], [], ""
    for ck in _complete(folder):
        why = _differences(ck.meta.get("identity"), ident, ignore_steps)
        if why:
            why_not = why
            if cleanup:
                log.info("checkpoint %s is of another run (%s): removed once this run saves its first",
                         ck.path.name, why)
                stale.append(ck.path)
        else:
            matching.append(ck)
    if not matching:
        return Resume(0, f"no checkpoint of this run ({why_not or 'none saved'}): training from step 0",
                      stale=stale)
    newest = matching[-1]
    if newest.finished:
        if ignore_steps and newest.step < steps:
            return _with_stale(_first_good(matching[::-1][:1], continued=True, steps=steps) or _fresh(
                folder, matching, cleanup, "its final checkpoint is damaged"), stale)
        return _with_stale(_fresh(folder, matching, cleanup,
                                  f"the run with these data, params and code finished at step {newest.step}; "
                                  "a rerun trains again from step 0"), stale)
    usable = [ck for ck in matching if ck.step <= steps][::-1]
    return _with_stale(_first_good(usable, continued=False, steps=steps) or _fresh(
        folder, matching, cleanup, f"no usable checkpoint at or below step {steps}"), stale)


def _with_stale(resume: Resume, stale: list[Path]) -> Resume:
    resume.stale = stale + resume.stale
    return resume


def _first_good(candidates: list[Checkpoint], continued: bool, steps: int) -> Optional[Resume]:
    for ck in candidates:
        try:
            state = _load_verified(ck)
        except ValueError as exc:
            set_aside(ck.path, str(exc))
            continue
        if continued:
            why = f"continuing the finished {ck.step}-step run from {ck.path} to {steps} steps"
        else:
            why = f"resuming an interrupted run from {ck.path} at step {ck.step} of {steps}"
        return Resume(ck.step, why, state, ck.path, continued)
    return None


def _fresh(folder: Path, matching: list[Checkpoint], cleanup: bool, why: str) -> Resume:
    # a fresh run's checkpoints must not mix with an older run's: they go with its first save
    return Resume(0, f"{why}: training from step 0", stale=[ck.path for ck in matching] if cleanup else [])


def restore(resume: Resume, trainer) -> int:
    """Apply a planned resume to the trainer (LoRA, optimizer, scheduler, RNG); returns the step."""
    if resume.state is None:
        return 0
    trainer.load_state_dict(resume.state)
    set_rng_state(resume.state["rng"])
    return resume.start
