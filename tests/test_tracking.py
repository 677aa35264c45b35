"""stages.core.tracking + lineage + registry: where runs go (the main repo, also from DVC's temp
copies and after the repo moved), one run per pipeline execution, params/tags/metrics/artifacts, no
secrets, loud failures (best-effort only when asked), no run left RUNNING, and the adapter registry
round trip against a real `mlflow server` process."""
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages.core import lineage, params, registry, tracking
from tests.servers import free_port, serve

REPO = Path(__file__).resolve().parents[1]
SECRETS = {"HF_TOKEN": "hf_TESTtokenValue0123456789", "AWS_SECRET_ACCESS_KEY": "awsSecretKeyValue/xyz987",
           "MY_SERVICE_PASSWORD": "pw-horse-battery-staple", "OPENAI_API_KEY": "sk-testkey-4242424242"}


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV",
                "FLUXIMP_MLFLOW", "FLUXIMP_MLFLOW_OPTIONAL"):
        monkeypatch.delenv(var, raising=False)
    tracking.reset()
    yield
    tracking.end()
    tracking.reset()
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri() exports it: don't leak it


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A committed git repo holding params.yaml and a dvc.lock with a curated dataset hash."""
    root = tmp_path / "repo"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(params.Params().model_dump()))
    lock = {"schema": "2.0", "stages": {"caption": {"cmd": "python -m stages.caption", "outs": [
        {"path": "data/curated", "hash": "md5", "md5": "0123abcd.dir", "size": 10, "nfiles": 2}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.chdir(root)
    return root


def test_repo_root_is_the_main_repo_even_in_a_dvc_temp_copy(tmp_path, monkeypatch):
    main = tmp_path / "main"
    copy = main / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert lineage.repo_root() == main.resolve()  # from the path alone
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "elsewhere"))
    assert lineage.repo_root() == (tmp_path / "elsewhere").resolve()  # DVC says so: it wins
    assert tracking.tracking_uri() == f"sqlite:///{(tmp_path / 'elsewhere').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.team:5000")
    assert tracking.tracking_uri() == "http://mlflow.team:5000"


def test_repo_root_is_git_top_level_from_a_subfolder(workdir, monkeypatch):
    (workdir / "sub").mkdir()
    monkeypatch.chdir(workdir / "sub")
    assert lineage.repo_root() == workdir.resolve()


def test_flatten_scrub_and_dataset_hash(workdir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    monkeypatch.setenv("SHORT_TOKEN", "1")  # too short to be a credential: never masked
    flat = lineage.flatten({"lora": {"rank": 4, "rank_map": {}}, "seed": 1, "s": {"x": [1, 2]}})
    assert flat == {"lora.rank": 4, "lora.rank_map": {}, "seed": 1, "s.x": [1, 2]}
    assert lineage.scrub(f"a {SECRETS['HF_TOKEN']} b 1") == "a *** b 1"
    assert lineage.dataset_hash() == "0123abcd.dir"
    assert lineage.dataset_hash(workdir / "missing.lock") is None


def test_dir_md5_is_dvcs_hash_of_the_files_on_disk(tmp_path):
    """dir_md5 gives the value `dvc add` records for the same folder (so tags compare with dvc.lock)."""
    from tests import tinydvc

    d = tmp_path / "proj"
    (d / "data/sub").mkdir(parents=True)
    (d / "data/a.parquet").write_bytes(bytes(range(256)) * 9)
    (d / "data/sub/b.txt").write_text("line\r\nline\n")
    tinydvc.sh(d, "git", "init", "-q")
    tinydvc.dvc(d, "init", "-q")
    tinydvc.dvc(d, "add", "-q", "data")
    recorded = yaml.safe_load((d / "data.dvc").read_text())["outs"][0]["md5"]
    assert lineage.dir_md5(d / "data") == recorded
    (d / "data/a.parquet").write_bytes(b"other rows")
    assert lineage.dir_md5(d / "data") != recorded and lineage.dir_md5(d / "missing") is None


def read_run_file():
    return json.loads(Path(tracking.RUN_FILE).read_text())


def fake_adapter(folder: Path, content: bytes) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / lineage.ADAPTER_WEIGHTS).write_bytes(content)
    return lineage.adapter_hash(folder)


def test_one_run_per_pipeline_execution_in_the_main_repo_from_a_temp_copy(workdir, monkeypatch):
    """train starts the run and tags it with its adapter's hash, sample/evaluate attach to it by that
    hash, from a copy under .dvc/tmp/exps; the database and artifacts land in the main repo, the run
    file in the copy (a stage output)."""
    import mlflow

    main = workdir / "main"
    copy = main / ".dvc" / "tmp" / "exps" / "tmpq1"
    copy.mkdir(parents=True)
    shutil.copy(workdir / "params.yaml", copy)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(main))
    monkeypatch.setenv("DVC_EXP_NAME", "rank-sweep-4")
    p = params.load()

    with tracking.run("train", p, new=True) as run_id:
        for step in range(3):
            tracking.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        Path("loss.tsv").write_text("step\tloss\n0\t1.0\n")
        tracking.log_artifacts(["loss.tsv"], artifact_path="curves")
        sha = fake_adapter(Path("lora"), b"adapter one")
        assert tracking.tag_adapter("lora") == sha
    assert run_id and read_run_file()["run_id"] == run_id and read_run_file()["adapter_sha256"] == sha
    with tracking.run("evaluate", p, adapter_sha=sha) as again:
        tracking.log_metrics({"style": {"csd": 0.25}, "ok": True, "label": "x"})
    assert again == run_id

    assert (main / "mlflow.db").exists() and not (copy / "mlflow.db").exists()
    assert not (copy / "mlruns").exists()
    client = mlflow.MlflowClient(f"sqlite:///{main}/mlflow.db")
    run = client.get_run(run_id)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0, 0.5, 1 / 3]
    assert run.data.metrics["style.csd"] == 0.25 and "ok" not in run.data.metrics
    assert run.data.params["lora.rank"] == "4" and run.data.params["mlflow.experiment"] == p.mlflow.experiment
    assert run.data.tags["dvc.exp_name"] == "rank-sweep-4" and run.info.run_name == "rank-sweep-4"
    assert run.data.tags["stage.train"] == run.data.tags["stage.evaluate"] == "ran"
    assert run.info.status == "FINISHED"
    assert Path(run.info.artifact_uri.replace("file://", "")).is_relative_to(main / "mlartifacts")
    assert [f.path for f in client.list_artifacts(run_id, "curves")] == ["curves/loss.tsv"]

    # the next execution's train starts a new run; a later stage that sees changed params keeps the
    # first values (MLflow forbids changing a param) and records the new ones as tags
    with tracking.run("train", p, new=True) as second:
        sha2 = fake_adapter(Path("lora2"), b"adapter two")
        tracking.tag_adapter("lora2")
    assert second != run_id
    p2 = p.model_copy(update={"seed": 99})
    with tracking.run("evaluate", p2, adapter_sha=sha2) as same:
        pass
    run2 = client.get_run(second)
    assert same == second and run2.data.params["seed"] == "1234" and run2.data.tags["param.seed"] == "99"
    # the first adapter back on disk (dvc checkout): its own run again, whatever ran last; the run file
    # (train's record of the newest run) plays no part
    with tracking.run("sample", p, adapter_sha=sha) as back:
        pass
    assert back == run_id and read_run_file()["run_id"] == second

    # an adapter no run trained: a new run tagged with its hash, train's run file left alone
    Path(tracking.RUN_FILE).unlink()
    with tracking.run("sample", p, adapter_sha="f" * 64) as alone:
        pass
    assert alone not in (run_id, second) and not Path(tracking.RUN_FILE).exists()
    assert client.get_run(alone).data.tags[tracking.ADAPTER_TAG] == "f" * 64
    with tracking.run("evaluate", p, adapter_sha="f" * 64) as again_alone:  # found by that tag next time
        pass
    assert again_alone == alone


def test_tags_describe_the_code_and_data_and_a_failed_stage_fails_the_run(workdir, monkeypatch):
    import mlflow

    monkeypatch.setenv("DVC_EXP_NAME", "exp-tags")
    p = params.load()
    (workdir / "data/curated/train").mkdir(parents=True)
    (workdir / "data/curated/train/shard-0.parquet").write_bytes(b"rows")  # not dvc.lock's 0123abcd.dir
    with pytest.raises(RuntimeError):
        with tracking.run("train", p, new=True, reads={"curated": "data/curated"}) as run_id:
            raise RuntimeError("boom")
    run = mlflow.MlflowClient(tracking.tracking_uri()).get_run(run_id)
    assert run.info.status == "FAILED"
    tags = run.data.tags
    assert tags["git.commit"] == git(workdir, "rev-parse", "HEAD")
    assert tags["git.dirty"] == "false"
    assert tags["dataset.curated_md5"] == lineage.dir_md5("data/curated") != "0123abcd.dir"  # what it read
    assert tags["model.base"] == p.model.base and tags["profile"] == p.profile
    assert tags["dvc.exp_name"] == "exp-tags"


def test_unreachable_server_fails_the_stage_naming_the_uri(workdir, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingError, match=f"tracking URI {uri}.*FLUXIMP_MLFLOW_OPTIONAL=1"):
        tracking.start("train", params.load(), new=True)
    assert time.monotonic() - t0 < 30


def test_optional_tracking_warns_once_and_the_stage_goes_on(workdir, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("FLUXIMP_MLFLOW_OPTIONAL", "1")
    p = params.load()
    with caplog.at_level(logging.WARNING, logger="stages.core.tracking"):
        with tracking.run("train", p, new=True) as run_id:
            tracking.log_metrics({"loss": 1.0}, step=0)
            tracking.log_artifacts(["params.yaml"])
            assert registry.register_adapter(workdir, p) is None
        with tracking.run("evaluate", p):
            tracking.log_metrics({"style": 1.0})
    assert run_id is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "WITHOUT tracking" in warnings[0].getMessage()
    assert json.loads(Path(tracking.RUN_FILE).read_text())["run_id"] is None  # the DVC output exists


def test_a_failing_mlflow_call_mid_run_fails_the_stage_and_the_run(workdir, monkeypatch):
    """(The queued-experiment KeyError of MLflow's telemetry: 5 of 63 metrics, exit 0, FINISHED.)"""
    import mlflow

    p = params.load()

    def broken(*a, **k):
        raise KeyError("_MLFLOW_TELEMETRY_SESSION_ID")

    with pytest.raises(tracking.TrackingError, match="log_metrics .*KeyError"):
        with tracking.run("evaluate", p, new=True) as run_id:
            monkeypatch.setattr(mlflow, "log_metrics", broken)
            tracking.log_metrics({"style": 1.0})
    assert mlflow.MlflowClient(tracking.tracking_uri()).get_run(run_id).info.status == "FAILED"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"

    tracking.reset()  # best-effort mode: the stage goes on, the run is still not FINISHED
    monkeypatch.setenv("FLUXIMP_MLFLOW_OPTIONAL", "1")
    with tracking.run("evaluate", p, new=True) as second:
        tracking.log_metrics({"style": 1.0})
    run = mlflow.MlflowClient(tracking.tracking_uri()).get_run(second)
    assert run.info.status == "FAILED" and run.data.tags["fluximp.tracking_error"] == "true"


@pytest.mark.parametrize("damage", ["emptied", "truncated", "not_mlflow"])
def test_an_emptied_or_corrupt_mlflow_db_is_refused_not_recreated(workdir, damage):
    """(An emptied mlflow.db was silently recreated by MLflow: the history gone without a word.)"""
    import sqlite3

    p = params.load()
    with tracking.run("train", p, new=True):
        tracking.log_metrics({"loss": 1.0})
    db = workdir / "mlflow.db"
    good = db.read_bytes()
    if damage == "emptied":
        db.write_bytes(b"")
    elif damage == "truncated":
        db.write_bytes(good[:4096] + b"\x00" * 4096)
    else:
        db.unlink()
        sqlite3.connect(db).execute("CREATE TABLE notes (x)").connection.commit()
    damaged = db.read_bytes()
    for start in (lambda: tracking.run("train", p, new=True).__enter__(), tracking.check_database):
        tracking.reset()
        with pytest.raises(tracking.TrackingError, match=f"MLflow database {db} .*not recreated.*mv {db}"):
            start()
        assert db.read_bytes() == damaged  # left as it was, for the user to restore


def test_out_of_memory_in_an_mlflow_call_is_not_reported_as_a_server_problem(workdir, monkeypatch, caplog):
    import mlflow

    p = params.load()
    for oom in (MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                OSError(12, "Cannot allocate memory")):
        tracking.reset()
        with tracking.run("train", p, new=True), monkeypatch.context() as m:
            m.setattr(mlflow, "log_metrics", lambda *a, oom=oom, **k: (_ for _ in ()).throw(oom))
            with pytest.raises(type(oom)) as exc:
                tracking.log_metrics({"loss": 1.0})
        assert exc.value is oom and not isinstance(exc.value, tracking.TrackingError)
        assert "not an MLflow problem" in caplog.text and "Fix the server" not in caplog.text


def test_a_run_left_running_by_a_killed_stage_is_closed_on_the_next_start(workdir):
    import mlflow

    p = params.load()
    dead = subprocess.Popen(["true"])
    dead.wait()
    with tracking.run("train", p, new=True) as killed:
        pass
    client = mlflow.MlflowClient(tracking.tracking_uri())
    client.update_run(killed, status="RUNNING")  # as a kill -9 leaves it ...
    client.set_tag(killed, "fluximp.pid", str(dead.pid))  # ... by a process that is gone
    alive = client.create_run(client.get_run(killed).info.experiment_id, tags={
        "fluximp.host": __import__("socket").gethostname(), "fluximp.pid": str(os.getppid())}).info.run_id
    with tracking.run("train", p, new=True):
        pass
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(alive).info.status == "RUNNING"  # another stage still running: left alone


def test_a_moved_repo_writes_artifacts_into_itself(workdir, tmp_path, monkeypatch):
    import mlflow

    p = params.load()
    with tracking.run("train", p, new=True) as first:
        tracking.log_artifacts(["params.yaml"])
    tracking.reset()
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri() exported the old one
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved)
    shutil.rmtree(workdir)  # the old place is gone
    monkeypatch.chdir(moved)
    with tracking.run("train", p, new=True) as second:
        tracking.log_artifacts(["params.yaml"])
    client = mlflow.MlflowClient(f"sqlite:///{moved}/mlflow.db")
    for run_id in (first, second):
        art = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
        assert art.is_relative_to(moved / "mlartifacts") and (art / "params.yaml").exists(), art
    assert not workdir.exists()


