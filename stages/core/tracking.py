"""MLflow tracking: one run per pipeline execution, shared by the stages that log to it.
(Lineage values, git state, data hash, secret scrubbing: stages.core.lineage; the model
registry: stages.core.registry.)

A stage does::

    from stages.core import registry, tracking
    with tracking.run("train", p, new=True, reads={"cache": "data/cache"}):   # train owns the run
        tracking.log_metrics({"loss": 0.3}, step=10)
        tracking.log_artifacts(["reports/train/loss.tsv"])
        registry.register_adapter("models/lora", p, final_step=150)  # tags run + version adapter.sha256
    with tracking.run("evaluate", p, adapter_sha=lineage.adapter_hash("models/lora")):  # that adapter's run
        ...

- Where: ``MLFLOW_TRACKING_URI`` when set (a team server), else ``sqlite:///<repo root>/mlflow.db``
  with artifacts in ``<repo root>/mlartifacts``. The repo root is the *main* repo even when DVC runs
  the stage in a copy (``dvc exp run --temp``, ``--queue`` run under ``.dvc/tmp/exps``): DVC passes
  it as ``DVC_ROOT``. A relative path there would land in the throw-away copy. A repo that was
  moved or copied (with its mlflow.db) has the artifact locations in the database pointed at its
  own ``mlartifacts`` on the next start, so artifacts never land in the old folder.
- Which run: ``new=True`` (train) starts a run and records its id in ``reports/mlflow_run.json`` (local
  state, gitignored, not a DVC output: a run id is new on every run); at registration the run and its
  model version are tagged ``adapter.sha256`` (the sha256 of the adapter's weights file). A later stage
  (``new=False``, ``adapter_sha=`` the hash of the adapter it used) attaches to the run that trained **the adapter now on disk**,
  found by that tag (registered versions first, then runs), never by the local file: after ``dvc exp
  apply``, ``dvc checkout``, a queued or ``--temp`` experiment it is still the right run. When no run
  matches it opens a new run tagged with the adapter's hash and says so. What a run gets: the whole
  params.yaml flattened, and tags (git commit, dirty flag, DVC experiment name, base model + revision,
  ``dataset.<name>_md5`` for each data folder the stage read, hashed from the files it read, profile,
  host and pid of the stage). A resumed run keeps the tags its first stage set; a later stage's other
  value goes to ``<stage>.<tag>``. A run left RUNNING by a killed stage on this host is marked KILLED
  on the next start; a stage that raises ends its run FAILED.
- Secrets (stages.core.lineage.scrub: credential-named environment variables, URL passwords,
  ``?token=``-like query parameters, ``hf_...`` tokens) are replaced by ``***`` in params, tags,
  metrics names, version descriptions and text artifacts; a binary artifact that contains one is
  not logged. A tracking URI with ``user:password@`` is never printed with its password.
- Loud by default: a tracking error (server down, bad URI, a failing MLflow call) fails the stage
  with a message naming the URI, so metrics never go missing silently. ``FLUXIMP_MLFLOW=0`` turns
  tracking off; ``FLUXIMP_MLFLOW_OPTIONAL=1`` makes tracking best-effort: the first error logs a
  warning, the run (if any) is ended FAILED and the stage goes on without tracking. Out of memory in
  an MLflow call is re-raised as what it is (a memory limit), never reported as a server problem; an
  emptied or corrupt local mlflow.db stops the stage (stages.core.mlflow_store.database_problem).
"""
from __future__ import annotations

import base64
import contextlib
import errno
import functools
import json
import logging
import os
import shutil
import socket
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Iterator

from stages.core import mlflow_store
from stages.core.lineage import adapter_hash, dir_md5, flatten, git_state, repo_root
from stages.core.secrets import masked, scrub, scrub_file, secret_values
from stages.core.paths import Train

log = logging.getLogger(__name__)

RUN_FILE = Train().run_file  # local state (stages/core/paths.py)
ADAPTER_TAG = "adapter.sha256"  # on a train run and its registered version: which adapter they hold
_state: dict[str, Any] = {"disabled": False, "warned": False, "run_id": None, "adapter": None}


