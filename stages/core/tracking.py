"""MLflow tracking: one run per pipeline execution, shared by the stages that log to it.

A stage does::

    from stages.core import tracking
    with tracking.run("train", p, new=True):       # train owns the run; sample/evaluate: new=False
        tracking.log_metrics({"loss": 0.3}, step=10)
        tracking.log_artifacts(["reports/train/loss.tsv"])
        tracking.register_adapter("models/lora", p)

- Where: ``MLFLOW_TRACKING_URI`` when set (a team server), else ``sqlite:///<repo root>/mlflow.db``
  with artifacts in ``<repo root>/mlartifacts``. The repo root is the *main* repo even when DVC runs
  the stage in a copy (``dvc exp run --temp``, ``--queue`` run under ``.dvc/tmp/exps``): DVC passes
  it as ``DVC_ROOT``. A relative path there would land in the throw-away copy.
- Which run: ``new=True`` starts a run and records its id in ``reports/mlflow_run.json`` (declare it
  as a ``cache: false`` output of that stage); ``new=False`` resumes the recorded run (or, when there
  is none, logs to a run of its own without touching the file). What a run gets: the whole params.yaml flattened, and tags (git commit, dirty
  flag, DVC experiment name, base model + revision, curated dataset hash from dvc.lock, profile).
- Secrets: values of environment variables whose name looks like a token/secret/key/password are
  replaced by ``***`` in params, tags, metrics names and text artifacts; a binary artifact that
  contains one is not logged.
- Never breaks a stage: any tracking error (server down, bad URI) logs one warning and turns tracking
  off for the rest of the process. ``FLUXIMP_MLFLOW_STRICT=1`` makes errors fatal instead;
  ``FLUXIMP_MLFLOW=0`` turns tracking off.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request
from unittest import mock
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

log = logging.getLogger(__name__)

RUN_FILE = Path("reports/mlflow_run.json")
CURATED = "data/curated"
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|API_?KEY|ACCESS_?KEY|_KEY$|^KEY$|AUTH",
                         re.IGNORECASE)
MASK = "***"
_state: dict[str, Any] = {"disabled": False, "warned": False, "run_id": None}


# ----------------------------------------------------------------------------- where and what
def repo_root() -> Path:
    """The main repo's root: ``DVC_ROOT`` (set by DVC, the parent repo even for temp/queued
    experiments), else the git top level of the working directory, else the working directory."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 3):  # <root>/.dvc/tmp/exps/... without DVC_ROOT: still the parent
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
        if top.returncode == 0 and top.stdout.strip():
            return Path(top.stdout.strip()).resolve()
    except (OSError, subprocess.SubprocessError):
        pass
    return cwd


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def enabled() -> bool:
    return os.environ.get("FLUXIMP_MLFLOW", "1") != "0" and not _state["disabled"]


def _strict() -> bool:
    return os.environ.get("FLUXIMP_MLFLOW_STRICT", "0") not in ("", "0", "false", "False")


def secret_values() -> list[str]:
    """Values of environment variables named like credentials (long enough to be one)."""
    vals = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 6}
    return sorted(vals, key=len, reverse=True)


