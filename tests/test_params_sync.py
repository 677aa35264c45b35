"""conf/ and the params command line (stages.core.params): ``-S`` overrides reach the composition,
``make params`` (``python -m stages.core.params --sync``) regenerates conf/config.yaml from the schema
and params.yaml from conf/, and ``python -m stages.core.params [file]`` prints the validated params.
The command runs in a scratch copy of stages/ and conf/, so --sync never writes this checkout."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from stages.core import params


@pytest.fixture
def scratch(tmp_path):
    """A copy of the repo's stages/ and conf/ (params.ROOT is the folder above stages/)."""
    root = tmp_path / "repo"
    shutil.copytree(params.ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(params.ROOT / "conf", root / "conf")
    shutil.copy(params.PARAMS_FILE, root / "params.yaml")
    return root


def cli(root, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", "stages.core.params", *args], cwd=cwd or root, capture_output=True,
                          text=True, env={"PYTHONPATH": str(root), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                          "HF_HUB_OFFLINE": "1"}, timeout=120)


def in_order(d) -> str:
    """A dict as text that keeps its key order (== on dicts ignores it)."""
    return json.dumps(d, sort_keys=False)


def test_overrides_reach_the_composition():
    assert params.compose()["lora"]["rank"] == params.Params().lora.rank != 32
    p = params.validate(params.compose(["lora.rank=32", "seed=7"]))
    assert (p.lora.rank, p.seed, p.profile) == (32, 7, "smoke")


def test_sync_writes_conf_from_the_schema_and_params_from_conf(scratch):
    (scratch / "conf/config.yaml").unlink()
    (scratch / "params.yaml").write_text("seed: 1\n")
    proc = cli(scratch, "--sync")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    conf = (scratch / "conf/config.yaml").read_text()
    assert conf.startswith(params.CONF_HEADER)
    defaults = params.Params().model_dump()
    defaults.pop("profile")
    assert in_order(yaml.safe_load(conf)) == in_order({"defaults": ["_self_", {"profile": "smoke"}], **defaults})
    assert conf == (params.ROOT / "conf/config.yaml").read_text()  # `make params` on this checkout: no diff
    text = (scratch / "params.yaml").read_text()
    assert text == params.compose_text(conf_dir=scratch / "conf") == params.PARAMS_FILE.read_text()


@pytest.mark.parametrize("argv", [["other.yaml"], []])
def test_the_command_prints_the_validated_params(scratch, tmp_path, argv):
    raw = params.Params().model_dump()
    raw["seed"], raw["lora"]["rank"] = 7, 32
    (tmp_path / "run").mkdir()
    # the file named, or without a name ./params.yaml; keys sorted, so that only a re-dump prints schema order
    (tmp_path / "run" / (argv[0] if argv else "params.yaml")).write_text(yaml.safe_dump(raw, sort_keys=True))
    proc = cli(scratch, *argv, cwd=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == yaml.safe_dump(params.validate(raw).model_dump(), sort_keys=False) + "\n"
    assert in_order(yaml.safe_load(proc.stdout)) == in_order(params.validate(raw).model_dump())
    assert (scratch / "conf/config.yaml").read_text() == (params.ROOT / "conf/config.yaml").read_text()  # no sync
