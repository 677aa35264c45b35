"""The one secret scrubber (stages.core.secrets) on everything that leaves the run: a secret planted
in params (inside URL params, as realistic) and in the environment is absent from every byte the
run, the registry and publish write (MLflow's sqlite database and artifacts, models/hub/), from log
lines, and from the message of a tracking URI with inline credentials."""
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stages import publish
from stages.core import log, params, registry, tracking
from stages.core.secrets import masked, scrub
from tests import pubkit
from tests.servers import free_port

PLANTED = {"url_password": "PLANTED-PW-1a2b", "url_token": "PLANTED-TOK-3c4d", "signature": "PLANTED-SIG-5e6f",
           "hf": "hf_PLANTEDhfTOKEN0123456789abcdef", "mlflow_pw": "PLANTED-MLPW-7a8b"}
FLUX_DEV = "black-forest-labs/FLUX.1-dev"


@pytest.mark.parametrize("text,clean", [
    ("https://alice:pw123@host/x", "https://***@host/x"),
    ("https://host/head.pth?token=abc&v=2", "https://host/head.pth?token=***&v=2"),
    ("s3://b/k?X-Amz-Signature=dead&X-Amz-Date=1", "s3://b/k?X-Amz-Signature=***&X-Amz-Date=1"),
    ("https://h/p?api_key=zz#top", "https://h/p?api_key=***#top"),
    ("token hf_abcdefghijklmnopqrstuvwxyz012 here", "token *** here"),
    ("/data/pics/10_monet", "/data/pics/10_monet"),
    ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
    ("http://127.0.0.1:5000/#/experiments/1/runs", "http://127.0.0.1:5000/#/experiments/1/runs"),
])
def test_scrub_masks_what_looks_like_a_credential_and_nothing_else(text, clean):
    assert scrub(text, secrets=[]) == clean


def test_masked_keeps_numbers_and_masks_credential_keys():
    got = masked("", {"caption": {"max_new_tokens": 40, "hub_token": "plain"}, "x": ["a?token=1", 3]}, secrets=[])
    assert got == {"caption": {"max_new_tokens": 40, "hub_token": "***"}, "x": ["a?token=***", 3]}


