"""The MLflow model registry: register the adapter of the pipeline's run (stages.core.tracking)
with the ``mlflow.diffusers`` flavour, describe each version (data hash, changed params, headline
metrics; the ``best-style`` alias), and load a registered version back for users.

Each version is tagged ``adapter.sha256`` (the hash of its weights file, also on its run): evaluate
describes a version, and moves ``best-style``, only with the metrics of that same adapter.

A version is never registered without its metrics: the run must have some, and with
``final_step`` its ``train/loss`` history must reach that step (a run that trained nothing, say a
resume at the last step, would otherwise register an adapter with an empty history).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from stages.core import lineage, secrets, tracking

log = logging.getLogger(__name__)


@tracking.guarded
def register_adapter(lora_dir: os.PathLike | str, p, name: str | None = None,
                     base_model: str | None = None, final_step: int | None = None) -> str | None:
    """Log the LoRA folder with the ``mlflow.diffusers`` flavour and register it under
    ``params.mlflow.registered_model`` (or ``name``); return the new version number.

    Refused (an error) when the run has no metrics, or, with ``final_step``, when its
    ``train/loss`` history does not reach that step: a version always comes with its metrics.
    ``base_model`` overrides ``p.model.base`` (pass the local folder a hub id resolved to, if any).
    The pinned ``p.model.revision`` is recorded as the flavour's base model revision (MLflow looks
    up the hub's latest commit for a hub id on its own; that value is replaced)."""
    import mlflow
    import mlflow.diffusers

    if not tracking.active():
        return None
    name = name or p.mlflow.registered_model
    client = mlflow.MlflowClient()
    run_id = tracking.run_id()
    sha = tracking.tag_adapter(lora_dir)  # the run's adapter, tagged even when registration is refused below
    if sha is None:
        raise RuntimeError(f"not registering {name}: {lora_dir} has no {lineage.ADAPTER_WEIGHTS}")
    if not client.get_run(run_id).data.metrics:
        raise RuntimeError(f"not registering {name}: run {run_id} has no metrics")
    if final_step is not None:
        steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        if not steps or max(steps) < final_step:
            raise RuntimeError(f"not registering {name}: run {run_id} has train/loss up to step "
                               f"{max(steps) if steps else 'none'}, not {final_step}")
    base = str(base_model or p.model.base)
    with tempfile.TemporaryDirectory(prefix="mlflow-adapter-") as tmp:
        out = Path(tmp) / "adapter"
        mlflow.diffusers.save_model(str(lora_dir), str(out), base_model=base)
        mlmodel = out / "MLmodel"
        spec = yaml.safe_load(mlmodel.read_text())
        flavor = spec["flavors"]["diffusers"]
        flavor.pop("base_model_revision", None)  # never a revision MLflow looked up on its own
        if p.model.revision:
            flavor["base_model_revision"] = p.model.revision
        mlmodel.write_text(yaml.safe_dump(spec, sort_keys=False))
        tracking.log_artifacts([out])
    version = mlflow.register_model(f"runs:/{run_id}/adapter", name)
    client.set_model_version_tag(name, version.version, "lora.rank", str(p.lora.rank))
    client.set_model_version_tag(name, version.version, tracking.ADAPTER_TAG, sha)
    log.info("MLflow: registered %s version %s", name, version.version)
    describe_version(p, name=name)
    return version.version


def changed_params(p, baseline: str = "HEAD") -> dict[str, tuple[Any, Any]]:
    """``{key: (baseline value, value)}`` for the params that differ from the git baseline's
    params.yaml (in a DVC experiment, HEAD is the commit it was branched from)."""
    text = lineage._git("show", f"{baseline}:params.yaml")
    base = lineage.flatten(yaml.safe_load(text) or {}) if text else {}
    now = lineage.flatten(p.model_dump())
    return {k: (secrets.masked(k, base.get(k)), secrets.masked(k, v)) for k, v in now.items()
            if k in base and str(base[k]) != str(v)}


