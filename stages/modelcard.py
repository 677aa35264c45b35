"""The Hugging Face model card of the adapter, written from the pipeline's files (used by stages/publish.py
only, which is not a DVC stage: editing the card reruns nothing).

Every number on the card is read from a file the pipeline wrote: ``models/lora/adapter.json``
(train), ``reports/samples/index.json`` (sample), ``reports/metrics.json`` (evaluate),
``reports/mlflow_run.json`` (tracking), ``dvc.lock`` and the curated shards (caption). Nothing is
typed in. :func:`collect` gathers them into :class:`Facts`; :func:`render` turns those into a
``README.md`` with HF metadata (``base_model``, licence, tags, ``instance_prompt``, ``widget``).

Text that comes from the user or the data (the trigger, prompts, licences, sources, artists, paths,
params) is escaped on the way in (stages.core.markdown: Markdown text escaped, code spans fenced,
Python literals as ``repr``); the YAML front matter is written by ``huggingface_hub``'s YAML dumper.
"""
from __future__ import annotations

import json
from urllib.parse import quote
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from stages.core.markdown import code, py, text
from stages.metrics import vocab

# Licence of each base as the Hub lists it (a LoRA of a base inherits the base's terms).
BASE_LICENSES = {
    "black-forest-labs/FLUX.1-dev": {
        "license": "other", "license_name": "flux-1-dev-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"},
    "black-forest-labs/FLUX.1-schnell": {"license": "apache-2.0"},
}
TAGS = ["flux", "lora", "diffusers", "text-to-image", "impressionism", "template:sd-lora"]
# columns of the card's metrics table and what each family measures: the metrics vocabulary
COLUMNS = {s: vocab.SETS[s] for s in ("holdout", "base", "lora", "delta")}


class CardError(SystemExit):
    """A file the card needs is missing or unreadable (exits with the message)."""


@dataclass
class Facts:
    adapter: dict                   # models/lora/adapter.json
    metrics: dict                   # reports/metrics.json (flat)
    samples: dict                   # reports/samples/index.json
    params: dict                    # the effective params.yaml
    trigger: str
    git_commit: Optional[str] = None
    git_dirty: bool = False
    mlflow: dict = field(default_factory=dict)   # reports/mlflow_run.json
    dataset_md5: Optional[str] = None            # dvc.lock md5 of data/curated
    data: dict = field(default_factory=dict)     # split counts, sources, licences
    operating_point: dict = field(default_factory=dict)  # reports/eval/operating_point.json (eval.grid)


def _read_json(path: Path, what: str, hint: str) -> dict:
    if not path.exists():
        raise CardError(f"{path} not found ({what}): {hint}")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CardError(f"{path} is not readable JSON ({what}): {err}") from None


def data_summary(curated: Path) -> dict:
    """Counts per split, sources and licences of the curated shards (reads only small columns)."""
    import pyarrow.parquet as pq

    out: dict[str, Any] = {}
    for split in ("train", "holdout"):
        files = sorted((curated / split).glob("part-*.parquet"))
        if not files:
            continue
        cols = {"source": Counter(), "license": Counter(), "artist": Counter()}
        n = 0
        for f in files:
            t = pq.read_table(f, columns=list(cols))
            n += t.num_rows
            for name, counter in cols.items():
                counter.update("unknown" if v is None else v for v in t.column(name).to_pylist())
        out[split] = {"images": n, **{k: dict(c.most_common(8)) for k, c in cols.items()}}
    return out


def collect(root: Path | str, params: dict, lora_dir: str = "models/lora",
            reports: str = "reports") -> Facts:
    """Read every file the card needs; a missing one is a :class:`CardError` naming the stage."""
    root = Path(root)
    adapter = _read_json(root / lora_dir / "adapter.json", "the adapter's description",
                         "run the train stage first (dvc repro train)")
    every = root / reports / "eval" / "metrics_all.json"  # metrics.json holds the headline only
    metrics = _read_json(every if every.exists() else root / reports / "metrics.json", "evaluation metrics",
                         "run the evaluate stage first (dvc repro evaluate)")
    samples = _read_json(root / reports / "samples" / "index.json", "sample images",
                         "run the sample stage first (dvc repro sample)")
    from stages.core.lineage import adapter_hash, dataset_hash, git_state
    from stages.core.tracking import RUN_FILE

    run_file = root / RUN_FILE  # train's record of its MLflow run, and of the adapter that run made
    mlflow = json.loads(run_file.read_text()) if run_file.exists() else {}
    if mlflow.get("adapter_sha256") != adapter_hash(root / lora_dir):  # another adapter's run (dvc checkout)
        mlflow = {}

    commit, dirty = git_state(root)
    opoint = root / reports / "eval" / "operating_point.json"
    return Facts(
        adapter=adapter, metrics=metrics, samples=samples, params=params,
        trigger=samples.get("trigger") or params.get("caption", {}).get("trigger", ""),
        git_commit=commit, git_dirty=bool(dirty),
        mlflow={k: v for k, v in mlflow.items() if k in ("run_id", "experiment_id")},
        dataset_md5=dataset_hash(root / "dvc.lock"), data=data_summary(root / "data" / "curated"),
        operating_point=json.loads(opoint.read_text()) if opoint.exists() else {})


