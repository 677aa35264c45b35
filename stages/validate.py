"""validate: the pipeline's first stage. Checks params.yaml (stages.core.params) and runs the
preflight (stages.core.preflight: weights, datasets, folders, tokens the profile needs) before any
stage that has outputs runs.

Why a stage of its own: DVC deletes a stage's outputs right before it runs the stage's command,
so a check inside, say, download fails only after data/raw is gone. Every other stage depends on
``reports/validated.txt``, so DVC runs this one first, and a failure here stops `dvc repro` /
`dvc exp run` before any output is touched. The file's content never changes (downstream stages
are not re-run because this stage re-ran); dvc.yaml tracks the whole params.yaml for this stage.
"""
from __future__ import annotations

import logging

import os
from pathlib import Path

from stages.core import log as logs
from stages.core import params, preflight, tracking
from stages.core.io import write_text
from stages.core.paths import Validate
from stages.core.prompts import read_prompts

log = logging.getLogger("stages.validate")
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd")  # NVIDIA, AMD ROCm


def _base_problems(p) -> list[str]:
    """A local ``model.base`` must be a diffusers folder (FluxPipeline.save_pretrained)."""
    base = p.model.base
    local = Path(base).expanduser()
    if base == "tiny-random" or not (base.startswith((".", "/", "~")) or local.exists()):
        return []  # a hub id: the preflight checks it can be had
    if not local.is_dir():
        return [f"- model.base = {base!r}: no such folder; use a hub id (black-forest-labs/FLUX.1-dev), "
                "tiny-random or a FluxPipeline.save_pretrained folder"]
    if not (local / "model_index.json").is_file():
        return [f"- model.base = {base!r}: {local.resolve()} is no diffusers model folder (no model_index.json); "
                "point it at a FluxPipeline.save_pretrained folder"]
    return []


def _block_problems(p) -> list[str]:
    """Block indices of lora.double_blocks / single_blocks within the base model's block counts."""
    if p.lora.double_blocks == [] and p.lora.single_blocks == []:
        return ["- lora.double_blocks = [] and lora.single_blocks = []: no block would get an adapter; "
                "use null (all) for one of them, or list indices"]
    if not (p.lora.double_blocks or p.lora.single_blocks):
        return []
    from stages.models import flux  # (imports torch: only when blocks are chosen)

    counts = flux.block_counts(p.model)
    found = []
    for key, chosen, count in (("lora.double_blocks", p.lora.double_blocks, counts and counts[0]),
                               ("lora.single_blocks", p.lora.single_blocks, counts and counts[1])):
        bad = [i for i in chosen or [] if count is not None and i >= count]
        if bad:
            found.append(f"- {key} = {chosen}: {p.model.base} has {count} such blocks, indices {bad} do not "
                         f"exist; use 0..{count - 1} (or null for all)")
    return found


def value_problems(p) -> list[str]:
    """Values the schema cannot judge alone (files, the model's shape, this machine) that a later
    stage would refuse: one line each, naming key, value and what works."""
    from stages.curation.captions import template_fields
    from stages.data.folder import IMAGE_EXTENSIONS

    found = _base_problems(p) + _block_problems(p)
    if p.data.source == "folder" and not Path(p.data.path).is_dir():  # (schema: a path is set, ~ expanded)
        found.append(f"- data.path = {p.data.path!r}: no such directory (data.source=folder reads images from one)")
    try:
        template_fields(p.caption.template)
    except ValueError as err:
        found.append(f"- {err}")
    for key, path in (("sample.prompts", p.sample.prompts), ("train.validation_prompts", p.train.validation_prompts)):
        try:
            if path:
                read_prompts(path, key)
        except SystemExit as err:
            found.append(f"- {err}")
    images = [e for e in p.data.folder.caption_extensions if e.lower() in IMAGE_EXTENSIONS]
    if images:
        found.append(f"- data.folder.caption_extensions = {p.data.folder.caption_extensions}: {images} are image "
                     "extensions (each such image would be taken for a caption); use text ones, e.g. "
                     "['.txt', '.caption']")
    found += _batch_problems(p)
    cpus = os.cpu_count() or 1
    for key, workers in (("data.workers", p.data.workers), ("dedupe.workers", p.dedupe.workers),
                         ("filter.workers", p.filter.workers)):
        if workers > 4 * cpus:
            found.append(f"- {key} = {workers}: more than 4 per CPU core ({cpus} here); use at most {4 * cpus}")
    found += _process_problems(p, cpus)
    return found


def _batch_problems(p) -> list[str]:
    """One batch per process must fit in the training images (train refuses more); before download
    their count is known only as an upper bound: data.synthetic.count or data.limit, less the held-out."""
    most = p.data.limit or (p.data.synthetic.count if p.data.source == "synthetic" else None)
    if most is None:
        return []
    train_images = most - max(1, round(most * p.data.holdout))
    n = p.train.num_processes
    if p.train.batch_size * n <= train_images:
        return []
    return [f"- train.batch_size = {p.train.batch_size} (x {n} processes) is larger than the at most "
            f"{train_images} training images ({most} images less data.holdout): use at most "
            f"{max(1, train_images // n)}"]


def _process_problems(p, cpus: int) -> list[str]:
    """train.num_processes: one process per GPU (as stages/train.py launches them), or per CPU core."""
    n = p.train.num_processes
    if n == 1:
        return []
    import torch

    gpus = torch.cuda.device_count()
    if gpus and n > gpus:
        return [f"- train.num_processes = {n}: this machine has {gpus} GPU(s), one process per GPU; "
                f"use at most {gpus} (or set CUDA_VISIBLE_DEVICES)"]
    if not gpus and n > cpus:
        return [f"- train.num_processes = {n}: no GPU and {cpus} CPU core(s); use at most {cpus}"]
    return []


def check_values(p) -> None:
    found = value_problems(p)
    if found:
        raise params.ParamsError("params.yaml has values a later stage would refuse:\n" + "\n".join(found)
                                 + "\n" + params.RESTORE_HINT)


def memory_preflight(p) -> None:
    """On a GPU: will encode, train and sample fit the card (stages.models.memory)? Checked here
    too, so that a card that is too small stops the run before DVC removes models/lora. Without a GPU
    device node (NVIDIA or ROCm) torch is not even imported: validate stays a matter of a second."""
    if not any(Path(dev).exists() for dev in GPU_DEVICE_NODES):
        return
    from stages.core.device import default_device
    from stages.models import flux, memory

    device = default_device()
    if device.type != "cuda":
        return
    plan = memory.plan(p.model, device)
    for stage in ("encode", "train", "sample"):
        flux.preflight(stage, p, device, plan)


def run(p: params.Params, paths: Validate = Validate()) -> None:
    """Value checks and preflight for ``p`` (params.load() has validated the schema), then the
    constant marker file."""
    check_values(p)
    tracking.check_database()  # an emptied/corrupt mlflow.db: stop before train would bury the history
    preflight.check(p)
    memory_preflight(p)
    write_text(paths.validated, "params.yaml is valid and the preflight passed (stages/validate.py)\n")
    log.info("params valid, profile %r: everything it needs is here", p.profile)


def main() -> None:
    p = params.load()
    logs.setup("validate")
    run(p, Validate())


if __name__ == "__main__":
    main()
