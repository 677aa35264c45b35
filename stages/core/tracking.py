"""MLflow tracking: one run per pipeline execution, shared by the stages that log to it.
(Lineage values, git state, data hash, secret scrubbing: stages.core.lineage; the model
registry: stages.core.registry.)

A stage does::

    from stages.core import registry, tracking
    with tracking.run("train", p, new=True):       # train owns the run; sample/evaluate: new=False
        tracking.log_metrics({"loss": 0.3}, step=10)
        tracking.log_artifacts(["reports/train/loss.tsv"])
        registry.register_adapter("models/lora", p, final_step=150)

- Where: ``MLFLOW_TRACKING_URI`` when set (a team server), else ``sqlite:///<repo root>/mlflow.db``
  with artifacts in ``<repo root>/mlartifacts``. The repo root is the *main* repo even when DVC runs
  the stage in a copy (``dvc exp run --temp``, ``--queue`` run under ``.dvc/tmp/exps``): DVC passes
  it as ``DVC_ROOT``. A relative path there would land in the throw-away copy. A repo that was
  moved or copied (with its mlflow.db) has the artifact locations in the database pointed at its
  own ``mlartifacts`` on the next start, so artifacts never land in the old folder.
- Which run: ``new=True`` starts a run and records its id in ``reports/mlflow_run.json`` (local
  state, gitignored, not a DVC output: a run id is new on every run); ``new=False`` resumes the recorded run (or, when there
  is none, logs to a run of its own without touching the file). What a run gets: the whole params.yaml flattened, and tags (git commit, dirty
  flag, DVC experiment name, base model + revision, curated dataset hash from dvc.lock, profile,
  host and pid of the stage). A run left RUNNING by a killed stage on this host is marked KILLED
  on the next start; a stage that raises ends its run FAILED.
- Secrets: values of environment variables whose name looks like a token/secret/key/password are
  replaced by ``***`` in params, tags, metrics names and text artifacts; a binary artifact that
  contains one is not logged.
- Loud by default: a tracking error (server down, bad URI, a failing MLflow call) fails the stage
  with a message naming the URI, so metrics never go missing silently. ``FLUXIMP_MLFLOW=0`` turns
  tracking off; ``FLUXIMP_MLFLOW_OPTIONAL=1`` makes tracking best-effort: the first error logs a
  warning, the run (if any) is ended FAILED and the stage goes on without tracking. Out of memory in
  an MLflow call is re-raised as what it is (a memory limit), never reported as a server problem; an
  emptied or corrupt local mlflow.db stops the stage (stages.core.mlflow_store.database_problem).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import shutil
import socket
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Iterator

from stages.core import mlflow_store
from stages.core.lineage import MASK, SECRET_NAME, dataset_hash, flatten, git_state, repo_root, scrub, secret_values
from stages.core.paths import Train

log = logging.getLogger(__name__)

RUN_FILE = Train().run_file  # local state (stages/core/paths.py)
_state: dict[str, Any] = {"disabled": False, "warned": False, "run_id": None}


class TrackingError(SystemExit):
    """A tracking failure that stops the stage (a clean exit with the message)."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def enabled() -> bool:
    return os.environ.get("FLUXIMP_MLFLOW", "1") != "0" and not _state["disabled"]


def _optional() -> bool:
    return os.environ.get("FLUXIMP_MLFLOW_OPTIONAL", "0") not in ("", "0", "false", "False")


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


# ----------------------------------------------------------------------------- failures
def guarded(fn):
    """Decorator for every MLflow call: run ``fn`` only when tracking is on. An error fails the stage (TrackingError) or, with
    FLUXIMP_MLFLOW_OPTIONAL=1, logs one warning, ends the run FAILED and turns tracking off."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not enabled():
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every MLflow failure gets the same treatment
            if _out_of_memory(exc):  # this process's memory limit, not the server: say so, as it is
                log.error("out of memory in %s (%s): a memory limit of this machine or process, not an "
                          "MLflow problem", fn.__name__, type(exc).__name__)
                raise
            what = (f"MLflow tracking failed in {fn.__name__} ({type(exc).__name__}: {scrub(exc)}; "
                    f"tracking URI {scrub(tracking_uri())})")
            if not _optional():
                raise TrackingError(f"{what}. Fix the server or MLFLOW_TRACKING_URI, or rerun with "
                                    "FLUXIMP_MLFLOW_OPTIONAL=1 (go on without tracking) or FLUXIMP_MLFLOW=0 "
                                    "(tracking off)") from exc
            _state["disabled"] = True
            if not _state["warned"]:
                _state["warned"] = True
                log.warning("%s; FLUXIMP_MLFLOW_OPTIONAL=1: the stage goes on WITHOUT tracking and this "
                            "run's MLflow record is incomplete (ended FAILED)", what)
            _abandon()
            return None
    return wrapper


def _abandon() -> None:
    """End the active run FAILED after a tracking error (best effort: the server may be gone)."""
    try:
        import mlflow

        if mlflow.active_run():
            mlflow.set_tag("fluximp.tracking_error", "true")
            mlflow.end_run(status="FAILED")
    except Exception:  # noqa: BLE001 - already failing; the warning said so
        pass
    _state["run_id"] = None


def _check_server(uri: str) -> None:
    """A fast reachability check, so a down server costs seconds, not MLflow's long retries."""
    if uri.startswith(("http://", "https://")):
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
            resp.read()


