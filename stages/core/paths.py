"""Every file and folder the pipeline reads or writes, in one place: one dataclass per stage whose
fields are that stage's inputs (``inp``), outputs (``out``) and local state (``local``: files a
stage keeps that DVC does not track, such as checkpoints and the MLflow run id).

dvc.yaml declares the same inputs and outputs (tests/test_paths.py checks that the two agree), and
a stage takes its paths from here: ``run(params, paths.Filter())``. Paths are relative to the
project root (a stage runs there); ``paths.Filter().under(tmp)`` moves a whole stage into ``tmp``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path


def inp(path: str):
    return field(default=Path(path), metadata={"role": "in"})


def out(path: str):
    return field(default=Path(path), metadata={"role": "out"})


def local(path: str):
    return field(default=Path(path), metadata={"role": "local"})


@dataclass(frozen=True)
class StagePaths:
    def under(self, root: os.PathLike | str) -> "StagePaths":
        """The same layout inside ``root`` (tests, scratch projects)."""
        return replace(self, **{f.name: Path(root) / getattr(self, f.name) for f in fields(self)})

    def role(self, role: str) -> dict[str, Path]:
        """The fields with one role (``in``, ``out`` or ``local``): name -> path."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["role"] == role}


@dataclass(frozen=True)
class Validate(StagePaths):
    validated: Path = out("reports/validated.txt")  # constant: the stages after it depend on it


@dataclass(frozen=True)
class Checked(StagePaths):
    """A stage that runs only after validate (DVC runs them in that order: this is their dep)."""
    validated: Path = inp("reports/validated.txt")


@dataclass(frozen=True)
class Download(Checked):
    raw: Path = out("data/raw")              # shards/, rejects.parquet, truth.parquet, contrast/
    reports: Path = out("reports/data")      # download.json, sizes.csv, figures/


@dataclass(frozen=True)
class Dedupe(Checked):
    shards: Path = inp("data/raw/shards")
    table: Path = out("data/interim/dedupe.parquet")
    reports: Path = out("reports/dedupe")


@dataclass(frozen=True)
class Filter(Checked):
    shards: Path = inp("data/raw/shards")
    truth: Path = inp("data/raw/truth.parquet")   # synthetic sources only
    dedupe: Path = inp("data/interim/dedupe.parquet")
    table: Path = out("data/interim/filter.parquet")
    embeddings: Path = out("data/interim/clip_embeddings.safetensors")
    reports: Path = out("reports/filter")
    metrics: Path = out("reports/curation.json")


@dataclass(frozen=True)
class Caption(Checked):
    shards: Path = inp("data/raw/shards")
    filter: Path = inp("data/interim/filter.parquet")
    curated: Path = out("data/curated")
    reports: Path = out("reports/caption")


@dataclass(frozen=True)
class Encode(Checked):
    curated: Path = inp("data/curated")
    cache: Path = out("data/cache")


@dataclass(frozen=True)
class Train(Checked):
    cache: Path = inp("data/cache")
    lora: Path = out("models/lora")
    reports: Path = out("reports/train")             # loss.tsv (DVC plot), validation/
    checkpoints: Path = local("models/checkpoints")  # resume state: gitignored, not a DVC output
    snapshots: Path = local("models/snapshots")      # train.save_every adapters: gitignored, not a DVC output
    timings: Path = local("reports/train/timings.tsv")
    run_file: Path = local("reports/mlflow_run.json")


@dataclass(frozen=True)
class OperatingPoint(Checked):
    """The (snapshot step x LoRA scale) grid: after train, before sample (which may render its 'best')."""
    lora: Path = inp("models/lora")
    snapshots: Path = local("models/snapshots")       # train.save_every adapters, the grid's other steps
    curated: Path = inp("data/curated")               # holdout/: the style reference
    embeddings: Path = inp("data/interim/clip_embeddings.safetensors")
    reports: Path = out("reports/operating_point")    # operating_point.json, grid.md, grid.png
    plot: Path = out("reports/plots/operating_point.csv")  # DVC plot: style vs content

    @property
    def record(self) -> Path:
        return self.reports / "operating_point.json"


@dataclass(frozen=True)
class Sample(Checked):
    lora: Path = inp("models/lora")
    operating_point: Path = inp("reports/operating_point/operating_point.json")  # sample.*=best
    snapshots: Path = local("models/snapshots")       # sample.adapter_step renders one of train's snapshots
    samples: Path = out("reports/samples")            # the prompt file is a param: sample.prompts


@dataclass(frozen=True)
class Evaluate(Checked):
    curated: Path = inp("data/curated")               # holdout/ is the reference set
    embeddings: Path = inp("data/interim/clip_embeddings.safetensors")
    samples: Path = inp("reports/samples")
    loss: Path = inp("reports/train/loss.tsv")
    operating_point: Path = inp("reports/operating_point/operating_point.json")
    eval: Path = out("reports/eval")
    report: Path = out("reports/report.html")
    metrics: Path = out("reports/metrics.json")
    plots: Path = out("reports/plots")                # DVC plots; outside reports/eval: outputs may not overlap


STAGES: dict[str, type[StagePaths]] = {"validate": Validate, "download": Download, "dedupe": Dedupe, "filter": Filter,
                                       "caption": Caption, "encode": Encode, "train": Train,
                                       "operating_point": OperatingPoint, "sample": Sample, "evaluate": Evaluate}