def scrub(value: Any, secrets: list[str] | None = None) -> str:
    text = str(value)
    for s in secret_values() if secrets is None else secrets:
        text = text.replace(s, MASK)
    return text


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"lora": {"rank": 4}} -> {"lora.rank": 4}``; lists stay whole (as their repr)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _git(*args: str, cwd=None) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(cwd=None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout at ``cwd``; (None, None) outside git. Untracked files don't count."""
    dirty = _git("status", "--porcelain", "--untracked-files=no", cwd=cwd)
    return _git("rev-parse", "HEAD", cwd=cwd), None if dirty is None else bool(dirty)


def dataset_hash(lock: os.PathLike | str = "dvc.lock", path: str = CURATED) -> str | None:
    """The md5 DVC recorded for ``path`` (an output of some stage) in dvc.lock, if any."""
    try:
        stages = (yaml.safe_load(Path(lock).read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return None
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path", "").rstrip("/") == path:
                return out.get("md5")
    return None


def run_tags(p, stage: str) -> dict[str, str]:
    commit, dirty = git_state()
    tags = {
        "git.commit": commit,
        "git.dirty": None if dirty is None else str(dirty).lower(),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
        "dvc.exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV"),
        "model.base": p.model.base,
        "model.revision": p.model.revision,
        "dataset.curated_md5": dataset_hash(),
        "profile": p.profile,
    }
    return {k: str(v) for k, v in tags.items() if v is not None}


# ----------------------------------------------------------------------------- fail-soft
def _safe(fn):
    """Run ``fn`` only when tracking is on; turn any error into one warning (or raise if strict)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not enabled():
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never break a stage
            if _strict():
                raise
            _state["disabled"] = True
            if not _state["warned"]:
                _state["warned"] = True
                log.warning("MLflow tracking off for this stage (%s: %s); set FLUXIMP_MLFLOW_STRICT=1 "
                            "to make this fatal", type(exc).__name__, scrub(exc))
            return None
    return wrapper


def _check_server(uri: str) -> None:
    """A fast reachability check, so a down server costs seconds, not MLflow's long retries."""
    if uri.startswith(("http://", "https://")):
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
            resp.read()


# ----------------------------------------------------------------------------- the run
def start(stage: str, p, new: bool = False) -> str | None:
    """Start (``new=True``) or resume the pipeline's run; return its id (None when tracking is off).

    With ``new=True`` RUN_FILE is always written (a declared DVC output must exist), with
    ``"run_id": null`` when tracking is off or failed."""
    run_id = _start(stage, p, new)
    if new and run_id is None:
        from stages.core.io import write_json
        write_json(RUN_FILE, {"run_id": None, "experiment_id": None, "tracking_uri": None,
                              "note": "MLflow tracking was off or unreachable for this run"})
    return run_id


@_safe
def _start(stage: str, p, new: bool) -> str | None:
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    uri = tracking_uri()
    _check_server(uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.active_run():
        mlflow.end_run()
    run_id = None if new else _recorded_run(uri)
    if run_id:
        mlflow.start_run(run_id=run_id)
        log.info("MLflow: resuming run %s (%s)", run_id, uri)
    else:
        exp_id = _experiment_id(mlflow, p.mlflow.experiment, uri)
        name = os.environ.get("DVC_EXP_NAME") or None
        run_id = mlflow.start_run(experiment_id=exp_id, run_name=name).info.run_id
        if new:  # only the owner writes RUN_FILE: it is that stage's DVC output, nobody else's
            from stages.core.io import write_json
            write_json(RUN_FILE, {"run_id": run_id, "experiment_id": exp_id, "tracking_uri": scrub(uri)})
        else:
            log.warning("MLflow: no run recorded in %s; logging %s to a run of its own", RUN_FILE, stage)
        log.info("MLflow: new run %s in experiment %r (%s)", run_id, p.mlflow.experiment, uri)
    _state["run_id"] = run_id
    set_tags({**run_tags(p, stage), f"stage.{stage}": "ran"})
    log_params(flatten(p.model_dump()))
    return run_id


def _recorded_run(uri: str) -> str | None:
    """The run id in RUN_FILE if it belongs to this tracking server and still exists there."""
    import mlflow

    try:
        rec = json.loads(RUN_FILE.read_text())
        if rec.get("tracking_uri") != scrub(uri):
            return None
        mlflow.MlflowClient().get_run(rec["run_id"])
        return rec["run_id"]
    except Exception:  # noqa: BLE001 - missing, unreadable or unknown: start a new run
        return None


def _experiment_id(mlflow, name: str, uri: str) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):  # otherwise MLflow picks ./mlruns of the (possibly temp) cwd
        location = (repo_root() / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


@_safe
def end(status: str = "FINISHED") -> None:
    if not _active():
        return
    import mlflow

    if mlflow.active_run():
        mlflow.end_run(status=status)
    _state["run_id"] = None


@contextlib.contextmanager
def run(stage: str, p, new: bool = False) -> Iterator[str | None]:
    """``start`` ... ``end``; the run is marked FAILED if the block raises (and the error re-raised)."""
    run_id = start(stage, p, new=new)
    try:
        yield run_id
    except BaseException:
        end("FAILED")
        raise
    end("FINISHED")


def _active() -> bool:
    return _state["run_id"] is not None


# ----------------------------------------------------------------------------- logging
@_safe
def log_params(params: dict[str, Any]) -> None:
    """Log params (already flat), secrets masked. On a resumed run, a key already logged with
    another value cannot change (MLflow forbids it): the new value goes to a ``param.<key>`` tag."""
    import mlflow

    if not _active():
        return
    secrets = secret_values()
    clean = {k: (MASK if SECRET_NAME.search(k.split(".")[-1]) else scrub(v, secrets)[:6000])
             for k, v in params.items()}
    logged = mlflow.get_run(_state["run_id"]).data.params
    fresh = {k: v for k, v in clean.items() if k not in logged}
    changed = {f"param.{k}": v for k, v in clean.items() if k in logged and logged[k] != v}
    for i in range(0, len(fresh), 100):  # MLflow's batch limit
        mlflow.log_params(dict(list(fresh.items())[i:i + 100]))
    if changed:
        log.warning("MLflow: %d params differ from the run's first values; logged as tags", len(changed))
        mlflow.set_tags(changed)


@_safe
def set_tags(tags: dict[str, Any]) -> None:
    import mlflow

    if _active():
        secrets = secret_values()
        mlflow.set_tags({k: scrub(v, secrets) for k, v in tags.items()})


@_safe
def log_metrics(metrics: dict[str, Any], step: int | None = None, prefix: str = "") -> None:
    """Log numeric metrics (nested dicts are flattened, non-numbers skipped)."""
    import mlflow

    if not _active():
        return
    flat = {f"{prefix}{k}": v for k, v in flatten(metrics).items()}
    nums = {scrub(k): float(v) for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if nums:
        mlflow.log_metrics(nums, step=step)


@_safe
def log_artifacts(paths: Iterable[os.PathLike | str], artifact_path: str | None = None) -> None:
    """Log files and folders (folders keep their name); secrets are scrubbed on the way."""
    import mlflow

    if not _active():
        return
    secrets = [s.encode() for s in secret_values()]
    with tempfile.TemporaryDirectory(prefix="mlflow-art-") as tmp:
        for path in map(Path, paths):
            if not path.exists():
                log.warning("MLflow: artifact %s does not exist, skipped", path)
                continue
            dst = Path(tmp) / path.name
            if path.is_dir():
                shutil.copytree(path, dst)
                files = [f for f in dst.rglob("*") if f.is_file()]
            else:
                shutil.copy2(path, dst)
                files = [dst]
            for f in files:
                _scrub_file(f, secrets)
        mlflow.log_artifacts(tmp, artifact_path=artifact_path)


@_safe
def log_image(image, key: str, step: int | None = None) -> None:
    """One PIL image under ``key`` at ``step`` (MLflow's image series: a step slider in the UI)."""
    import mlflow

    if _active():
        mlflow.log_image(image, key=key, step=step)


def _scrub_file(path: Path, secrets: list[bytes]) -> None:
    data = path.read_bytes()
    found = [s for s in secrets if s in data]
    if not found:
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("MLflow: %s contains a secret value and is binary: not logged", path.name)
        path.unlink()
        return
    for s in found:
        text = text.replace(s.decode(), MASK)
    path.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------- model registry
@_safe
def register_adapter(lora_dir: os.PathLike | str, p, name: str | None = None,
                     base_model: str | None = None) -> str | None:
    """Log the LoRA folder with the ``mlflow.diffusers`` flavour and register it under
    ``params.mlflow.registered_model`` (or ``name``); return the new version number.

    ``base_model`` overrides ``p.model.base`` (pass the local folder a hub id resolved to, if any).
    The pinned ``p.model.revision`` is recorded as the flavour's base model revision."""
    import mlflow
    import mlflow.diffusers

    if not _active():
        return None
    name = name or p.mlflow.registered_model
    base = str(base_model or p.model.base)
    with tempfile.TemporaryDirectory(prefix="mlflow-adapter-") as tmp:
        out = Path(tmp) / "adapter"
        # MLflow would ask the Hub for the *latest* commit of a hub id: record the pinned one instead
        with mock.patch.object(mlflow.diffusers, "_resolve_base_model_revision",
                               lambda _base: p.model.revision, create=True):
            mlflow.diffusers.save_model(str(lora_dir), str(out), base_model=base)
        mlmodel = out / "MLmodel"
        spec = yaml.safe_load(mlmodel.read_text())
        flavor = spec["flavors"]["diffusers"]
        flavor.pop("base_model_revision", None)  # never a revision MLflow looked up on its own
        if p.model.revision:
            flavor["base_model_revision"] = p.model.revision
        mlmodel.write_text(yaml.safe_dump(spec, sort_keys=False))
        log_artifacts([out])
    version = mlflow.register_model(f"runs:/{_state['run_id']}/adapter", name)
    mlflow.MlflowClient().set_model_version_tag(name, version.version, "lora.rank", str(p.lora.rank))
    log.info("MLflow: registered %s version %s", name, version.version)
    return version.version


def load_registered_adapter(name: str, version: str | int = "latest",
                            dst: os.PathLike | str | None = None) -> Path:
    """Download a registered adapter; return the folder ``pipe.load_lora_weights(folder)`` takes.

    Uses MLFLOW_TRACKING_URI (or the repo's sqlite database). Errors are raised: this is for users."""
    import mlflow
    import mlflow.diffusers

    mlflow.set_tracking_uri(tracking_uri())
    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
    model = mlflow.diffusers.load_model(f"models:/{name}/{version}", dst_path=str(dst) if dst else None)
    return Path(model.adapter_path)


def reset() -> None:
    """Forget the warning/disabled state (tests; a long-lived process starting a new pipeline)."""
    _state.update(disabled=False, warned=False, run_id=None)
