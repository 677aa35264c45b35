"""The params schema: every knob in params.yaml, validated at the start of every stage.

params.yaml is composed by Hydra from conf/ (``conf/config.yaml`` + ``conf/profile/*.yaml``);
edit defaults there. A stage calls :func:`load` first: a wrong type, a value out of range or an
unknown key fails at once with a message naming the key, the value and what is allowed.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ROOT = Path(__file__).resolve().parents[2]
PARAMS_FILE = ROOT / "params.yaml"


Index = Annotated[int, Field(ge=0)]  # a block index; the model's block count is checked by validate
MAX_WORKERS = 64       # processes/threads/GPUs: more is a typo (validate also bounds by this machine)
MAX_RESOLUTION = 4096  # px; FLUX.1-dev is trained up to 2 MP (~1440 px): 4096 is already 8x that


def _int_items(annotation) -> str | None:
    """'value' when a field holds an int, 'items' when a list/dict of ints, else None."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if annotation is int or (get_origin(annotation) is Union and args == [int]):
        return "value"
    inner = [a for arg in [annotation, *args] for a in get_args(arg)]
    if get_origin(annotation) in (list, dict) or any(get_origin(a) in (list, dict) for a in args):
        return "items" if any(a is int or get_args(a)[:1] == (int,) for a in inner) else None
    return None


class Section(BaseModel):
    # Floats must be finite everywhere: `inf` / `nan` are refused.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _ints_are_ints(cls, v, info):
        """`true` or 1e9 is no integer (pydantic would quietly make them 1 and 1000000000)."""
        kind = _int_items(cls.model_fields[info.field_name].annotation)
        items = [v] if kind == "value" else (list(v.values()) if isinstance(v, dict) else v) if kind else []
        if isinstance(items, list) and any(isinstance(x, (bool, float)) for x in items):
            raise ValueError("booleans and floats are not integers here: write a whole number, e.g. 4")
        return v


# ----------------------------------------------------------------------------- value checks
# (values the schema's types accept but that silently do the wrong thing; each names what works)
def multiple_of_16(v: int) -> int:
    if v % 16:
        lo, hi = v // 16 * 16, v // 16 * 16 + 16
        raise ValueError(f"must be a multiple of 16 (Flux cuts images into 16-px patches, so {v} would "
                         f"silently become {lo} or {hi}): use {max(lo, 16)} or {hi}")
    return v


class SyntheticSource(Section):
    """The embedded generator (stages/data/synthetic.py): paintings plus planted copies and defects."""
    count: int = Field(240, ge=8, description="images in the set, planted near-duplicates and defects included")
    size: int = Field(128, ge=32, le=2048, description="long side in px")
    near_duplicates: float = Field(0.1, ge=0, le=0.5, description="share of the set planted as near-duplicates")
    defects: float = Field(0.08, ge=0, le=0.5, description="share of the set planted as defective images")
    contrast: int = Field(32, ge=0, description="photo-like renderings of the same scenes (data/raw/contrast)")


class WikiartSource(Section):
    """huggan/wikiart (or a hub id / local folder in its schema) through `datasets`."""
    dataset: str = "huggan/wikiart"
    # a commit of huggan/wikiart holding all 72 data/train-*.parquet shards (pinned for reproducibility)
    revision: Optional[str] = "95a63ba9d977acef34a0203a13e4b5b794145526"
    split: str = "train"
    styles: list[str] = ["Impressionism"]
    artists: list[str] = []
    genres: list[str] = []


class FolderSource(Section):
    """``data.source=folder``: trainer-convention caption files and kohya repeat folders (stages/data/folder.py)."""
    caption_extensions: list[str] = Field([".txt", ".caption"], description="caption file = image name with "
                                          "one of these extensions (the first found wins); [] = none")
    caption_max_bytes: int = Field(16384, ge=1, description="a larger caption file is rejected (bad_caption)")
    repeats: bool = Field(True, description="honour kohya `N_name` folders: their images are seen N times "
                                            "per epoch; false = a folder name is just a name")

    @field_validator("caption_extensions")
    @classmethod
    def _dotted(cls, v):
        bad = [e for e in v if not e.startswith(".") or len(e) < 2]
        if bad:
            raise ValueError(f"extensions start with a dot, e.g. '.txt' (got {bad})")
        return v


