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

from stages.core import log as logs
from stages.core import params, preflight
from stages.core.device import default_device
from stages.core.io import write_text
from stages.core.paths import Validate

log = logging.getLogger("stages.validate")


def memory_preflight(p) -> None:
    """On a GPU: will encode, train and sample fit the card (stages.models.memory)? Checked here
    too, so that a card that is too small stops the run before DVC removes models/lora."""
    from stages.models import flux, memory

    device = default_device()
    if device.type != "cuda":
        return
    plan = memory.plan(p.model, device)
    for stage in ("encode", "train", "sample"):
        flux.preflight(stage, p, device, plan)


def run(p: params.Params, paths: Validate = Validate()) -> None:
    """Preflight for ``p`` (params.load() has validated it), then the constant marker file."""
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