def test_no_version_is_registered_without_its_metrics(workdir, tmp_path):
    import mlflow

    p = params.load()
    (tmp_path / lineage.ADAPTER_WEIGHTS).write_bytes(b"weights")
    with pytest.raises(tracking.TrackingError, match="no metrics"):
        with tracking.run("train", p, new=True):
            registry.register_adapter(tmp_path, p, final_step=3)
    tracking.reset()
    with pytest.raises(tracking.TrackingError, match="train/loss up to step 1, not 3"):
        with tracking.run("train", p, new=True):
            tracking.log_metrics({"loss": 1.0}, step=1, prefix="train/")
            registry.register_adapter(tmp_path, p, final_step=3)
    assert not mlflow.MlflowClient(tracking.tracking_uri()).search_registered_models()


def test_tracking_can_be_switched_off(workdir, monkeypatch):
    monkeypatch.setenv("FLUXIMP_MLFLOW", "0")
    with tracking.run("train", params.load(), new=True) as run_id:
        tracking.log_metrics({"loss": 1.0})
    assert run_id is None and not (workdir / "mlflow.db").exists()
    assert json.loads(Path(tracking.RUN_FILE).read_text())["run_id"] is None


# ----------------------------------------------------------------------------- a real server
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 (sqlite backend, served artifacts), killed at the end."""
    d = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{d}/db.sqlite",
           "--artifacts-destination", str(d / "artifacts")]
    url = f"http://127.0.0.1:{port}"
    with serve(cmd, url + "/health", d / "server.log", timeout=240, cwd=d):
        yield url


def make_lora(transformer_dir: Path, out: Path) -> Path:
    """A LoRA for the tiny transformer, saved the way diffusers' Flux training scripts do."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    tr = FluxTransformer2DModel.from_pretrained(transformer_dir, subfolder="transformer")
    tr.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, w in tr.named_parameters():
            if "lora_B" in name:
                w.normal_()  # gaussian init leaves B = 0: make the adapter change the model
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(tr))
    (out / "adapter.json").write_text(json.dumps({"rank": 4}))
    return out