class Data(Section):
    source: Literal["synthetic", "wikiart", "folder"] = "synthetic"
    path: Optional[str] = None
    limit: Optional[int] = Field(None, ge=1)
    min_side: int = Field(32, ge=1, description="download rejects smaller images; the filter stage has its own")
    max_pixels: int = Field(178_956_970, ge=1 << 20, description="decompression-bomb limit (Pillow's "
                            "default); below 1 MP (1024 x 1024) ordinary paintings would be refused")
    max_bytes: int = Field(512 * 2 ** 20, ge=1, description="a larger file (image or sidecar) is rejected unread "
                                                           "(too_large)")
    shard_rows: int = Field(256, ge=1)
    holdout: float = Field(0.1, ge=0, lt=1, description="share of the set held out for evaluation "
                           "(evaluate compares the samples with them: more than 0)")
    workers: int = Field(2, ge=1, le=MAX_WORKERS)
    synthetic: SyntheticSource = SyntheticSource()
    wikiart: WikiartSource = WikiartSource()
    folder: FolderSource = FolderSource()

    @field_validator("holdout")
    @classmethod
    def _holdout_leaves_a_training_set(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("holds out no image, and evaluate compares the samples with held-out paintings "
                             "(it would fail after every other stage ran): use 0.05-0.2")
        if v > 0.5:
            raise ValueError(f"holds out {v:.0%} of the images, leaving {1 - v:.0%} to train on: "
                             "use 0.05-0.2 (at most 0.5)")
        return v

    @field_validator("path")
    @classmethod
    def _expand_home(cls, v: Optional[str]) -> Optional[str]:
        """``~/pics`` means the user's folder for every stage (validate checks that it exists)."""
        return os.path.expanduser(v) if v else v

    @model_validator(mode="after")
    def _folder_needs_path(self):
        if self.source == "folder" and not self.path:
            raise ValueError("data.source=folder needs data.path (a directory of images)")
        return self


class Dedupe(Section):
    hash_size: int = Field(8, ge=4, le=16, description="pHash/dHash side: hash_size² bits")
    threshold: int = Field(10, ge=0, le=256, description="max pHash Hamming distance (of hash_size² bits)")
    second_vote: bool = Field(True, description="a candidate pair also needs the other hash (dHash for a "
                                                "pHash hit, pHash for a dHash hit) within dhash_threshold")
    dhash_threshold: int = Field(16, ge=0, le=256)
    verify: bool = Field(True, description="confirm each near pair on fine pixel detail (see curation/verify)")
    # 0.6: on ../shared/realart distinct works (series included) match at <= 0.34, a copy and its
    # source at >= 0.75; the synthetic generator's series siblings at <= 0.40 (bench_curation_realart.py)
    verify_min: float = Field(0.6, ge=-1, le=1, description="min detail correlation of a confirmed pair")
    workers: int = Field(2, ge=1, le=MAX_WORKERS, description="processes that hash (and threads that search)")


class Clip(Section):
    model: str = "tiny"            # open_clip model name, or "tiny" (a small random config)
    pretrained: Optional[str] = None  # open_clip tag (e.g. "openai") or a local checkpoint path
    batch_size: int = Field(32, ge=1)


class Aesthetic(Section):
    enabled: bool = True
    head: Optional[str] = None      # path or URL of the LAION aesthetic MLP weights; None = random (smoke)
    threshold: float = Field(5.0, description="absolute mode: reject a score below this")
    percentile: float = Field(2.0, ge=0, le=100, description="percentile mode: reject the lowest this %")


class ZeroShot(Section):
    enabled: bool = True
    positive: list[str] = ["an impressionist painting", "a painting"]
    negative: list[str] = ["a photograph", "text", "a sculpture", "a picture frame", "a diagram"]
    threshold: float = Field(0.5, ge=0, le=1, description="absolute mode: min probability of 'painting'")
    percentile: float = Field(2.0, ge=0, le=100, description="percentile mode: reject the lowest this %")


class Filter(Section):
    # Cut-offs checked on ../shared/realart and the synthetic defects: see stages/curation/quality.py
    min_side: int = Field(80, ge=1, description="min side (px) of a training image: of its bucket_side "
                                                "(size_check=bucket) or its shorter side (short_side)")
    size_check: Literal["bucket", "short_side"] = Field(
        "bucket", description="bucket: the pixels the trainer's aspect buckets use (train.buckets=true); "
                              "short_side: the shorter side (square-crop training)")
    aspect_min: float = Field(0.33, gt=0)
    aspect_max: float = Field(3.0, gt=0)
    analysis_side: int = Field(512, ge=32, description="blur/exposure/blank are measured with the long "
                                                       "side scaled down to at most this")
    blur_min: float = Field(60.0, ge=0, description="min variance of the Laplacian (0-255 gray)")
    clipped_max: float = Field(0.25, ge=0, le=1, description="max share of clipped (≤2 or ≥253) pixels "
                                                             "not connected to the edge")
    surround_max: float = Field(0.5, ge=0, le=1, description="max share of clipped pixels in all, an "
                                                             "edge-connected surround included")
    texture_min: float = Field(0.02, ge=0, le=1, description="min share of pixels with a gradient over 2 "
                                                             "gray levels/px: below it an image is blank")
    entropy_min: float = Field(3.0, ge=0)
    std_min: float = Field(0.0, ge=0, description="0 = off: low contrast (fog, snow) is no defect")
    border_detect: bool = False
    border_max: float = Field(0.06, ge=0, le=1, description="max uniform band at an edge (share of the side)")
    workers: int = Field(2, ge=1, le=MAX_WORKERS, description="threads that decode and measure images")
    # CLIP scores from random weights (smoke) mean nothing: "percentile" rejects the lowest
    # aesthetic/zeroshot.percentile % of the images that pass the heuristics instead of an absolute cut.
    threshold_mode: Literal["absolute", "percentile"] = "percentile"
    aesthetic: Aesthetic = Aesthetic()
    zeroshot: ZeroShot = ZeroShot()

    @model_validator(mode="after")
    def _aspect_range(self):
        if self.aspect_min > self.aspect_max:
            raise ValueError(f"filter.aspect_min = {self.aspect_min} is above filter.aspect_max = "
                             f"{self.aspect_max}: no image could pass; e.g. aspect_min 0.33, aspect_max 3.0")
        return self


class Caption(Section):
    backend: Literal["template", "vlm", "combined"] = "template"
    template: str = "{description}, a {genre} painting by {artist}, {trigger}"
    trigger: str = "impressionism style"
    model: Optional[str] = None     # image-to-text model: hub id or local path (vlm/combined)
    prompt: str = "Describe what is depicted in this picture."
    max_new_tokens: int = Field(40, ge=1)
    batch_size: int = Field(8, ge=1)
    keep_existing: bool = True
    export_imagefolder: bool = False

    @field_validator("trigger")
    @classmethod
    def _trigger_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty: it is the phrase that switches the style on in captions "
                             "and sample prompts, e.g. 'impressionism style'")
        return v


