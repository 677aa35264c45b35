"""publish: the Hub folder, its model card (parsed with huggingface_hub), the dry run (no network)
and the one-line failures of --push without a token or without network."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id

from stages import publish
from tests import pubkit

ROOT = Path(__file__).resolve().parents[1]
FLUX_DEV = "black-forest-labs/FLUX.1-dev"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("pub") / "project"
    facts = pubkit.make_project(root, base=FLUX_DEV)
    subprocess.run("git init -q && git add -A && git -c user.email=t@t -c user.name=t commit -qm fixture",
                   cwd=root, shell=True, check=True)
    return facts


def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")


def block_network(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    mp.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def no_network(monkeypatch):
    block_network(monkeypatch)


@pytest.fixture(scope="module")
def dry_run(project, tmp_path_factory):
    """One dry run, in-process, with sockets refused; returns (stdout, hub folder)."""
    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(project["root"])
        block_network(mp)
        import io
        from contextlib import redirect_stdout

        buf = io.StringIO()
        with redirect_stdout(buf):
            rc = publish.main(["--repo-id", "someone/flux-impressionism-lora"])
    finally:
        mp.undo()
    assert rc == 0
    return buf.getvalue(), project["root"] / "models/hub"


def test_dry_run_lists_the_folder_and_touches_no_network(dry_run):
    out, hub = dry_run
    files = {f.relative_to(hub).as_posix() for f in hub.rglob("*") if f.is_file()}
    widget = {f"images/p{pi:02d}-s0-l1.00.png" for pi in range(len(pubkit.PROMPTS))}
    assert files == {"README.md", "adapter.json", "metrics.json", "params.yaml",
                     "pytorch_lora_weights.safetensors", "lora_kohya.safetensors",
                     "images/seed-0.png", "images/seed-1.png", *widget}
    assert "dry run: would upload 10 files" in out and "someone/flux-impressionism-lora (private)" in out
    assert "make publish PUSH=1" in out  # as the README says
    for name in files:
        assert name in out
    lora = hub.parent / "lora"
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "adapter.json"):
        assert (hub / name).read_bytes() == (lora / name).read_bytes()


def test_card_parses_and_its_metadata_follows_hub_conventions(dry_run, project):
    _, hub = dry_run
    card = ModelCard.load(hub / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == FLUX_DEV
    validate_repo_id(data["base_model"])
    # a licence the Hub does not list as an id is "other" + license_name (a slug) + license_link
    assert data["license"] == "other"
    assert re.fullmatch(r"[a-z0-9-]+", data["license_name"]) and data["license_link"].startswith("https://")
    assert {"flux", "lora", "diffusers", "text-to-image", "impressionism"} <= set(data["tags"])
    assert data["instance_prompt"] == pubkit.TRIGGER
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert len(data["widget"]) == len(pubkit.PROMPTS)
    for w in data["widget"]:
        assert pubkit.TRIGGER in w["text"]
        assert (hub / w["output"]["url"]).is_file()
    # every image the card body shows is in the folder
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.text):
        assert (hub / link).is_file(), link
    # the card round-trips through the hub's own data class
    assert ModelCard(str(card)).data.to_dict() == data


def test_card_metrics_equal_metrics_json(dry_run):
    _, hub = dry_run
    metrics = json.loads((hub.parent.parent / "reports/metrics.json").read_text())
    assert pubkit.check_card_metrics(hub, metrics) == 13
    rows = pubkit.table_cells(ModelCard.load(hub / "README.md").text)
    assert rows["clip_score"][-1] == "—"  # metrics.json has no clip_score_delta: none shown


def test_card_lineage_and_usage(dry_run, project):
    _, hub = dry_run
    text = (hub / "README.md").read_text()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project["root"], capture_output=True,
                            text=True).stdout.strip()
    for needle in (commit, "0123456789abcdef", "d" * 16, "abc123.dir", "load_lora_weights",
                   '"scale": 1.0', "LoraLoaderModelOnly", "lora_kohya.safetensors",
                   "`train` split: 5 images", "`holdout` split: 2 images", "public domain"):
        assert needle in text, needle


def run_cli(root: Path, *args: str, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    e.update(PYTHONPATH=str(ROOT), HF_HOME=str(root / ".hf-home"), **env)
    return subprocess.run([sys.executable, "-m", "stages.publish", *args], cwd=root, env=e,
                          capture_output=True, text=True, timeout=120)


def test_push_without_token_is_one_clear_line(project):
    r = run_cli(project["root"], "--push")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("publish: no Hugging Face token: set HF_TOKEN")


def test_push_without_network_is_one_clear_line(project):
    r = run_cli(project["root"], "--push", "--repo-id", "someone/x", HF_TOKEN="hf_not_a_real_token",
                HF_HUB_OFFLINE="1")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("publish: cannot push: HF_HUB_OFFLINE is set")
    assert "hf_not_a_real_token" not in r.stdout + r.stderr


def test_smoke_adapter_is_not_pushed_without_force(tmp_path, monkeypatch, no_network, capsys):
    pubkit.make_project(tmp_path)  # adapter trained on tiny-random
    monkeypatch.chdir(tmp_path)
    with pytest.raises(publish.PublishError) as err:
        publish.main(["--push"])
    assert "refusing to push" in err.value.message and "--force" in err.value.message
    # its card names no hub base model, says it is a test adapter, and keeps FLUX.1-dev's licence
    assert publish.main([]) == 0
    card = ModelCard.load(tmp_path / "models/hub/README.md")
    assert "base_model" not in card.data.to_dict()
    assert card.data.license_name == "flux-1-dev-non-commercial-license"
    assert "Test adapter" in card.text
    assert "0123456789abcdef" in card.text  # train's run, recorded for the adapter on disk
    # another adapter on disk (dvc checkout of another experiment): the recorded run is not its run
    (tmp_path / "models/lora/pytorch_lora_weights.safetensors").write_bytes(b"another adapter")
    assert publish.main([]) == 0
    other = ModelCard.load(tmp_path / "models/hub/README.md")
    assert "0123456789abcdef" not in other.text and "not recorded" in other.text
    assert "paints in the manner" not in card.text  # no claim the smoke adapter cannot keep
    usage = card.text[card.text.index("```python"):]
    usage = usage[:usage.index("```", 9)]
    assert "build_tiny_random" in usage and "smoke model" in usage and FLUX_DEV not in usage  # its own base


def test_missing_metrics_is_a_clear_error(tmp_path, monkeypatch):
    pubkit.make_project(tmp_path)
    (tmp_path / "reports/metrics.json").unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="metrics.json not found.*evaluate"):
        publish.main([])


def test_push_with_unreachable_hub_is_one_clear_line(project):
    """A real connection failure (a closed port on 127.0.0.1 as the endpoint), not the offline flag."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connection refused
    r = run_cli(project["root"], "--push", "--repo-id", "someone/x", HF_TOKEN="hf_not_a_real_token",
                HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("publish: cannot reach huggingface.co")


def test_card_names_the_optimizer_and_its_settings(dry_run):
    from stages.core import params
    from stages.modelcard import optimizer_text

    _, hub = dry_run
    assert "| optimizer | `adamw`, weight decay 0.0001 |" in (hub / "README.md").read_text()
    prodigy = params.Params(train={"optimizer": "prodigy", "lr": 1.0, "ema_decay": 0.999}).train.model_dump()
    text = optimizer_text(prodigy)
    assert text.startswith("`prodigy` (d_coef 1.0, use_bias_correction True, safeguard_warmup True")
    assert "EMA of the weights 0.999" in text