@pytest.mark.slow
def test_real_server_run_registry_and_no_secrets(mlflow_server, workdir, monkeypatch, tmp_path):
    import mlflow
    import torch
    from safetensors.torch import load_file

    from stages.models import flux

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    tiny = flux.build_tiny_random(tmp_path / "tiny")
    lora_dir = make_lora(tiny, tmp_path / "lora")

    p = params.load()
    p = p.model_copy(update={
        "caption": p.caption.model_copy(update={"prompt": f"describe {SECRETS['HF_TOKEN']}"}),
        "data": p.data.model_copy(update={"path": f"s3://bucket?key={SECRETS['AWS_SECRET_ACCESS_KEY']}"}),
        "model": p.model.model_copy(update={"revision": "0123456789abcdef"}),
        "mlflow": p.mlflow.model_copy(update={"experiment": "server-test", "registered_model": "tiny-lora"})})
    report = workdir / "report.md"
    report.write_text(f"# report\nkey {SECRETS['OPENAI_API_KEY']} pw {SECRETS['MY_SERVICE_PASSWORD']}\n")
    blob = workdir / "blob.bin"
    blob.write_bytes(b"\x00\xff" + SECRETS["HF_TOKEN"].encode() + b"\x00")
    (workdir / "grids").mkdir()
    (workdir / "grids" / "grid.png").write_bytes(b"\x89PNG fake image bytes")

    with tracking.run("train", p, new=True) as run_id:
        for step in range(5):
            tracking.log_metrics({"loss": 1.0 - step / 10, "lr": 1e-3}, step=step)
        tracking.set_tags({"note": f"token={SECRETS['HF_TOKEN']}"})
        version = registry.register_adapter(lora_dir, p, base_model=str(tiny))
    with tracking.run("evaluate", p, adapter_sha=lineage.adapter_hash(lora_dir)) as same:  # found on the server
        tracking.log_metrics({"style_similarity": 0.4, "prompt_fidelity": 0.3})
        tracking.log_artifacts([report, blob, workdir / "grids"])
    assert run_id and same == run_id and version == "1"

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert len(client.get_metric_history(run_id, "loss")) == 5
    assert run.data.metrics["style_similarity"] == 0.4
    assert run.data.tags["model.revision"] == "0123456789abcdef"
    assert not (workdir / "mlflow.db").exists()  # everything went to the server

    # no secret value anywhere: params, tags, run file, artifacts (all files, downloaded)
    dl = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path / "dl"),
                                                  tracking_uri=mlflow_server))
    files = sorted(f.relative_to(dl).as_posix() for f in dl.rglob("*") if f.is_file())
    assert "report.md" in files and "grids/grid.png" in files and "blob.bin" not in files
    texts = [json.dumps(run.data.params), json.dumps(run.data.tags), Path(tracking.RUN_FILE).read_text()]
    blobs = [f.read_bytes() for f in dl.rglob("*") if f.is_file()]
    for secret in SECRETS.values():
        assert all(secret not in t for t in texts), secret
        assert all(secret.encode() not in b for b in blobs), secret
    assert run.data.params["caption.prompt"] == "describe ***"
    assert "***" in (dl / "report.md").read_text()

    # the registered version loads back into a pipeline through load_lora_weights
    mv = client.get_model_version("tiny-lora", version)
    assert mv.run_id == run_id and mv.tags["lora.rank"] == str(p.lora.rank)
    assert mv.tags[tracking.ADAPTER_TAG] == run.data.tags[tracking.ADAPTER_TAG] == lineage.adapter_hash(lora_dir)
    adapter = registry.load_registered_adapter("tiny-lora", version, dst=tmp_path / "reg")
    mlmodel = yaml.safe_load((adapter.parent / "MLmodel").read_text())["flavors"]["diffusers"]
    assert mlmodel["base_model"] == str(tiny) and mlmodel["base_model_revision"] == "0123456789abcdef"
    pipe = flux.load_pipeline(params.Model(base=str(tiny)), device="cpu", lora=str(adapter))
    saved = load_file(lora_dir / "pytorch_lora_weights.safetensors")
    key = next(k for k in saved if "lora_B" in k)
    loaded = dict(pipe.transformer.named_parameters())
    match = [n for n in loaded if n.endswith(key.removeprefix("transformer.").replace("lora_B.", "lora_B.default_0."))]
    assert match, key
    assert torch.equal(loaded[match[0]].detach(), saved[key])
    assert torch.count_nonzero(saved[key]) > 0