class Model(Section):
    base: str = "tiny-random"       # hub id, local diffusers folder, or "tiny-random"
    revision: Optional[str] = None
    quantization: Literal["auto", "none", "nf4", "int8", "fp8"] = Field(
        "none", description="the transformer's base: auto = the fastest that fits the card (stages/models/memory.py)")
    vram_gb: Union[Literal["auto"], Literal[8, 12, 16, 24, 40, 80]] = Field(
        "auto", description="the GPU's memory class: picks the memory-saving settings (stages/models/memory.py)")


class Lora(Section):
    rank: int = Field(4, ge=1, le=1024)
    alpha: Optional[float] = Field(None, gt=0, description="None = rank")
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: Literal["attention", "attention+ff", "all"] = "attention"
    double_blocks: Optional[list[Index]] = None  # None = all
    single_blocks: Optional[list[Index]] = None  # None = all
    rank_map: dict[str, int] = {}               # module-name pattern -> rank

    @field_validator("rank_map")
    @classmethod
    def _positive_ranks(cls, v):
        bad = {k: r for k, r in v.items() if r < 1}
        if bad:
            raise ValueError(f"ranks must be >= 1, got {bad}")
        return v


# --- trainer block (issue 17): optimizers, EMA, snapshots, validation prompts -------------------
class ProdigyOpts(Section):
    """Prodigy (``prodigyopt``) as the style-LoRA community runs it: ``train.lr`` 1.0 (a multiplier of the
    step size Prodigy estimates itself), bias correction and safeguarded warm-up on."""
    d_coef: float = Field(1.0, gt=0, description="scales the estimated step size (0.5 = gentler, 2 = bolder)")
    use_bias_correction: bool = True
    safeguard_warmup: bool = True
    decouple: bool = Field(True, description="AdamW-style decoupled weight decay (train.weight_decay)")
    betas: list[float] = Field([0.9, 0.99], min_length=2, max_length=2)


