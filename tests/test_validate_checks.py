"""validate refuses every value a later stage would refuse (issue 26, point 5), before DVC removes any
output: one case per value, each message naming the key, the value and what works. Schema checks run in
params.validate; checks that need files, the model's shape or this machine in stages/validate.py."""
import os
import subprocess
import sys

import pytest

from stages import validate
from stages.core import params, preflight
from tests.test_params_checks import with_value


def refusal(raw: dict) -> str:
    """The message validate stops with for ``raw`` params (schema, value checks, preflight)."""
    with pytest.raises(SystemExit) as exc:
        p = params.validate(raw)
        validate.check_values(p)
        preflight.check(p)
    return str(exc.value)


def prompt_file(tmp_path, kind: str) -> str:
    if kind == "folder":  # made here: what exists around the checkout differs between machines
        (tmp_path / "downloads" / "paintings").mkdir(parents=True)
        (tmp_path / "downloads" / "paintings" / "a.jpg").write_bytes(b"\xff\xd8")
        return str(tmp_path / "downloads")
    if kind == "fifo":
        os.mkfifo(tmp_path / "p.txt")
    elif kind == "binary":
        (tmp_path / "p.txt").write_bytes(b"\x00\x01\x02 a harbour\n\xff\xfe")
    elif kind == "huge":
        (tmp_path / "p.txt").write_text("a harbour at dawn number\n" * 50_000)
    return str(tmp_path / "p.txt")


CASES = [  # (key, value, what the message says besides key and value)
    ("model.base", "folder", "no diffusers model folder"),  # an existing folder that holds no model
    ("model.base", "./no/such/folder", "no such folder"),
    ("train.batch_size", 1e9, "not integers"),
    ("train.batch_size", 300, "at most 216"),
    ("seed", -1, "greater than or equal to 0"),
    ("data.max_pixels", 1, "greater than or equal to 1048576"),
    ("sample.seeds", [], "at least 1 item"),
    ("caption.template", "{artist", "not a valid template"),
    ("caption.template", "{artist} {colour}", "unknown fields"),
    ("lora.double_blocks", [-1, 2], "greater than or equal to 0"),
    ("lora.double_blocks", [0, 999], "indices [999] do not exist; use 0..1"),
    ("lora.single_blocks", [2], "indices [2] do not exist; use 0..1"),
    ("lora.double_blocks", [], "no block would get an adapter"),  # with single_blocks [] (below)
    ("train.lr", float("inf"), "finite"),
    ("train.lr", float("nan"), "finite"),
    ("data.holdout", 0, "holds out no image"),
    ("lora.rank", True, "not integers"),
    ("lora.double_blocks", [True], "not integers"),
    ("data.limit", 10.0, "not integers"),
    ("sample.prompts", "/etc/passwd", "is not a .txt file"),
    ("sample.prompts", "../../outside.txt", "leads out of the project"),
    ("sample.prompts", "fifo", "not a regular file"),
    ("sample.prompts", "binary", "not UTF-8 text"),
    ("sample.prompts", "huge", "more than the 1048576"),
    ("train.validation_prompts", "/etc/passwd", "is not a .txt file"),
    ("data.folder.caption_extensions", [".txt", ".PNG"], "image extensions"),
    ("train.resolution", 1048576, "less than or equal to 4096"),
    ("sample.resolution", 8192, "less than or equal to 4096"),
    ("data.workers", 1000, "less than or equal to 64"),
    ("data.workers", 4 * (os.cpu_count() or 1) + 1, "more than 4 per CPU core"),
    ("filter.workers", 4 * (os.cpu_count() or 1) + 1, "more than 4 per CPU core"),
    ("train.num_processes", 1000, "less than or equal to 64"),
]


@pytest.mark.parametrize("key,value,why", CASES, ids=[f"{k}={v}" for k, v, _ in CASES])
def test_validate_refuses_what_a_later_stage_would(key, value, why, tmp_path, monkeypatch):
    if value in ("folder", "fifo", "binary", "huge"):
        value = prompt_file(tmp_path, value)
    monkeypatch.setenv("FLUXIMP_SKIP_PREFLIGHT", "1")  # value checks run even when the preflight is skipped
    raw = with_value(key, value)
    if key == "lora.double_blocks" and value == []:
        raw["lora"]["single_blocks"] = []
    message = refusal(raw)
    shown = [repr(value), str(value)] + ([f"{key}.{i} = {v!r}" for i, v in enumerate(value)]
                                         if isinstance(value, list) else [])  # a list item named alone
    assert key in message and any(s in message for s in shown), message
    assert why in message, message
    assert "git checkout params.yaml" in message  # how to go back after `dvc exp run -S`


def test_a_folder_source_needs_an_existing_directory_and_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    raw = with_value("data.source", "folder")
    raw["data"]["path"] = "~/pics"
    message = refusal(raw)
    assert f"data.path = '{tmp_path}/pics': no such directory" in message
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"\x89PNG")
    p = params.validate(raw)
    assert p.data.path == f"{tmp_path}/pics"  # every stage gets the expanded path
    validate.check_values(p)
    preflight.check(p)


def test_block_counts_of_a_local_model_come_from_its_config(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "transformer" / "config.json").write_text('{"num_layers": 3, "num_single_layers": 5}')
    raw = with_value("model.base", str(tmp_path))
    raw["lora"].update(double_blocks=[2], single_blocks=[4])
    validate.check_values(params.validate(raw))
    raw["lora"]["single_blocks"] = [5]
    assert "lora.single_blocks = [5]: " in refusal(raw) and "use 0..4" in refusal(raw)


def test_good_values_pass(tmp_path):
    (tmp_path / "prompts.txt").write_text("a harbour\n")
    for key, value in [("lora.double_blocks", [0, 1]), ("sample.prompts", str(tmp_path / "prompts.txt")),
                       ("caption.template", "{title} by {artist}"), ("train.lr", 1), ("data.workers", 1)]:
        validate.check_values(params.validate(with_value(key, value)))


def test_validate_loads_no_model(tmp_path):
    """validate on the smoke params imports no model library (no weights can load); without a GPU not
    even torch (so it takes well under the 2 s of issue 26)."""
    code = ("import sys; from stages import validate; from stages.core import params; from stages.core.paths import "
            f"Validate\nvalidate.run(params.load(), Validate().under({str(tmp_path)!r}))\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'peft', "
            "'open_clip', 'accelerate', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=params.ROOT, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "FLUXIMP_MLFLOW": "0"}, timeout=120)
    assert out.returncode == 0, out.stderr
    found = set(eval(out.stdout))
    if any(os.path.exists(d) for d in validate.GPU_DEVICE_NODES):  # the memory preflight reads file sizes
        found -= {"torch", "diffusers", "transformers"}             # (and may build tiny-random once)
    assert found == set()


def test_validate_refuses_an_emptied_mlflow_db(tmp_path, monkeypatch):
    from stages.core.paths import Validate

    (tmp_path / "mlflow.db").write_bytes(b"")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("FLUXIMP_MLFLOW", raising=False)
    with pytest.raises(SystemExit, match=f"MLflow database {tmp_path}/mlflow.db is empty .*not recreated"):
        validate.run(params.Params(), Validate().under(tmp_path))
    assert not (tmp_path / "reports").exists()
    monkeypatch.setenv("FLUXIMP_MLFLOW", "0")  # tracking off: the database is not needed
    validate.run(params.Params(), Validate().under(tmp_path))
