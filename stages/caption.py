"""Caption stage: the images kept by filter, captioned and split into training and held-out sets.

Reads  data/raw/shards/ (images + metadata) and data/interim/filter.parquet (``kept`` rows).
Writes data/curated/train/part-*.parquet and data/curated/holdout/part-*.parquet
       (core.shards.IMAGE_SCHEMA with ``caption`` filled), data/curated/split.parquet (id, split),
       data/curated/imagefolder/ when caption.export_imagefolder (train/ and test/ = held-out, each
       with metadata.jsonl: ``datasets.load_dataset("imagefolder", data_dir=...)`` reads it),
       reports/caption/: preview.md (thumbnails + captions), lengths.png, captions.csv, stats.json
       (counts by backend and split, token lengths, CLIP/T5 truncation counts).
Params: seed, data.holdout, data.shard_rows, caption.*, model.base/model.revision (whose tokenizers
        measure caption lengths when they can be loaded).
"""
from __future__ import annotations

import collections
import csv
import io
import json
import logging
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from stages.core import log as logs
from stages.core import markdown as md
from stages.core import params, shards
from stages.core.images import decode
from stages.core.io import atomic_dir, write_json, write_text
from stages.core.paths import Caption
from stages.curation import captions
from stages.data.holdout import split_holdout
from stages.models import tokens
from stages.models.captioner import Captioner

SPLITS = ("train", "holdout")
IMAGEFOLDER_SPLIT = {"train": "train", "holdout": "test"}  # names datasets' imagefolder recognises
PREVIEW_PER_SPLIT = 12

log = logging.getLogger("stages.caption")


def kept_ids(filter_path: Path) -> list[str]:
    if not filter_path.exists():
        raise SystemExit(f"{filter_path} is missing: run the filter stage first (dvc repro filter)")
    table = pq.read_table(filter_path)
    missing = {"id", "kept"} - set(table.column_names)
    if missing:
        raise SystemExit(f"{filter_path} lacks columns {sorted(missing)}")
    return [i for i, k in zip(table["id"].to_pylist(), table["kept"].to_pylist()) if k]


def _captioned(raw: Path, ids: set[str], split: str, p: params.Params, describe, records: list,
               thumbs: list) -> Iterator[dict]:
    """Rows of ``ids`` from the raw shards with their captions, batch by batch, recording each."""
    cfg, seen, batch = p.caption, set(), []

    def flush():
        for row, (text, how) in zip(batch, captions.caption_batch(
                batch, cfg.backend, cfg.template, cfg.trigger, cfg.keep_existing, describe)):
            row["caption"] = text
            records.append({"id": row["id"], "split": split, "how": how, "artist": row.get("artist"),
                            "caption": text})
            if len(thumbs) < PREVIEW_PER_SPLIT * (SPLITS.index(split) + 1):
                thumbs.append((row["id"], split, row["image"], text))
            yield row

    bar = logs.progress(total=len(ids), desc=f"caption {split}", unit="img")
    for row in shards.iter_rows(raw, ids=ids):
        if row["id"] in seen:
            log.warning("id %s appears twice in %s: kept once", row["id"], raw)
            continue
        seen.add(row["id"])
        batch.append(row)
        if len(batch) >= cfg.batch_size:
            yield from flush()
            bar.update(len(batch))
            batch = []
    yield from flush()
    bar.update(len(batch))
    bar.close()