def test_env_secrets_and_url_passwords_in_env_are_masked(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://bob:{PLANTED['mlflow_pw']}@mlflow.example.com")
    assert PLANTED["mlflow_pw"] not in scrub(f"password {PLANTED['mlflow_pw']} leaked")


def test_a_tracking_uri_with_credentials_is_never_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLUXIMP_MLFLOW", raising=False)
    monkeypatch.delenv("FLUXIMP_MLFLOW_OPTIONAL", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:{PLANTED['mlflow_pw']}@127.0.0.1:{free_port()}")
    tracking.reset()
    try:
        with pytest.raises(tracking.TrackingError) as exc:
            tracking.start("train", params.Params(), new=True)
    finally:
        tracking.reset()
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    msg = str(exc.value)
    assert "http://***@127.0.0.1" in msg and PLANTED["mlflow_pw"] not in msg and "bob" not in msg
    assert "URLError" in msg  # the health check reached the (absent) server: no InvalidURL on user:pw@


def test_log_lines_are_scrubbed(capfd):
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        log.setup("secrets-test")
        logging.getLogger("stages.secrets-test").warning("head %s", f"https://a:{PLANTED['url_password']}@h/x")
        try:
            raise ValueError(f"bad token {PLANTED['hf']}")
        except ValueError:
            logging.getLogger("stages.secrets-test").exception("failed")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capfd.readouterr().err
    assert "https://***@h/x" in err and "bad token ***" in err
    assert PLANTED["url_password"] not in err and PLANTED["hf"] not in err


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("secrets") / "project"
    facts = pubkit.make_project(root, base=FLUX_DEV)
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["filter"]["aesthetic"]["head"] = (f"https://alice:{PLANTED['url_password']}@models.example.com/head.pth"
                                        f"?token={PLANTED['url_token']}")
    p["eval"]["csd_weights"] = f"https://h.example.com/csd.pt?X-Amz-Signature={PLANTED['signature']}&X-Amz-Date=1"
    p["caption"]["prompt"] = f"describe {PLANTED['hf']}"
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    subprocess.run("git init -q && git add -A && git -c user.email=t@t -c user.name=t commit -qm fixture",
                   cwd=root, shell=True, check=True)
    return facts


def test_a_planted_secret_is_in_no_file_the_run_and_publish_write(project, monkeypatch, capfd):
    import mlflow

    root = project["root"]
    monkeypatch.chdir(root)
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "FLUXIMP_MLFLOW", "FLUXIMP_MLFLOW_OPTIONAL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_TOKEN", PLANTED["hf"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PLANTED["mlflow_pw"])
    p = params.load()
    # the param under a changed value, so that the version description lists it
    changed = p.model_copy(update={"eval": p.eval.model_copy(update={
        "csd_weights": f"{p.eval.csd_weights}&token={PLANTED['url_token']}"})})
    shutil.copy(root / "params.yaml", root / "params-copy.yaml")
    (root / "notes.md").write_text(f"trained with MLflow password {PLANTED['mlflow_pw']}\n")
    tracking.reset()
    try:
        with tracking.run("train", changed, new=True) as run_id:
            tracking.log_metrics({"train/loss": 0.5}, step=1)
            tracking.set_tags({"note": f"head={p.filter.aesthetic.head}"})
            tracking.log_artifacts([root / "params-copy.yaml", root / "notes.md", root / "models/lora/adapter.json"])
            version = registry.register_adapter(root / "models/lora", changed, base_model=str(project["base_path"]))
        with tracking.run("evaluate", changed):
            registry.describe_version(changed, metrics=pubkit.METRICS)
    finally:
        tracking.end()
        tracking.reset()
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert run_id and str(version) == "1"
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    desc = client.get_model_version(changed.mlflow.registered_model, version).description
    assert "eval.csd_weights=" in desc and "token=***" in desc  # the changed param is listed, masked
    assert client.get_run(run_id).data.params["filter.aesthetic.head"] == (
        "https://***@models.example.com/head.pth?token=***")

    with pytest.raises(SystemExit) as exc:  # publish's __main__ turns the return code into an exit
        raise SystemExit(publish.main(["--repo-id", "someone/flux-impressionism-lora"]))
    assert exc.value.code == 0
    hub = root / "models/hub"
    hub_params = yaml.safe_load((hub / "params.yaml").read_text())
    assert hub_params["filter"]["aesthetic"]["head"] == "https://***@models.example.com/head.pth?token=***"
    assert hub_params["eval"]["csd_weights"] == "https://h.example.com/csd.pt?X-Amz-Signature=***&X-Amz-Date=1"

    inputs = {root / "params.yaml", root / "params-copy.yaml", root / "notes.md"}  # the user's own files
    written = [f for f in root.rglob("*") if f.is_file() and ".git" not in f.parts and f not in inputs]
    assert any(f.name == "mlflow.db" for f in written) and any("mlartifacts" in f.parts for f in written)
    assert any(f.name == "MLmodel" for f in written) and (hub / "README.md") in written
    out = capfd.readouterr()
    for secret in PLANTED.values():
        assert secret not in out.out + out.err, secret
        for f in written:
            assert secret.encode() not in f.read_bytes(), (secret, f)
    artifacts = {f.name: f for f in written if "mlartifacts" in f.parts}
    assert "params-copy.yaml" in artifacts and "***" in artifacts["notes.md"].read_text()
    assert json.loads((hub / "metrics.json").read_text()) == pubkit.METRICS


def test_an_uncaught_traceback_is_scrubbed(tmp_path):
    import subprocess
    import sys

    code = ("from stages.core import log; log.setup('x'); "
            f"raise RuntimeError('GET https://u:{PLANTED['url_password']}@h/x?token={PLANTED['url_token']} failed')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 1 and "RuntimeError: GET https://***@h/x?token=*** failed" in proc.stderr
    assert PLANTED["url_password"] not in proc.stderr and PLANTED["url_token"] not in proc.stderr
