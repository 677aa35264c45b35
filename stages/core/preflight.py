"""Preflight: before the first stage spends hours, check that every external thing the profile
needs (dataset, base weights, CLIP weights, aesthetic head, captioner, HF token) can be had.

The smoke profile needs nothing from outside and passes at once. The flux-dev profile on a
machine without network or token fails here, in seconds, with one message naming each missing
piece and how to provide it, instead of a stack trace from deep inside a library hours later.
Set FLUXIMP_SKIP_PREFLIGHT=1 to skip (e.g. when a later stage will get its weights some other way).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from stages.core import hub
from stages.core.params import Params

HUB_HOST = "huggingface.co"
GATED = {"black-forest-labs/FLUX.1-dev"}  # repos that need an accepted licence + token


@dataclass
class Need:
    what: str              # human description, e.g. "base model weights"
    ref: str               # hub id, path or URL
    repo_type: str = "model"  # model | dataset | url | path
    revision: Optional[str] = None
    gated: bool = False


def network_up(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    if hub.offline():
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hf_token() -> Optional[str]:
    """The token from HF_TOKEN or the login cache (never printed)."""
    from huggingface_hub import get_token

    return get_token()


def in_hub_cache(need: Need) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(need.ref, repo_type=need.repo_type, revision=need.revision, local_files_only=True)
        return True
    except Exception:  # any miss: not cached / revision absent / malformed cache
        return False


def _is_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or Path(ref).expanduser().exists()


def needs(p: Params) -> list[Need]:
    """What the given params fetch from outside the repo."""
    out: list[Need] = []
    if p.data.source == "wikiart":
        out.append(Need("WikiArt dataset", p.data.wikiart.dataset, "dataset", p.data.wikiart.revision))
    if p.model.base != "tiny-random":
        out.append(Need("base model weights", p.model.base, "model", p.model.revision, p.model.base in GATED))
    if p.clip.model != "tiny" and p.clip.pretrained:
        out.append(Need("CLIP weights", f"{p.clip.model}/{p.clip.pretrained}", "open_clip"))
    if p.filter.aesthetic.enabled and p.filter.aesthetic.head:
        out.append(Need("aesthetic head", p.filter.aesthetic.head, "url"))
    if p.caption.backend in ("vlm", "combined") and p.caption.model:
        out.append(Need("captioning model", p.caption.model, "model"))
    if p.eval.csd_weights:
        out.append(Need("CSD weights", p.eval.csd_weights, "url"))
    return out


class OpenClipUnavailable(Exception):
    """open_clip itself cannot be imported (not a missing tag)."""


def _open_clip_hub_id(ref: str) -> Optional[str]:
    """The hub repo of an open_clip ``model/tag``; None when open_clip has no such tag."""
    model, _, tag = ref.rpartition("/")
    try:
        import open_clip
    except Exception as exc:  # noqa: BLE001 - report what is really missing
        raise OpenClipUnavailable(f"{type(exc).__name__}: {exc}") from exc
    cfg = open_clip.get_pretrained_cfg(model, tag) or {}
    return cfg.get("hf_hub", "").rstrip("/") or None


def _folder_problems(p: Params) -> list[str]:
    """data.source=folder: the folder must exist and hold at least one image file."""
    from stages.data.folder import IMAGE_EXTENSIONS

    root = Path(p.data.path or "").expanduser()
    if not root.is_dir():
        return [f"- data.path: {p.data.path} is not a directory (data.source=folder reads images from one)"]
    if not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in root.rglob("*") if f.is_file()):
        return [f"- data.path: {p.data.path} holds no image file ({', '.join(sorted(IMAGE_EXTENSIONS))})"]
    return []


def problems(p: Params) -> list[str]:
    """One line per missing piece; empty when everything is reachable."""
    found: list[str] = _folder_problems(p) if p.data.source == "folder" else []
    online: Optional[bool] = None
    for need in needs(p):
        ref = need.ref
        if need.repo_type == "open_clip":  # e.g. ViT-L-14/openai -> its hub repo
            if _is_local(p.clip.pretrained or ""):
                continue
            try:
                hub_id = _open_clip_hub_id(ref)
            except OpenClipUnavailable as exc:
                found.append(f"- {need.what} {ref!r}: open_clip cannot be imported ({exc}); "
                             "fix the install (requirements.txt)")
                continue
            if hub_id is None:
                found.append(f"- {need.what}: open_clip has no pretrained tag {ref!r}")
                continue
            need = Need(need.what, hub_id, "model")
        if need.repo_type == "path" or _is_local(need.ref):
            if not Path(need.ref).expanduser().exists():
                found.append(f"- {need.what}: local path {need.ref} does not exist")
            continue
        if need.repo_type == "url":
            if not need.ref.startswith(("http://", "https://")):
                found.append(f"- {need.what}: {need.ref} is neither an existing file nor a URL")
                continue
            if online is None:
                online = network_up()
            if not online and not _url_cached(need.ref):
                found.append(f"- {need.what}: {need.ref} cannot be downloaded (no network) and is not "
                             "cached; download it elsewhere and set the param to its local path")
            continue
        if in_hub_cache(need):
            continue
        if online is None:
            online = network_up()
        label = f"{need.repo_type} {need.ref}" + (f"@{need.revision}" if need.revision else "")
        if not online:
            why = "HF_HUB_OFFLINE is set" if hub.offline() else f"{HUB_HOST} is unreachable"
            found.append(f"- {need.what}: {label} is not in the local Hugging Face cache and {why}")
        elif need.gated and not hf_token():
            found.append(f"- {need.what}: {label} is gated; accept its licence on the Hub and provide "
                         "a token (HF_TOKEN or `huggingface-cli login`)")
    return found


def _url_cached(url: str) -> bool:
    import torch.hub

    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name).exists()


def check(p: Params) -> None:
    """Raise SystemExit with every problem listed; no-op when all needs are met."""
    if os.environ.get("FLUXIMP_SKIP_PREFLIGHT") == "1":
        return
    found = problems(p)
    if found:
        hint = ("Profile '" + p.profile + "' needs these from outside this machine:\n" + "\n".join(found)
                + "\nFor an offline run use the embedded profile (`dvc repro` with the committed "
                "params.yaml) or data.source=folder/synthetic with local model paths.")
        raise SystemExit(hint)
