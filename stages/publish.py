"""publish: assemble the Hub model folder ``models/hub/`` and (with ``--push``) upload it.

Not a DVC stage: run it after ``dvc repro`` (``make publish`` or ``python -m stages.publish``).

``--adapter best`` ships the operating point's snapshot (``reports/eval/operating_point.json``) instead of
the final adapter, ``--adapter <step>`` a snapshot; the card writes the recommended strength into its usage
snippets. ``models/hub/`` gets the diffusers adapter, the kohya/ComfyUI copy, ``adapter.json``, the sample
grids and widget images, ``metrics.json``, ``params.yaml`` and the model card ``README.md``
(stages.modelcard: every number read from the pipeline's files). Secrets never reach the folder:
params and every text file in it pass stages.core.secrets (a token inside a URL param is
``***``), and a binary file holding one stops the publish. Without ``--push`` this is a
dry run: it lists what would be uploaded and where, and never touches the network. With ``--push``
it creates the repo (private unless ``--public``) and uploads the folder with ``huggingface_hub``;
the token comes from ``HF_TOKEN`` or the login cache (``hf auth login``). A missing token or no
network ends with one clear line and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

from stages import modelcard
from stages.core import log, params, secrets
from stages.core.io import atomic_dir

LORA_DIR = Path("models/lora")
SNAPSHOTS = Path("models/snapshots")
OPERATING_POINT = Path("reports/eval/operating_point.json")
SAMPLES = Path("reports/samples")
OUT = Path("models/hub")
DEFAULT_NAME = "flux-impressionism-lora"


class PublishError(SystemExit):
    """One-line failure (no token, no network, refused push): exit status 2 with the message."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m stages.publish", description=__doc__.splitlines()[0])
    ap.add_argument("--push", action="store_true", help="upload to the Hub (default: dry run, no network)")
    ap.add_argument("--repo-id", default=None,
                    help=f"target model repo, 'user/name' or 'name' (default: $HF_REPO_ID or {DEFAULT_NAME})")
    ap.add_argument("--public", action="store_true", help="create the repo public (default private)")
    ap.add_argument("--force", action="store_true", help="push even an adapter trained on a test (non-hub) base")
    ap.add_argument("--out", type=Path, default=OUT, help=f"folder to assemble (default {OUT})")
    ap.add_argument("--adapter", default="final", help="final (models/lora), best (the operating point's step, "
                    "reports/eval/operating_point.json) or a snapshot step (train.save_every)")
    return ap.parse_args(argv)


def adapter_dir(choice: str) -> Path:
    """The adapter folder ``--adapter`` names: models/lora, the operating point's snapshot, or a step's."""
    from stages.models import snapshots

    if choice == "final":
        return LORA_DIR
    if choice == "best":
        step, _ = snapshots.resolve_best("best", None, OPERATING_POINT)
    elif choice.isdigit():
        step = int(choice)
    else:
        raise SystemExit(f"--adapter {choice!r}: use final, best or a step number")
    return snapshots.resolve(step, LORA_DIR, SNAPSHOTS) if step else LORA_DIR


def assemble(facts: modelcard.Facts, out: Path, repo_id: str, lora_dir: Path = LORA_DIR) -> Path:
    """Write the Hub folder atomically: adapter files, images, metrics, params, README.md; every
    file scrubbed of secrets (a binary one that holds a secret is a CardError)."""
    facts = dataclasses.replace(facts, params=secrets.masked("", facts.params))
    files = facts.adapter.get("files") or {"diffusers": "pytorch_lora_weights.safetensors"}
    widget = modelcard.widget_images(facts.samples)
    with atomic_dir(out) as tmp:
        for name in [*files.values(), "adapter.json"]:
            src = lora_dir / name
            if not src.exists():
                raise modelcard.CardError(f"{src} listed in adapter.json but missing: rerun the train stage")
            shutil.copy2(src, tmp / name)
        (tmp / "images").mkdir()
        grids = []
        for g in facts.samples.get("grids", []):
            dest = Path("images") / Path(g["file"]).name
            shutil.copy2(SAMPLES / g["file"], tmp / dest)
            grids.append(dest.as_posix())
        for im in widget:
            dest = Path("images") / Path(im["file"]).name
            shutil.copy2(SAMPLES / im["file"], tmp / dest)
            im["hub_file"] = dest.as_posix()
        (tmp / "metrics.json").write_text(json.dumps(facts.metrics, indent=2) + "\n")
        (tmp / "params.yaml").write_text(yaml.safe_dump(facts.params, sort_keys=False))
        (tmp / "README.md").write_text(modelcard.render(facts, repo_id, widget, grids))
        held = [f.relative_to(tmp).as_posix() for f in sorted(tmp.rglob("*"))
                if f.is_file() and not secrets.scrub_file(f)]
        if held:
            raise modelcard.CardError(f"not publishing: {', '.join(held)} hold(s) a secret value (a token, a "
                                      "URL password); remove it and rerun")
    return out


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[tuple[str, int]]:
    return [(f.relative_to(folder).as_posix(), f.stat().st_size)
            for f in sorted(folder.rglob("*")) if f.is_file()]


