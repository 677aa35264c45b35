"""Run a stage in a project folder as `python -m stages.<name>` would from there: its params.yaml
(composed from conf/ the way `dvc exp run -S` does) and its main()."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stages.core import params


def override(key: str, value) -> str:
    """A Hydra override ``key=value`` (value as YAML/JSON: lists, null, quoted strings)."""
    return f"{key}={json.dumps(value)}"


def overrides(key: str, value) -> list[str]:
    """Hydra overrides for ``key``; a dict becomes one override per leaf (``key.sub=value``)."""
    if isinstance(value, dict):
        return [o for k, v in value.items() for o in overrides(f"{key}.{k}", v)]
    return [override(key, value)]


def write_params(root: Path, *overrides: str) -> params.Params:
    """``root/params.yaml`` = the smoke composition with Hydra ``overrides`` (``"train.steps=5"``)."""
    p = params.validate(params.compose(list(overrides)))
    (root / "params.yaml").write_text(yaml.safe_dump(p.model_dump(), sort_keys=False))
    return p


def run_stage(main, root: Path) -> None:
    """Run ``main()`` with ``root`` as the working directory and MLflow off (both undone after)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("FLUXIMP_MLFLOW", "0")
        main()
