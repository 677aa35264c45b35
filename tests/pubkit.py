"""Fixtures for the publish / app / notebook tests: a project folder holding what the pipeline
writes (a real tiny LoRA, sample images and grids, metrics.json, the MLflow run file, curated
shards), built in a temp dir without running the pipeline.

The adapter is real: peft LoRA on the tiny random FluxTransformer2DModel (stages.models.lora),
saved with ``FluxPipeline.save_lora_weights`` plus the kohya copy (stages.models.export), with
its B matrices set non-zero so that base and LoRA images differ.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from PIL import Image

from stages import modelcard
from stages.core import params
from stages.core.lineage import adapter_hash
from stages.core.images import encode_png
from stages.core.shards import content_id, write_shards

TRIGGER = "impressionism style"
PROMPTS = ["a harbour at dawn with fishing boats", "a bowl of pears on a table"]
# the shape stages/evaluate.py writes: flat <stem>_<set> keys, counts first
METRICS = {
    "n_holdout": 3, "lora_scale": 1.0, "n_base": 4, "n_lora": 4,
    "style_centroid_holdout": 0.812345, "style_centroid_base": 0.423456, "style_centroid_lora": 0.634567,
    "style_centroid_delta": 0.211111,
    "clip_score_base": 24.123456, "clip_score_lora": 23.456789,
    "kid_base": 0.0412345, "kid_lora": 0.0198765, "kid_delta": -0.021358,
    "trait_strokes_holdout": 0.301234, "trait_strokes_base": 0.101234, "trait_strokes_lora": 0.251234,
    "trait_strokes_delta": 0.15, "clip_score_ratio": 0.972364,
}


def tiny_transformer():
    from diffusers import FluxTransformer2DModel

    from stages.core.params import Model
    from stages.models import flux

    path = flux.resolve_base(Model(base="tiny-random"))
    return path, FluxTransformer2DModel.from_pretrained(path, subfolder="transformer")


def make_adapter(lora_dir: Path, base: str = "tiny-random", rank: int = 4, seed: int = 0) -> str:
    """A real LoRA in ``lora_dir`` (diffusers + kohya + adapter.json); returns the base's path."""
    from safetensors.torch import save_file

    from stages.models import export, lora

    base_path, transformer = tiny_transformer()
    lp = params.Lora(rank=rank)
    lora.add_lora(transformer, lp)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in transformer.named_parameters():
            if "lora_B" in name:
                prm.copy_(torch.randn(prm.shape, generator=gen) * 0.5)
    lora_dir.mkdir(parents=True, exist_ok=True)
    lora.save_diffusers(transformer, lora_dir)
    cfg = lora.adapter_config(transformer)
    state = lora.lora_state_dict(transformer)
    save_file(export.to_kohya(state, dict(transformer.config), {n: float(rank) for n in cfg["target_modules"]}),
              lora_dir / "lora_kohya.safetensors")
    (lora_dir / "adapter.json").write_text(json.dumps({
        "base": base, "revision": None, "quantization": "none", "rank": rank, "alpha": rank, "rank_map": {},
        "targets": "attention", "double_blocks": None, "single_blocks": None,
        "target_modules": cfg["target_modules"], "dropout": 0.0, "steps": 60, "data_hash": "d" * 16,
        "cache_key": "k" * 16, "resolution": 64, "seed": 1234,
        "lora_parameters": sum(t.numel() for t in state.values()),
        "files": {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "lora_kohya.safetensors"}}, indent=2))
    return base_path


def make_samples(samples: Path, scales=(0.0, 0.5, 1.0), seeds=(0, 1)) -> dict:
    (samples / "images").mkdir(parents=True, exist_ok=True)
    (samples / "grids").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for pi, prompt in enumerate(PROMPTS):
        for seed in seeds:
            for scale in scales:
                name = f"images/p{pi:02d}-s{seed}-l{scale:.2f}.png"
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(samples / name)
                records.append({"file": name, "prompt_index": pi, "prompt": prompt,
                                "full_prompt": f"{prompt}, {TRIGGER}", "seed": seed,
                                "scale": scale, "kind": "base" if scale == 0 else "lora"})
    grids = []
    for seed in seeds:
        name = f"grids/seed-{seed}.png"
        Image.new("RGB", (200, 140), (230, 220, 200)).save(samples / name)
        grids.append({"file": name, "seed": seed})
    index = {"prompts": PROMPTS, "trigger": TRIGGER, "seeds": list(seeds), "scales": list(scales), "steps": 4,
             "guidance": 3.5, "resolution": 64, "model": "tiny-random", "revision": None,
             "images": records, "grids": grids}
    (samples / "index.json").write_text(json.dumps(index, indent=2))
    return index


def make_curated(curated: Path) -> None:
    for split, n, licence in (("train", 5, "public domain"), ("holdout", 2, None)):
        rows = []
        for i in range(n):
            data = encode_png(Image.new("RGB", (32, 32), (i * 40, 100, 200)))
            rows.append({"id": content_id(data), "image": data, "format": "png", "width": 32, "height": 32,
                         "source": "synthetic", "artist": "Claude Monet", "caption": f"x, {TRIGGER}",
                         "license": licence})
        write_shards(rows, curated / split, shard_rows=8)


def make_project(root: Path, base: str = "tiny-random") -> dict:
    """Everything publish needs under ``root``; returns paths and facts for assertions."""
    root.mkdir(parents=True, exist_ok=True)
    base_path = make_adapter(root / "models/lora", base=base)
    index = make_samples(root / "reports/samples")
    (root / "reports/metrics.json").write_text(json.dumps(METRICS, indent=2))
    (root / "reports/mlflow_run.json").write_text(json.dumps({"run_id": "0123456789abcdef", "experiment_id": "1",
                                                              "adapter_sha256": adapter_hash(root / "models/lora")}))
    make_curated(root / "data/curated")
    p = params.load(params.PARAMS_FILE).model_dump()
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"caption": {"outs": [
        {"path": "data/curated", "md5": "abc123.dir", "size": 1, "nfiles": 2}]}}}))
    return {"root": root, "base_path": base_path, "index": index, "metrics": METRICS}


def table_cells(text: str) -> dict[str, list[str]]:
    """Rows of the card's metrics table: stem -> its cells."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| `(\w+)` \([^|]*\) \|(.*)\|$", line)
        if m:
            rows[m[1]] = [c.strip() for c in m[2].split("|")]
    return rows


def check_card_metrics(hub: Path, metrics: dict) -> int:
    """Every <stem>_<set> value of metrics.json is in the card's table (4 significant digits), the
    folder's metrics.json is the same file; returns how many values were checked."""
    text = ModelCard.load(hub / "README.md").text
    assert json.loads((hub / "metrics.json").read_text()) == metrics
    header = next(line for line in text.splitlines() if line.startswith("| metric |"))
    columns = [c.strip() for c in header.strip("|").split("|")][1:]
    rows = table_cells(text)
    checked = 0
    for key, value in metrics.items():
        stem, _, col = key.rpartition("_")
        if col not in modelcard.COLUMNS or stem == "n":
            continue
        cell = rows[stem][columns.index(modelcard.COLUMNS[col])]
        if value is None:
            assert cell == "—", key
        else:
            assert float(cell) == pytest.approx(value, rel=1e-3, abs=1e-12), key
        checked += 1
    assert f"**{metrics['clip_score_ratio']:.4g}**" in text
    return checked