class AdafactorOpts(Section):
    """transformers' Adafactor with a fixed ``train.lr`` (kohya's LoRA recipe: no relative step, no
    parameter scaling); ``relative_step: true`` lets Adafactor pick the lr itself (``train.lr`` unused)."""
    relative_step: bool = False
    scale_parameter: bool = False
    warmup_init: bool = False


class Train(Section):
    resolution: int = Field(64, ge=16, le=MAX_RESOLUTION)
    buckets: bool = True
    flip: bool = False
    batch_size: int = Field(4, ge=1, le=1024, description="per process; also at most the training images")
    grad_accum: int = Field(1, ge=1)
    steps: int = Field(150, ge=1)
    lr: float = Field(1e-2, gt=0)  # smoke: tiny model, loss must visibly fall; flux-dev: 1e-4
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(10, ge=0)
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0)
    prodigy: ProdigyOpts = ProdigyOpts()
    adafactor: AdafactorOpts = AdafactorOpts()
    ema_decay: Optional[float] = Field(None, gt=0, lt=1, description="EMA of the LoRA weights, saved as "
                                       "models/lora/ema/ (e.g. 0.999); None = no EMA")
    max_grad_norm: float = Field(1.0, gt=0)
    sigma_sampling: Literal["uniform", "logit_normal", "shift"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    shift: float = Field(3.0, gt=0)
    guidance: float = Field(1.0, ge=0)
    caption_dropout: float = Field(0.05, ge=0, le=1)
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    validate_every: int = Field(0, ge=0, description="0 = no validation images")
    validation_steps: int = Field(4, ge=1, description="sampling steps of a validation image")
    validation_prompts: Optional[str] = Field(None, description="prompt file (sample.prompts format); "
                                              "None = sample.prompts")
    validation_seeds: list[int] = Field([0], min_length=1)
    validation_guidance: float = Field(3.5, ge=0)
    validation_resolution: Optional[int] = Field(None, ge=16, le=MAX_RESOLUTION,
                                                 description="None = train.resolution")
    save_every: int = Field(50, ge=0, description="a loadable adapter in models/snapshots/ every N steps; 0 = none "
                            "(smoke: 50 of 150 steps, for the operating-point grid, eval.grid)")
    keep_last: int = Field(3, ge=0, description="snapshots kept (the newest); 0 = all")
    max_sequence_length: int = Field(64, ge=8, le=512, description="T5 tokens per caption (FLUX.1-dev: 512)")
    num_processes: int = Field(1, ge=1, le=MAX_WORKERS, description="training processes (one per GPU; "
                               "validate checks the GPUs or CPUs this machine has)")
    compile: Union[Literal["auto"], bool] = Field("auto", description="torch.compile the transformer's blocks; "
                                                  "auto = on a CUDA GPU, off on the CPU (stages/models/compiling.py)")

    _resolution_16 = field_validator("resolution")(multiple_of_16)

    @model_validator(mode="after")
    def _optimizer_settings(self):
        if self.optimizer == "prodigy" and not 0.1 <= self.lr <= 10:
            raise ValueError(f"train.optimizer=prodigy estimates the step size itself and train.lr multiplies "
                             f"it: use train.lr=1.0 (got {self.lr:g}; tune train.prodigy.d_coef instead)")
        if self.optimizer == "prodigy" and self.lr != 1.0:
            import logging

            logging.getLogger(__name__).warning("train.optimizer=prodigy with train.lr=%g: the community "
                                                "setting is 1.0 (tune train.prodigy.d_coef)", self.lr)
        if self.adafactor.warmup_init and not self.adafactor.relative_step:
            raise ValueError("train.adafactor.warmup_init needs train.adafactor.relative_step=true")
        return self

    @model_validator(mode="after")
    def _warmup_within_steps(self):
        if self.warmup_steps > self.steps:
            raise ValueError(f"train.warmup_steps = {self.warmup_steps} is larger than train.steps = {self.steps}: "
                             f"the lr would never reach train.lr; use at most {self.steps} (5-10% of steps is usual)")
        return self


class Sample(Section):
    prompts: str = "conf/prompts/smoke.txt"
    seeds: list[int] = Field([0, 1], min_length=1)
    steps: int = Field(4, ge=1)
    guidance: float = Field(3.5, ge=0)
    lora_scales: list[float] = Field([0.0, 0.5, 1.0], min_length=1)
    resolution: int = Field(64, ge=16, le=MAX_RESOLUTION)
    batch_size: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = Field(
        8, description="images per pipeline call; auto = the card class's (stages/models/memory.py)")
    adapter_step: Optional[Union[int, str]] = Field(
        None, description="render models/snapshots/step-<N> (train.save_every) instead of the final adapter; "
                          "best = the operating point's step (eval.grid); None = final")
    lora_scale: Optional[Union[float, str]] = Field(
        None, description="the LoRA scale evaluate's headline measures (added to lora_scales); "
                          "best = the operating point's scale (eval.grid); None = the largest of lora_scales")
    compile: Union[Literal["auto"], bool] = Field("auto", description="torch.compile the transformer's blocks; "
                                                  "auto = on a CUDA GPU, off on the CPU")
    base_cache: bool = Field(True, description="read/write the base images (scale 0) in the shared base-image "
                             "cache instead of rendering them in every experiment (stages/models/base_cache.py)")

    _resolution_16 = field_validator("resolution")(multiple_of_16)

    @field_validator("adapter_step", "lora_scale", mode="before")
    @classmethod
    def _number_or_best(cls, v, info):
        if v is None or v == "best":
            return v
        number = int if info.field_name == "adapter_step" else float
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (number is int and v != int(v)) or v <= 0:
            raise ValueError(f"must be {'a step >= 1' if number is int else 'a scale > 0'}, 'best' (the "
                             "operating point, eval.grid) or null")
        return number(v)


class Grid(Section):
    """The operating point (stages/operating_point.py): style vs content over snapshot step x LoRA scale
    on the first ``prompts`` prompts of sample.prompts and ``seeds``, at sample's steps/guidance/resolution.
    Cost: (steps) x len(scales) x prompts x len(seeds) LoRA images (smoke: 3 x 2 x 4 x 2 = 48 tiny ones;
    flux-dev: 3 x 2 x 5 x 1 = 30, about 2 minutes at 80 GiB against the sample stage's 9); the base images
    come from the cache."""
    enabled: bool = Field(True, description="render and measure the grid; false = operating_point.json says so")
    steps: Union[str, list[int]] = Field(
        "all", description="snapshot steps (train.save_every) to try; all = every saved one; the final "
                           "adapter (train.steps) is always in")
    scales: list[Annotated[float, Field(gt=0)]] = Field([0.5, 1.0], min_length=1)
    prompts: int = Field(4, ge=1, description="the first N prompts of sample.prompts")
    seeds: list[int] = Field([0, 1], min_length=1)
    content_min: float = Field(0.9, gt=0, description="least content kept: CLIP-score ratio to the base "
                               "(LoRA image's CLIP score / the same prompt and seed's base image's)")
    bootstrap: int = Field(1000, ge=100, description="bootstrap resamples of the (prompt, seed) pairs")

    @field_validator("steps", mode="before")
    @classmethod
    def _all_or_steps(cls, v):
        ok = v == "all" or (isinstance(v, list) and v and all(isinstance(s, int) and not isinstance(s, bool)
                                                              and s >= 1 for s in v))
        if not ok:
            raise ValueError("must be all (every train.save_every snapshot) or a non-empty list of steps >= 1, "
                             "e.g. [500, 1000]")
        return v


class Eval(Section):
    csd_weights: Optional[str] = None  # CSD checkpoint.pth; None = style similarity on CLIP embeddings
    csd_model: str = Field("ViT-L-14", description="open_clip architecture of the CSD backbone")
    kid_subset_size: int = Field(8, ge=2)
    fid_min_samples: int = Field(2048, ge=2)
    trait_size: int = Field(64, ge=16, description="side images are resized to for the trait metrics")
    ab_scale: Optional[float] = Field(None, gt=0, description="LoRA scale in the A/B page; None = largest")
    reference_cache: bool = Field(True, description="keep the held-out paintings' embeddings and traits in the "
                                  "shared stage cache instead of measuring them in every experiment "
                                  "(stages/metrics/refcache.py)")
    grid: Grid = Grid()


class Mlflow(Section):
    experiment: str = "flux-impressionism"
    registered_model: str = "flux-impressionism-lora"


class Params(Section):
    profile: str = "smoke"
    seed: int = Field(1234, ge=0, le=2**32 - 1, description="numpy and torch take seeds in 0..2**32-1")
    data: Data = Data()
    dedupe: Dedupe = Dedupe()
    clip: Clip = Clip()
    filter: Filter = Filter()
    caption: Caption = Caption()
    model: Model = Model()
    lora: Lora = Lora()
    train: Train = Train()
    sample: Sample = Sample()
    eval: Eval = Eval()
    mlflow: Mlflow = Mlflow()

    @model_validator(mode="after")
    def _grid_and_best(self):
        best = [k for k in ("adapter_step", "lora_scale") if getattr(self.sample, k) == "best"]
        if best and not self.eval.grid.enabled:
            raise ValueError(f"sample.{best[0]}=best reads the operating point, which eval.grid.enabled=false "
                             "does not compute: set eval.grid.enabled=true (or give a number)")
        g, t = self.eval.grid, self.train
        if g.enabled and g.steps != "all":  # the snapshots this training will leave (train.save_every, keep_last)
            saved = list(range(t.save_every, t.steps + 1, t.save_every)) if t.save_every else []
            kept = set(saved[-t.keep_last:] if t.keep_last else saved) | {t.steps}
            missing = sorted(set(g.steps) - kept)
            if missing:
                raise ValueError(f"eval.grid.steps {missing}: training keeps no adapter at these steps (kept: "
                                 f"{sorted(kept)} with train.save_every={t.save_every}, keep_last={t.keep_last}, "
                                 f"steps={t.steps}); use all or some of those")
        return self


class ParamsError(SystemExit):
    """Raised (as a clean exit with a message) when params.yaml does not fit the schema."""


RESTORE_HINT = ("If `dvc exp run -S ...` changed params.yaml, restore it with `git checkout params.yaml` "
                "(or `dvc exp run -S <key>=<old value>`). `dvc repro` and `dvc exp run` stop at the validate "
                "stage, before DVC removes any output; after `dvc repro -s <stage>`, `dvc checkout <stage>` "
                "brings its cached outputs back.")


def _lookup(raw, loc: tuple):
    value = raw
    for part in loc:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and -len(value) <= part < len(value):
            value = value[part]
        else:
            return "<missing>"
    return value


def _describe(err: dict, raw: dict) -> str:
    # drop pydantic's validator and union-member tags ("function-after[...]", "literal['auto']")
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (p.startswith("function-") or "[" in p)))
    key = ".".join(str(p) for p in loc)
    value = _lookup(raw, loc)
    if err["type"] == "extra_forbidden":
        return f"  {key}: unknown key (value {value!r}); check the spelling against conf/config.yaml"
    allowed = err.get("ctx", {}).get("expected")
    msg = err["msg"].removeprefix("Value error, ") + (f" (allowed: {allowed})" if allowed else "")
    if isinstance(value, dict):  # a check across keys of a section: the message names them
        return f"  {key}: {msg}" if key else f"  {msg}"
    return f"  {key} = {value!r}: {msg}"