def version_description(p, metrics: dict | None = None, tags: dict | None = None) -> str:
    """What a registered version is: run, DVC experiment, adapter and data hashes (the run's tags:
    hashed from what its stages read), changed params, headline (secrets masked: stages.core.secrets)."""
    tags = tags or {}
    changed = changed_params(p)
    data = ", ".join(f"data/{k[len('dataset.'):-len('_md5')]} {v}" for k, v in sorted(tags.items())
                     if k.startswith("dataset.") and k.endswith("_md5"))
    lines = [f"LoRA adapter of run {tracking.run_id()}"
             + (f" (DVC experiment {tags['dvc.exp_name']})" if tags.get("dvc.exp_name") else ""),
             f"adapter sha256: {tags.get(tracking.ADAPTER_TAG, 'unknown')}",
             f"data read: {data or 'unknown'}; base {p.model.base}"
             + (f" @ {p.model.revision}" if p.model.revision else ""),
             "params that differ from the commit: " + (", ".join(f"{k}={v} (was {b})" for k, (b, v) in changed.items())
                                                       or "none")]
    if metrics:  # evaluate (train describes the version before there are metrics)
        from stages.metrics import vocab
        head = vocab.headline(metrics)
        lines.append("headline: " + ", ".join(f"{vocab.header(k)} {vocab.fmt(k, v)}" for k, v in head.items()))
    else:
        lines.append("headline: (after the evaluate stage)")
    return secrets.scrub("\n".join(lines))


@tracking.guarded
def describe_version(p, metrics: dict | None = None, name: str | None = None) -> str | None:
    """Describe this run's registered version of the adapter on disk (its ``adapter.sha256`` tag must
    be the hash of the adapter this run is about: another adapter's version is never rewritten); with
    ``metrics`` (evaluate) also tag it with the headline and point the ``best-style`` alias at the
    version with the best ``vocab.BEST_STYLE`` tag (each version's own adapter's value). MLflow reserves the name ``latest``: ``models:/<name>/latest`` is always
    the newest version."""
    import mlflow

    if not tracking.active():
        return None
    client = mlflow.MlflowClient()
    name = name or p.mlflow.registered_model
    sha = tracking.adapter_sha256()
    runs = client.search_model_versions(f"name='{name}' and run_id='{tracking.run_id()}'")
    mine = [v for v in runs if sha and v.tags.get(tracking.ADAPTER_TAG) == sha]
    if not mine:
        if runs:
            log.warning("MLflow: run %s's registered version(s) %s hold another adapter than the one on disk "
                        "(sha256 %s): not described", tracking.run_id(), ", ".join(str(v.version) for v in runs),
                        (sha or "none")[:12])
        return None
    version = max(mine, key=lambda v: int(v.version)).version
    tags = client.get_run(tracking.run_id()).data.tags
    client.update_model_version(name, version, description=version_description(p, metrics, tags))
    if not metrics:
        return version
    from stages.metrics import vocab  # evaluate only: train's code stays stages/models + stages/core
    for k, v in vocab.headline(metrics).items():
        client.set_model_version_tag(name, version, k, str(v))
    best, best_value = None, None
    key, sign = vocab.BEST_STYLE, vocab.family(vocab.BEST_STYLE).better or 1
    for mv in client.search_model_versions(f"name='{name}'"):
        value = float(mv.tags[key]) if key in mv.tags else None  # set above, from that version's own adapter
        if value is not None and (best_value is None or sign * value > sign * best_value):
            best, best_value = mv.version, value
    if best is not None:
        client.set_registered_model_alias(name, "best-style", best)
        log.info("MLflow: %s version %s described; best-style -> version %s (%s %.4g)",
                 name, version, best, key, best_value)
    return version


def load_registered_adapter(name: str, version: str | int = "latest",
                            dst: os.PathLike | str | None = None) -> Path:
    """Download a registered adapter; return the folder ``pipe.load_lora_weights(folder)`` takes.

    Uses MLFLOW_TRACKING_URI (or the repo's sqlite database). Errors are raised: this is for users."""
    import mlflow
    import mlflow.diffusers

    mlflow.set_tracking_uri(tracking.tracking_uri())
    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
    model = mlflow.diffusers.load_model(f"models:/{name}/{version}", dst_path=str(dst) if dst else None)
    return Path(model.adapter_path)