def check_database(uri: str | None = None) -> None:
    """A local sqlite store that exists must be an intact MLflow database (TrackingError otherwise,
    also with FLUXIMP_MLFLOW_OPTIONAL=1: going on would bury the history). No-op when tracking is off."""
    db = mlflow_store.sqlite_path(uri or tracking_uri()) if enabled() else None
    problem = mlflow_store.database_problem(db) if db is not None else None
    if problem:
        raise TrackingError(problem)


def _out_of_memory(exc: BaseException) -> bool:
    """A memory limit (MemoryError, CUDA/MPS out of memory, a killed allocation), not a tracking problem."""
    text = str(exc)
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM)
            or any(s in text for s in ("out of memory", "Cannot allocate memory", "failed to map segment")))


# ----------------------------------------------------------------------------- the run
def start(stage: str, p, new: bool = False) -> str | None:
    """Start (``new=True``) or resume the pipeline's run; return its id (None when tracking is off).

    With ``new=True`` RUN_FILE is always written (sample and evaluate read it), with
    ``"run_id": null`` when tracking is off or failed."""
    run_id = _start(stage, p, new)
    if new and run_id is None:
        from stages.core.io import write_json
        write_json(RUN_FILE, {"run_id": None, "experiment_id": None, "tracking_uri": None,
                              "note": "MLflow tracking was off (FLUXIMP_MLFLOW=0) or failed "
                                      "(FLUXIMP_MLFLOW_OPTIONAL=1) for this run"})
    return run_id


@guarded
def _start(stage: str, p, new: bool) -> str | None:
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # MLflow's telemetry client deletes an env var it shares between threads (KeyError
    # '_MLFLOW_TELEMETRY_SESSION_ID' in queued experiments) and phones home: off
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri()
    _check_server(uri)
    check_database(uri)
    db = mlflow_store.sqlite_path(uri)
    if db is not None and db.resolve() == (repo_root() / "mlflow.db").resolve():  # the repo's own database
        mlflow_store.relocate_artifacts(db, repo_root())
    mlflow.set_tracking_uri(uri)
    if mlflow.active_run():
        mlflow.end_run()
    run_id = None if new else _recorded_run(uri)
    if run_id:
        mlflow.start_run(run_id=run_id)
        log.info("MLflow: resuming run %s (%s)", run_id, scrub(uri))
    else:
        exp_id = _experiment_id(mlflow, p.mlflow.experiment, uri)
        mlflow_store.close_stale_runs(mlflow.MlflowClient(), exp_id)
        name = os.environ.get("DVC_EXP_NAME") or None
        run_id = mlflow.start_run(experiment_id=exp_id, run_name=name).info.run_id
        if new:  # only the owner (train) writes RUN_FILE, nobody else
            from stages.core.io import write_json
            write_json(RUN_FILE, {"run_id": run_id, "experiment_id": exp_id, "tracking_uri": scrub(uri)})
        else:
            log.warning("MLflow: no run recorded in %s; logging %s to a run of its own", RUN_FILE, stage)
        log.info("MLflow: new run %s in experiment %r (%s)", run_id, p.mlflow.experiment, scrub(uri))
    _state["run_id"] = run_id
    set_tags({**run_tags(p, stage), f"stage.{stage}": "ran", "fluximp.host": socket.gethostname(),
              "fluximp.pid": str(os.getpid())})
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


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens on the runs table


def _experiment_id(mlflow, name: str, uri: str) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        if "mlflow.experimentKind" not in exp.tags:  # made before the tag was set: the UI showed traces
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):  # otherwise MLflow picks ./mlruns of the (possibly temp) cwd
        location = (repo_root() / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def runs_url(ui: str, name: str | None = None) -> str:
    """The UI address of the experiment's runs table (``make mlflow-ui`` prints it)."""
    import mlflow

    if name is None:
        from stages.core import params
        name = params.load().mlflow.experiment
    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(name)
    return f"{ui.rstrip('/')}/#/experiments/{exp.experiment_id}/runs" if exp else ui


def end(status: str = "FINISHED") -> None:
    """End the run with ``status`` (also after tracking was turned off mid-run: never left RUNNING)."""
    if not _active():
        return
    _state["run_id"] = None
    try:
        import mlflow

        if mlflow.active_run():
            mlflow.end_run(status=status)
    except Exception as exc:  # noqa: BLE001
        if status == "FINISHED" and not _optional():
            raise TrackingError(f"MLflow: could not end the run ({type(exc).__name__}: {scrub(exc)})") from exc
        log.warning("MLflow: could not end the run %s (%s)", status, scrub(exc))


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


def active() -> bool:
    """Whether a run is open (tracking on and started)."""
    return _active()


def run_id() -> str | None:
    return _state["run_id"]


# ----------------------------------------------------------------------------- logging
@guarded
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


@guarded
def set_tags(tags: dict[str, Any]) -> None:
    import mlflow

    if _active():
        secrets = secret_values()
        mlflow.set_tags({k: scrub(v, secrets) for k, v in tags.items()})


@guarded
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


@guarded
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


@guarded
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


def reset() -> None:
    """Forget the warning/disabled state (tests; a long-lived process starting a new pipeline)."""
    _state.update(disabled=False, warned=False, run_id=None)