def export_imagefolder(curated: Path, dest: Path) -> int:
    """Image files + metadata.jsonl per split (``test`` = held-out) for imagefolder readers."""
    n = 0
    for split in SPLITS:
        folder = dest / IMAGEFOLDER_SPLIT[split]
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for row in shards.iter_rows(curated / split):
            fmt = (row.get("format") or "png").lower()
            name = f"{row['id']}.{'jpg' if fmt == 'jpeg' else fmt}"
            (folder / name).write_bytes(row.pop("image"))
            meta = {"file_name": name, **{k: v for k, v in row.items() if k not in ("format",)}}
            lines.append(json.dumps(meta, ensure_ascii=False))
            n += 1
        (folder / "metadata.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return n


def write_reports(out: Path, records: list[dict], thumbs: list, stats: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json(out / "stats.json", stats)
    with open(out / "captions.csv", "w", newline="", encoding="utf-8") as fh:
        cols = ["id", "split", "how", "words", "clip_tokens", "t5_tokens", "caption"]
        writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, limit in ((axes[0], "clip_tokens", tokens.CLIP_MAX_TOKENS),
                           (axes[1], "t5_tokens", tokens.T5_MAX_TOKENS)):
        values = [r[key] for r in records]
        ax.hist(values, bins=30, color="#4c72b0")
        ax.axvline(limit, color="#c44e52", linestyle="--", label=f"limit {limit}")
        ax.set(xlabel=f"{key.replace('_', ' ')} ({stats['token_method'][key.split('_')[0]]})",
               ylabel="captions", title=f"{key.split('_')[0].upper()}: {stats[key.split('_')[0] + '_truncated']} over")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "lengths.png", dpi=100)
    plt.close(fig)

    (out / "thumbs").mkdir()
    # captions and the trigger are the user's text: escaped (stages.core.markdown), never raw HTML or images
    lines = ["# Captions preview", "",
             f"{stats['images']} images ({md.text(stats['by_split'])}), backend {md.code(stats['backend'])}, "
             f"trigger {md.code(stats['trigger'])}; captions by origin: {md.text(stats['by_origin'])}; CLIP "
             f"truncations: {stats['clip_truncated']}, T5 truncations: {stats['t5_truncated']}.", "",
             "![caption lengths](lengths.png)", "", "| image | split | caption |", "|---|---|---|"]
    for image_id, split, data, text in thumbs:
        try:
            img = decode(data)
            img.thumbnail((128, 128))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
            (out / "thumbs" / f"{image_id[:16]}.jpg").write_bytes(buf.getvalue())
            cell = f"![{image_id[:8]}](thumbs/{image_id[:16]}.jpg)"
        except Exception:  # noqa: BLE001 - an undecodable image still gets its caption listed
            cell = f"`{image_id[:8]}` (undecodable)"
        lines.append(f"| {cell} | {md.text(split)} | {md.text(text)} |")
    write_text(out / "preview.md", "\n".join(lines) + "\n")


def run(p: params.Params, paths: Caption = Caption(), describe=None) -> dict:
    """The whole stage; ``describe`` overrides the VLM (tests)."""
    cfg = p.caption
    captions.template_fields(cfg.template)  # a broken template fails before any work
    raw, filter_path = paths.shards, paths.filter
    ids = kept_ids(filter_path)
    meta = shards.read_table(raw, columns=["id", "artist"], ids=ids)
    found = set(meta["id"].to_pylist())
    lost = [i for i in ids if i not in found]
    if lost:
        raise SystemExit(f"{len(lost)} ids kept by filter are not in {raw} (e.g. {lost[:3]}): "
                         "data/raw and data/interim are out of step; rerun dedupe and filter")
    if not found:
        raise SystemExit(f"filter kept no images ({filter_path}): nothing to caption")
    split = split_holdout(meta["id"].to_pylist(), meta["artist"].to_pylist(), p.data.holdout, p.seed)
    log.info("%d images: %d train, %d held out (data.holdout=%s, seed %d)", len(split),
             sum(s == "train" for s in split.values()), sum(s == "holdout" for s in split.values()),
             p.data.holdout, p.seed)

    if describe is None and cfg.backend != "template":
        if not cfg.model:
            raise SystemExit(f"caption.backend={cfg.backend} needs caption.model (a hub id or local folder)")
        describe = Captioner(cfg.model, cfg.prompt, cfg.max_new_tokens, cfg.batch_size)

    records: list[dict] = []
    thumbs: list = []
    with atomic_dir(paths.curated) as tmp:
        for name in SPLITS:
            members = {i for i, s in split.items() if s == name}
            shards.write_shards(_captioned(raw, members, name, p, describe, records, thumbs),
                                tmp / name, p.data.shard_rows)
        order = sorted(split)
        shards.write_table(pa.table({"id": order, "split": [split[i] for i in order]}), tmp / "split.parquet")
        if cfg.export_imagefolder:
            log.info("imagefolder export: %d images", export_imagefolder(tmp, tmp / "imagefolder"))

    counter = tokens.TokenCounter(p.model.base, p.model.revision)
    clip_n, t5_n = counter.count([r["caption"] for r in records])
    for r, c, t in zip(records, clip_n, t5_n):
        r.update(words=len(r["caption"].split()), clip_tokens=c, t5_tokens=t)
    stats = {"images": len(records), "backend": cfg.backend, "trigger": cfg.trigger,
             "by_split": dict(collections.Counter(r["split"] for r in records)),
             "by_origin": dict(collections.Counter(r["how"] for r in records)),
             "empty_captions": sum(not r["caption"] for r in records),
             "holdout_artists": len({r["artist"] for r in records if r["split"] == "holdout"}),
             "token_method": counter.method,
             **tokens.truncation_counts(clip_n, t5_n)}
    if stats["t5_truncated"]:
        log.warning("%d captions exceed T5's %d tokens and will be cut", stats["t5_truncated"], tokens.T5_MAX_TOKENS)
    log.info("captions by origin %s; over CLIP's 77 tokens: %d; over T5's 512: %d",
             stats["by_origin"], stats["clip_truncated"], stats["t5_truncated"])
    with atomic_dir(paths.reports) as tmp:
        write_reports(tmp, records, thumbs, stats)
    return stats


def main() -> None:
    p = params.load()
    logs.setup("caption")
    run(p, Caption())


if __name__ == "__main__":
    main()