def validate(raw: dict) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = list(dict.fromkeys(_describe(e, raw) for e in exc.errors()))
        raise ParamsError("invalid params.yaml:\n" + "\n".join(lines) + "\n" + RESTORE_HINT) from None


def read_yaml(path: Path) -> dict:
    """params.yaml as a dict; a YAML syntax error (a tab, say) becomes a message with line and column."""
    text = path.read_text()
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        tab = " — a tab: YAML indents with spaces only, replace it by spaces" if "\t" in line else ""
        raise ParamsError(f"{path} is not valid YAML{where}{tab}: {getattr(exc, 'problem', exc)}\n"
                          f"  {line!r}\n{RESTORE_HINT}") from None


def load(path: os.PathLike | str | None = None) -> Params:
    """Read and validate params.yaml (the repo's by default, or ``path``)."""
    path = Path(path) if path else Path.cwd() / "params.yaml"
    if not path.exists():
        path = PARAMS_FILE
    return validate(read_yaml(path))


CONF_HEADER = """\
# Defaults of every knob, generated from the schema in stages/core/params.py (`make params`).
# A profile (conf/profile/*.yaml) overrides them; DVC composes params.yaml from conf/
# (`dvc exp run -S profile=flux-dev -S lora.rank=32`). With Hydra on, `dvc exp run` rewrites
# params.yaml: change defaults in the schema or a profile, never in params.yaml by hand.
defaults:
  - _self_
  - profile: smoke   # applied after this file, so a profile overrides these defaults

"""