def strength(facts: Facts) -> dict | None:
    """The recommended LoRA strength for the shipped adapter (its step in adapter.json), from the grid."""
    from stages.metrics.operating_point import strength_for

    return strength_for(facts.operating_point, facts.adapter.get("steps"))


# ----------------------------------------------------------------------------- metadata
def is_hub_id(base: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if "/" not in base or Path(base).expanduser().exists():
        return False
    try:
        validate_repo_id(base)
        return True
    except HFValidationError:
        return False


def widget_images(samples: dict, limit: int = 6) -> list[dict]:
    """The LoRA samples at the largest scale, first seed, one per prompt: the card's widget."""
    images = samples.get("images", [])
    top = max((float(im["scale"]) for im in images), default=0.0)
    seed = samples.get("seeds", [None])[0]
    picked = [im for im in images if float(im["scale"]) == top and im.get("seed") == seed]
    return picked[:limit]


def metadata(facts: Facts, widget: list[dict]) -> dict:
    """HF model-card YAML: base model, its licence, tags, trigger as instance prompt, widget."""
    base = facts.adapter.get("base", "")
    meta: dict[str, Any] = {}
    if is_hub_id(base):
        meta["base_model"] = base
        meta.update(BASE_LICENSES.get(base, {"license": "other", "license_name": "same-as-base-model",
                                             "license_link": f"https://huggingface.co/{base}"}))
    else:  # smoke / local base: no hub base to name; the LoRA still inherits FLUX.1-dev's terms
        meta.update(BASE_LICENSES["black-forest-labs/FLUX.1-dev"])
    meta.update(library_name="diffusers", pipeline_tag="text-to-image", tags=list(TAGS),
                instance_prompt=facts.trigger)
    meta["widget"] = [{"text": im.get("full_prompt") or im["prompt"], "output": {"url": im["hub_file"]}}
                      for im in widget]
    return meta


# ----------------------------------------------------------------------------- body
def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def metric_rows(metrics: dict) -> list[tuple[str, dict]]:
    """metrics (flat ``<stem>_<set>``) -> [(stem, {set: value})] in the vocabulary's order."""
    return [(fam.name, vals) for fam, vals in vocab.rows(metrics) if any(c in vals for c in COLUMNS)]


def metrics_table(metrics: dict) -> str:
    cols = [c for c in COLUMNS if any(c in vals for _, vals in metric_rows(metrics))]
    lines = ["| metric | " + " | ".join(COLUMNS[c] for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for stem, vals in metric_rows(metrics):
        label = vocab.family(f"{stem}_lora").label
        lines.append(f"| `{stem}` ({label}) | " + " | ".join(vocab.fmt(f"{stem}_{c}", vals.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _data_section(facts: Facts) -> str:
    p, d = facts.params, facts.data
    src = p.get("data", {}).get("source", "?")
    if src == "wikiart":
        w = p["data"]["wikiart"]
        where = (f"[{text(w['dataset'])}](https://huggingface.co/datasets/{quote(str(w['dataset']))})"
                 f" (revision {code(w.get('revision') or 'not pinned')}), styles {text(', '.join(w['styles']))}")
        licence = ("WikiArt images are listed on the Hub with licence *unknown*: many paintings are in the "
                   "public domain, their photographs and the collection may not be. Use for research; check "
                   "before commercial use.")
    elif src == "synthetic":
        where = "the project's seeded synthetic painting generator (smoke profile: a test adapter, not an artwork model)"
        licence = "The synthetic images are generated by this project's code and carry no third-party rights."
    else:
        where = f"a local folder (`data.path` = {code(p.get('data', {}).get('path'))})"
        licence = "Images from a local folder: their licence is the owner's; see the `license` column below."
    lines = [f"- Source: {where}.", f"- Licence note: {licence}"]
    for split, s in d.items():
        lines.append(f"- {code(split)} split: {s['images']} images; sources {_counts(s['source'])}; "
                     f"licences {_counts(s['license'])}")
    if not d:
        lines.append("- Curated shards (data/curated) were not present when this card was written: no counts.")
    cap = p.get("caption", {})
    lines.append(f"- Captions: {code(cap.get('backend'))} backend"
                 + (f" ({code(cap.get('model'))})" if cap.get("model") else "")
                 + f", trigger {code(facts.trigger)} in every caption.")
    return "\n".join(lines)


def _usage(facts: Facts, repo_id: str) -> str:
    base = facts.adapter.get("base", "")
    s = facts.samples
    kohya = facts.adapter.get("files", {}).get("kohya", "lora_kohya.safetensors")
    first = (s.get("images") or [{}])[0]
    example = first.get("full_prompt") or f"a harbour at dawn with fishing boats, {facts.trigger}"
    rec = strength(facts)
    scale = float(rec["scale"]) if rec else 1.0  # a number in a code snippet, never text from the file
    note = (f"Recommended strength **{scale:g}** (the evaluation's operating point for this step: "
            f"style {fmt(rec['style'])}, content {fmt(rec['content'])} of the base's CLIP score).\n\n" if rec else "")
    return f"""{note}### diffusers

```python
import torch
from diffusers import FluxPipeline

{_load_base(base)}
pipe.load_lora_weights({py(repo_id)}, weight_name="pytorch_lora_weights.safetensors", adapter_name="impressionism")
image = pipe(
    {py(example)},
    num_inference_steps={_number(s.get('steps', 28))}, guidance_scale={_number(s.get('guidance', 3.5))},
    joint_attention_kwargs={{"scale": {_number(scale)}}},  # lora_scale: 0 = base model, 0.5 = half strength
    generator=torch.Generator("cuda").manual_seed(0),
).images[0]
```

`pipe.set_adapters(["impressionism"], adapter_weights=[0.7])` sets the strength once for all calls;
`pipe.fuse_lora(lora_scale=0.7)` bakes it in for speed. On 16 GB cards load the base with
`enable_model_cpu_offload()` or a 4-bit transformer (see the project's docs/user-guide.md).

### ComfyUI

Copy {code(kohya)} (kohya/ComfyUI `lora_unet_*` keys, every module with its `.alpha`, so the strength
is right) into `ComfyUI/models/loras/`, then add a **LoraLoaderModelOnly** node between the FLUX.1-dev
UNET loader and the sampler, `strength_model` {text(fmt(scale))}{'' if rec else ' (0.5–0.8 for a lighter touch)'}. Put {code(facts.trigger)}
in the prompt."""


def _load_base(base: str) -> str:
    """The snippet's line that loads the base the adapter was trained on (an adapter only fits its base)."""
    if is_hub_id(base):
        return f'pipe = FluxPipeline.from_pretrained({py(base)}, torch_dtype=torch.bfloat16).to("cuda")'
    if base == "tiny-random":
        return ("# the smoke model: flux-impressionism's tiny random FLUX, built offline by the project (not on the\n"
                "# Hub); this adapter only fits it. Run from a clone of the project.\n"
                "from stages.models import flux\n"
                "pipe = FluxPipeline.from_pretrained(flux.build_tiny_random(\"tiny-random-flux\")).to(\"cuda\")")
    return (f"# the local base model the adapter was trained on (a folder on the training machine)\n"
            f'pipe = FluxPipeline.from_pretrained({py(base)}, torch_dtype=torch.bfloat16).to("cuda")')


def _counts(counter: dict) -> str:
    """``{"public domain": 5}`` -> ``public domain 5`` with each name escaped."""
    return ", ".join(f"{text(k)} {text(v)}" for k, v in counter.items()) or "none"


def _number(v: Any) -> str:
    """A number for a code snippet (anything else becomes its string literal)."""
    return repr(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else py(v)


def _operating_point(facts: Facts) -> str:
    """One paragraph on the recorded operating point (which step, which strength), or nothing."""
    rec = facts.operating_point
    if not rec.get("enabled"):
        return ""
    b = rec["recommended"]
    shipped = facts.adapter.get("steps")
    which = "this adapter" if b["step"] == shipped else f"step {b['step']} (this adapter is step {shipped})"
    return (f"\n\nWhich step, which strength (`reports/eval/operating_point.json`, {rec['pairs']} prompt-seed pairs): "
            f"{which} at scale **{fmt(b['scale'])}**, style {fmt(b['style'])}, content {fmt(b['content'])}: "
            f"{text(b['reason'])}." + (f" {text(b['trend'][:1].upper() + b['trend'][1:])}." if b.get("trend") else ""))


def optimizer_text(train: dict) -> str:
    """``prodigy (d_coef 1.0, ...), weight decay 0.01, EMA 0.999`` from the train params."""
    name = train.get("optimizer")
    extra = train.get(name) if isinstance(train.get(name), dict) else {}
    # typed, validated params (a Literal name, numbers, booleans): nothing to escape
    settings = f" ({', '.join(f'{k} {v}' for k, v in extra.items())})" if extra else ""
    ema = f", EMA of the weights {train['ema_decay']} (adapter in `ema/`)" if train.get("ema_decay") else ""
    return f"`{name}`{settings}, weight decay {train.get('weight_decay')}{ema}"


def render(facts: Facts, repo_id: str, widget: list[dict], grids: list[str]) -> str:
    """The README.md (YAML front matter + body) as a string; parse it with ``ModelCard``. Every
    value from a file or a param is escaped (``text``) or code-fenced (``code``; ``c`` in tables)."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = metadata(facts, widget)
    a, m, s, p = facts.adapter, facts.metrics, facts.samples, facts.params
    t = p.get("train", {})

    def c(v: Any) -> str:  # a code span inside a table row
        return code(v, table=True)

    base_note = ("" if is_hub_id(a.get("base", "")) else
                 f"\n> **Test adapter.** Trained on {code(a.get('base'))} (the smoke profile's tiny random model), "
                 "not on FLUX.1-dev: it only proves the pipeline runs end to end.\n")
    grid_md = "\n".join(f"![{text(Path(g).stem)}]({quote(g)})" for g in grids)
    counts = ", ".join(f"{text(k[2:])} {text(v)}" for k, v in m.items() if k.startswith("n_"))
    ratio = m.get("clip_score_ratio")
    commit = (facts.git_commit or "unknown") + (" (working tree had uncommitted changes)" if facts.git_dirty else "")
    n_modules = len(a.get("target_modules") or [])
    aim = ("that paints in the manner of the French Impressionists: short visible strokes, broken colour, pure "
           "unmixed hues, coloured shadows instead of black, high-key light" if is_hub_id(a.get("base", "")) else
           "trained by the pipeline's smoke run; the pipeline aims at the French Impressionists' manner, but a "
           "test adapter on a tiny random model paints nothing recognisable")
    body = f"""
# FLUX.1 Impressionism LoRA
{base_note}
A LoRA adapter for {code(a.get('base'))} {aim}.
Put the trigger **{code(facts.trigger)}** in the prompt. Built by the flux-impressionism pipeline
(curation → captions → LoRA → evaluation, versioned with DVC); `params.yaml` here is its full configuration.

## Samples

Prompts never seen in training, same seeds, LoRA scale {text(', '.join(fmt(x) for x in s.get('scales', [])))}
(0 = base model); {text(s.get('steps'))} steps, guidance {text(s.get('guidance'))}, {text(s.get('resolution'))} px.

{grid_md}

## Use

{_usage(facts, repo_id)}

## Training data

{_data_section(facts)}

## Evaluation

From `reports/metrics.json` (held-out paintings vs base vs base + LoRA at scale {text(fmt(m.get('lora_scale')))};
images per set: {counts or 'not recorded'}). CLIP-score ratio LoRA / base: **{text(fmt(ratio))}** (1.0 = prompt
fidelity kept).{_operating_point(facts)}

{metrics_table(m)}

## Training

| | |
|---|---|
| base | {c(a.get('base'))} @ {c(a.get('revision') or 'not pinned')} ({text(a.get('quantization'))} while training) |
| LoRA | rank {text(a.get('rank'))}, alpha {text(a.get('alpha'))}, targets {c(a.get('targets'))} ({n_modules} module names), {text(a.get('lora_parameters'))} parameters |
| blocks | double {text(a.get('double_blocks') or 'all')}, single {text(a.get('single_blocks') or 'all')}, rank map {text(a.get('rank_map') or 'none')} |
| steps | {text(a.get('steps'))} at {text(a.get('resolution'))} px, batch {text(t.get('batch_size'))} × accumulation {text(t.get('grad_accum'))}, lr {text(t.get('lr'))} ({text(t.get('lr_scheduler'))}), {text(t.get('optimizer'))} |
| optimizer | {optimizer_text(t)} |
| flow matching | σ sampling {c(t.get('sigma_sampling'))}, guidance {text(t.get('guidance'))}, caption dropout {text(t.get('caption_dropout'))} |

## Lineage

| | |
|---|---|
| profile | {c(p.get('profile'))} (full parameters in `params.yaml`) |
| data hash (encode cache) | {c(a.get('data_hash'))} |
| curated dataset (dvc.lock md5) | {c(facts.dataset_md5 or 'not recorded')} |
| git commit | {c(commit)} |
| MLflow run | {c(facts.mlflow.get('run_id') or 'not recorded')} (experiment {c(facts.mlflow.get('experiment_id') or '—')}) |
| seed | {text(a.get('seed'))} |
"""
    return ModelCard(f"---\n{ModelCardData(**meta).to_yaml()}\n---\n{body}").content