class TrackingError(SystemExit):
    """A tracking failure that stops the stage (a clean exit with the message)."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def enabled() -> bool:
    return os.environ.get("FLUXIMP_MLFLOW", "1") != "0" and not _state["disabled"]


def _optional() -> bool:
    return os.environ.get("FLUXIMP_MLFLOW_OPTIONAL", "0") not in ("", "0", "false", "False")


def run_tags(p, stage: str, reads: dict[str, Any] | None = None) -> dict[str, str]:
    """Lineage tags; ``reads`` (name -> folder the stage read) gives ``dataset.<name>_md5``, DVC's
    folder hash computed from those files (not copied from dvc.lock)."""
    commit, dirty = git_state()
    tags = {
        "git.commit": commit,
        "git.dirty": None if dirty is None else str(dirty).lower(),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
        "dvc.exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV"),
        "model.base": p.model.base,
        "model.revision": p.model.revision,
        "profile": p.profile,
        **{f"dataset.{name}_md5": dir_md5(folder) for name, folder in (reads or {}).items()},
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
        parts = urllib.parse.urlsplit(uri)
        host = parts.hostname or ""
        netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
        req = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)).rstrip("/") + "/health")
        if parts.username is not None:  # user:password@ in the URI: basic auth, never part of a message
            cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            req.add_header("Authorization", "Basic " + base64.b64encode(cred.encode()).decode())
        with urllib.request.urlopen(req, timeout=5) as resp:
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
def start(stage: str, p, new: bool = False, adapter_sha: str | None = None,
          reads: dict[str, Any] | None = None) -> str | None:
    """Start (``new=True``) a run, or attach to the run that trained the adapter whose weights have the
    sha256 ``adapter_sha`` (``lineage.adapter_hash(folder)``; found by its ``adapter.sha256`` tag; a new
    run tagged with it when none did); return
    the run id (None when tracking is off). ``reads``: data folders the stage read (lineage tags).

    With ``new=True`` RUN_FILE is always written (a record for people and the model card; no stage
    picks its run from it), with ``"run_id": null`` when tracking is off or failed."""
    _state["adapter"] = adapter_sha
    run_id = _start(stage, p, new, reads)
    if new and run_id is None:
        from stages.core.io import write_json
        write_json(RUN_FILE, {"run_id": None, "experiment_id": None, "tracking_uri": None,
                              "note": "MLflow tracking was off (FLUXIMP_MLFLOW=0) or failed "
                                      "(FLUXIMP_MLFLOW_OPTIONAL=1) for this run"})
    return run_id


@guarded
def _start(stage: str, p, new: bool, reads: dict[str, Any] | None = None) -> str | None:
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
    exp_id = _experiment_id(mlflow, p.mlflow.experiment, uri)
    sha = _state["adapter"]
    run_id = None if new or not sha else adapter_run(sha, p, exp_id)
    tags = {**run_tags(p, stage, reads), "fluximp.host": socket.gethostname(), "fluximp.pid": str(os.getpid())}
    if run_id:
        mlflow.start_run(run_id=run_id)
        log.info("MLflow: %s attaches to run %s, which trained the adapter on disk (sha256 %s) (%s)",
                 stage, run_id, sha[:12], scrub(uri))
        first = mlflow.get_run(run_id).data.tags  # the run's own lineage stays; this stage's other values aside
        tags = {k if first.get(k, v) == v else f"{stage}.{k}": v for k, v in tags.items()}
    else:
        mlflow_store.close_stale_runs(mlflow.MlflowClient(), exp_id)
        name = os.environ.get("DVC_EXP_NAME") or None
        run_id = mlflow.start_run(experiment_id=exp_id, run_name=name).info.run_id
        if new:  # only the owner (train) writes RUN_FILE, nobody else
            from stages.core.io import write_json
            write_json(RUN_FILE, {"run_id": run_id, "experiment_id": exp_id, "tracking_uri": scrub(uri)})
        elif sha:
            log.warning("MLflow: no run in %s trained the adapter on disk (sha256 %s: no registered version or "
                        "run carries that %s tag); %s logs to a NEW run %s tagged with it",
                        scrub(uri), sha[:12], ADAPTER_TAG, stage, run_id)
            tags[ADAPTER_TAG] = sha
        else:
            log.warning("MLflow: no adapter on disk to find its run by; %s logs to a run of its own", stage)
        log.info("MLflow: new run %s in experiment %r (%s)", run_id, p.mlflow.experiment, scrub(uri))
    _state["run_id"] = run_id
    set_tags({**tags, f"stage.{stage}": "ran"})
    log_params(flatten(p.model_dump()))
    return run_id


def adapter_run(sha: str, p, exp_id: str | None = None) -> str | None:
    """The id of the run that trained the adapter whose weights have sha256 ``sha``: the run of the
    newest registered version tagged with it, else the newest run (of the experiment) tagged with it."""
    import mlflow

    client = mlflow.MlflowClient()
    versions = [v for v in client.search_model_versions(
        f"name='{p.mlflow.registered_model}' and tags.`{ADAPTER_TAG}` = '{sha}'") if v.run_id]
    if versions:
        return max(versions, key=lambda v: int(v.version)).run_id
    exps = [exp_id] if exp_id else [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, f"tags.`{ADAPTER_TAG}` = '{sha}'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0].info.run_id if runs else None


def tag_adapter(lora_dir: os.PathLike | str) -> str | None:
    """Record on the open run which adapter it produced (train, before registering it); return the hash."""
    sha = adapter_hash(lora_dir)
    _state["adapter"] = sha
    if sha:
        set_tags({ADAPTER_TAG: sha})
        if _active():  # RUN_FILE names the adapter too: a reader can tell whether it is the one on disk
            from stages.core.io import write_json
            try:
                rec = json.loads(RUN_FILE.read_text())
            except (OSError, ValueError):
                rec = {}
            if rec.get("run_id") == _state["run_id"]:
                write_json(RUN_FILE, {**rec, "adapter_sha256": sha})
    return sha


def adapter_sha256() -> str | None:
    """The hash of the adapter this process's run is about (set by ``start(adapter=...)`` or ``tag_adapter``)."""
    return _state["adapter"]


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
def run(stage: str, p, new: bool = False, adapter_sha: str | None = None,
        reads: dict[str, Any] | None = None) -> Iterator[str | None]:
    """``start`` ... ``end``; the run is marked FAILED if the block raises (and the error re-raised)."""
    run_id = start(stage, p, new=new, adapter_sha=adapter_sha, reads=reads)
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
    clean = {k: scrub(masked(k, v, secrets), secrets)[:6000] for k, v in params.items()}
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
    secrets = secret_values()
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
                if not scrub_file(f, secrets):
                    log.warning("MLflow: %s contains a secret value and is binary: not logged", f.name)
                    f.unlink()
        mlflow.log_artifacts(tmp, artifact_path=artifact_path)


@guarded
def log_image(image, key: str, step: int | None = None) -> None:
    """One PIL image under ``key`` at ``step`` (MLflow's image series: a step slider in the UI)."""
    import mlflow

    if _active():
        mlflow.log_image(image, key=key, step=step)


def reset() -> None:
    """Forget the warning/disabled state (tests; a long-lived process starting a new pipeline)."""
    _state.update(disabled=False, warned=False, run_id=None, adapter=None)