def compose_text(overrides: list[str] | None = None, conf_dir: Path | None = None) -> str:
    """The params.yaml text ``dvc exp run -S`` writes from conf/ (DVC's own composer and dumper)."""
    import tempfile

    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        compose_and_dump(out, str(conf_dir or ROOT / "conf"), None, "config", tmp, overrides or [])
        return out.read_text()


def compose(overrides: list[str] | None = None, conf_dir: Path | None = None) -> dict:
    """Compose conf/ the way ``dvc exp run -S`` does and return the dict."""
    return yaml.safe_load(compose_text(overrides, conf_dir))


def sync() -> None:
    """Regenerate conf/config.yaml from the schema defaults and params.yaml from conf/ (smoke)."""
    from stages.core.io import write_text

    defaults = Params().model_dump()
    defaults.pop("profile")
    write_text(ROOT / "conf" / "config.yaml", CONF_HEADER + yaml.safe_dump(defaults, sort_keys=False))
    text = compose_text()
    validate(yaml.safe_load(text))
    write_text(PARAMS_FILE, text)  # byte for byte what `dvc exp run` writes: no needless diff after one


if __name__ == "__main__":  # python -m stages.core.params [--sync | file]
    if sys.argv[1:] == ["--sync"]:
        sync()
    else:
        p = load(sys.argv[1] if len(sys.argv) > 1 else None)
        print(yaml.safe_dump(p.model_dump(), sort_keys=False))