@contextlib.contextmanager
def hub_errors(repo_id: str):
    """Translate the Hub client's failures into one-line PublishErrors."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise PublishError("cannot push: HF_HUB_OFFLINE is set (unset it to reach huggingface.co)") from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", "?")
        raise PublishError(f"the Hub refused the request for {repo_id} (HTTP {status}): "
                           f"{str(err).splitlines()[0]}") from None
    except Exception as err:  # httpx.ConnectError, timeouts, OSError: no network
        name = type(err).__name__
        if isinstance(err, OSError) or any(w in name.lower() for w in ("connect", "timeout", "network")):
            raise PublishError(f"cannot reach huggingface.co ({name}): no network?") from None
        raise


def hub_api():
    """An HfApi with the token from HF_TOKEN or the login cache; no token = PublishError."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (write access needed)")
    return HfApi(token=token)


def resolve_repo_id(name: str, api) -> str:
    """'name' -> 'user/name' with the token's user (asks the Hub); 'user/name' stays."""
    if "/" in name:
        return name
    with hub_errors(name):
        return f"{api.whoami()['name']}/{name}"


def push(api, folder: Path, repo_id: str, private: bool) -> str:
    """Create the repo if needed (private by default) and upload the folder; returns its URL."""
    with hub_errors(repo_id):
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="flux-impressionism: adapter, samples, metrics, model card")
    return str(url)


def main(argv=None) -> int:
    args = parse_args(argv)
    p = params.load()
    logger = log.setup("publish")
    name = args.repo_id or os.environ.get("HF_REPO_ID") or DEFAULT_NAME
    lora_dir = adapter_dir(args.adapter)
    facts = modelcard.collect(Path.cwd(), p.model_dump(), lora_dir=str(lora_dir))
    private = not args.public
    api = None
    if args.push:
        if not modelcard.is_hub_id(facts.adapter.get("base", "")) and not args.force:
            raise PublishError(f"refusing to push: the adapter was trained on {facts.adapter.get('base')!r}, "
                               "not a Hub base model (smoke profile?); pass --force to push it anyway")
        api = hub_api()
        repo_id = resolve_repo_id(name, api)
    else:  # dry run: no network, so no user name lookup
        repo_id = name if "/" in name else f"<your-hf-user>/{name}"
    shipped = lora_dir / "pytorch_lora_weights.safetensors"
    if shipped.exists() and facts.samples.get("adapter_sha256") not in (None, _sha256(shipped)):
        logger.warning("the sample images were rendered from another adapter than %s: rerun the sample stage "
                       "with sample.adapter_step set to its step (best) so the card shows what it ships", lora_dir)
    folder = assemble(facts, args.out, repo_id, lora_dir)
    files = listing(folder)
    total = sum(size for _, size in files)
    logger.info("assembled %s: %d files, %.2f MB", folder, len(files), total / 1e6)
    if api is None:
        print(f"dry run: would upload {len(files)} files ({total / 1e6:.2f} MB) from {folder}/ to "
              f"https://huggingface.co/{repo_id} ({'private' if private else 'public'}); `make publish PUSH=1` (or --push) uploads it")
        for fname, size in files:
            print(f"  {size:>12,d}  {fname}")
        return 0
    url = push(api, folder, repo_id, private)
    print(f"pushed {len(files)} files to {url} ({'private' if private else 'public'})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PublishError as err:
        print(f"publish: {err.message}", file=sys.stderr)
        sys.exit(2)
