"""Housekeeping of the MLflow store, run by stages.core.tracking when a run starts:

- :func:`relocate_artifacts`: MLflow keeps an absolute artifact location per experiment and run in
  the database. When the repo (with its mlflow.db and mlartifacts/) was moved or copied, those
  point at the old folder; they are pointed at this repo's ``mlartifacts/`` instead, so a new run's
  artifacts land here and old ones are found here.
- :func:`close_stale_runs`: a stage killed with -9 leaves its run RUNNING forever; runs of this host
  whose stage process (tags ``fluximp.host`` / ``fluximp.pid``) is gone are marked KILLED.
- :func:`database_problem`: an emptied or corrupt mlflow.db is refused, never silently recreated by
  MLflow (which would start a new, empty history over the old one without a word).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import urllib.parse
from pathlib import Path

from stages.core.io import pid_alive

log = logging.getLogger(__name__)


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(urllib.parse.unquote(uri[len("sqlite:///"):]))


def database_problem(db: Path) -> str | None:
    """Why the existing sqlite file ``db`` is no usable MLflow database (None when it is, or does not
    exist yet: MLflow creates a new one). Opened read-only: the check changes nothing."""
    if not db.exists():
        return None
    why = None
    if db.stat().st_size == 0:
        why = "is empty (0 bytes)"
    else:
        try:
            with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if con.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    why = "is corrupt (sqlite quick_check failed)"
        except sqlite3.Error as err:
            why = f"is not a readable sqlite database ({err})"
        else:
            if why is None and not {"experiments", "runs", "alembic_version"} <= tables:
                why = "holds no MLflow tables (emptied or another database)"
    if why is None:
        return None
    return (f"MLflow database {db} {why}. It is not recreated: MLflow would start an empty history over "
            f"it. Restore it from a backup, or move it aside to start a new history (`mv {db} {db}.bad`), "
            "or set FLUXIMP_MLFLOW=0 to run without tracking.")


def relocate_artifacts(db: Path, root: Path) -> int:
    """Point a local database's artifact locations at ``root/mlartifacts`` when they name the
    ``mlartifacts`` folder of another place (the repo was moved or copied); returns how many
    experiments were moved. MLflow stores the absolute location per experiment and run."""
    if not db.exists():
        return 0
    new = (root / "mlartifacts").as_uri()
    moved = 0
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        try:
            rows = con.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall()
        except sqlite3.Error:  # a database MLflow has not set up yet
            return 0
        for exp_id, old in rows:
            if not old or not old.startswith("file://") or old == new or not old.rstrip("/").endswith("/mlartifacts"):
                continue
            con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, exp_id))
            for table, column in (("runs", "artifact_uri"), ("model_versions", "source"),
                                  ("model_versions", "storage_location"), ("logged_models", "artifact_location")):
                with contextlib.suppress(sqlite3.Error):  # tables of other MLflow versions
                    con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                f"WHERE {column} LIKE ? ESCAPE '\\'",
                                (new, len(old) + 1, old.replace("%", "\\%").replace("_", "\\_") + "%"))
            log.warning("MLflow: %s named artifacts in %s (the repo moved or was copied); now %s", db, old, new)
            moved += 1
    return moved


def close_stale_runs(client, experiment_id: str) -> list[str]:
    """Mark KILLED the runs of this host left RUNNING by a stage process that no longer exists."""
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    closed = []
    for r in runs:
        tags = r.data.tags
        pid = int(tags.get("fluximp.pid", "0") or 0)
        if tags.get("fluximp.host") == host and pid and pid != os.getpid() and not pid_alive(pid):
            client.set_terminated(r.info.run_id, "KILLED")
            closed.append(r.info.run_id)
            log.warning("MLflow: run %s was left RUNNING by a killed stage (pid %d): marked KILLED", r.info.run_id, pid)
    return closed
