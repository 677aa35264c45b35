"""The metrics vocabulary: one place that names every metric evaluate writes, with its label, the
way it is better and how it is printed. The report, the model card, the sweep summary, the
experiment table (``make exps``) and the notebook all read it, so a metric reads the same everywhere.

Keys are ``<family>_<set>`` (``style_centroid_lora``): the family says what is measured, the set on
what (``SETS``: held-out paintings, base samples, LoRA samples, LoRA - base, LoRA / base).

``HEADLINE`` is the handful of keys that go to ``reports/metrics.json`` (the DVC metrics file that
``dvc exp show`` reads); every other key (per-set values, deltas, each trait) goes to the details
file ``reports/eval/metrics_all.json``, which the report and the model card read.
"""
from __future__ import annotations

from dataclasses import dataclass

from stages.metrics import traits

# the set a key is about = its last ``_`` part; label of that column
SETS = {"holdout": "held-out paintings", "base": "base", "lora": "base + LoRA",
        "delta": "Δ (LoRA − base)", "ratio": "LoRA / base"}


@dataclass(frozen=True)
class Family:
    name: str            # key stem, e.g. "style_centroid"
    short: str           # a column header (experiment table, sweep summary)
    label: str           # what it measures, one line (report, model card, notebook)
    better: int = 1      # +1 higher is better, -1 lower is better, 0 no direction
    fmt: str = ".4g"     # format spec of a value

    @property
    def arrow(self) -> str:
        return {1: "↑", -1: "↓"}.get(self.better, "")


def _trait_families() -> list[Family]:
    """Per trait of ``traits.NAMES``: the set's mean (``trait_<t>``, its Impressionist direction) and
    its distance to the held-out mean in held-out standard deviations (``trait_<t>_dist``, lower =
    closer; evaluate compares the sets on this one)."""
    out = []
    for t in traits.NAMES:
        label = traits.LABELS.get(t, t.replace("_", " "))
        short = t.replace("_", " ")
        out += [Family(f"trait_{t}", short, f"trait: {label}", traits.DIRECTION.get(t, 0)),
                Family(f"trait_{t}_dist", f"{short} dist", f"trait distance to held-out (lower = closer): {label}",
                       -1)]
    return out


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("style_centroid", "style", "style: cosine to the held-out centroid", 1, ".4f"),
    Family("style_nn", "style NN", "style: cosine to the nearest held-out painting", 1, ".4f"),
    Family("clip_score", "CLIP", "prompt fidelity: CLIP score vs the content prompt", 1),
    Family("kid", "KID", "KID vs held-out paintings (lower = closer)", -1),
    Family("fid", "FID", "FID vs held-out paintings (lower = closer)", -1),
    Family("aesthetic", "aesthetic", "LAION aesthetic score", 1),
    Family("diversity", "diversity", "diversity: mean pairwise distance across seeds", 1),
    *_trait_families(),
    Family("op_step", "op step", "operating point: recommended snapshot step", 0, ".0f"),
    Family("op_scale", "op scale", "operating point: recommended LoRA scale", 0, ".3g"),
    Family("op_style", "op style", "operating point: style there (grid prompts; cosine to the held-out centroid)",
           1, ".4f"),
    Family("op_content", "op content", "operating point: content there (CLIP-score ratio to the base)", 1, ".3f"),
]}

# The headline: style, prompt fidelity, distance to the held-out paintings, and the traits' composite
# (traits.COMPOSITE: the LoRA samples' Impressionism score and its distance to the held-out one).
# Seven keys: with the experiment and a few changed params, `make exps` stays within 15 columns.
HEADLINE: tuple[str, ...] = (
    "style_centroid_lora", "style_nn_lora", "clip_score_lora", "clip_score_ratio", "kid_lora",
    f"trait_{traits.COMPOSITE}_lora", f"trait_{traits.COMPOSITE}_dist_lora",
)
# The operating point (stages/operating_point.py, when eval.grid ran): the recommended snapshot step and
# LoRA scale, with the grid's style and content there; in reports/metrics.json after the HEADLINE keys.
OPERATING_POINT: tuple[str, ...] = ("op_step", "op_scale", "op_style", "op_content")
# the metric `best-style` (MLflow alias) and the sweep default sort by
BEST_STYLE = "style_centroid_lora"


def split_key(key: str) -> tuple[str, str | None]:
    """``style_nn_lora`` -> (``style_nn``, ``lora``); a key without a known set -> (key, None)."""
    stem, _, last = key.rpartition("_")
    return (stem, last) if stem and last in SETS else (key, None)


def family(key: str) -> Family:
    """The family of a key (or a plain one named after it, for keys this module does not know)."""
    stem, _ = split_key(key)
    return FAMILIES.get(stem) or Family(stem, stem.replace("_", " "), stem.replace("_", " "), 0)


def header(key: str) -> str:
    """Short column header of a key: family, set when not the LoRA's own, direction arrow (a key
    the vocabulary does not know keeps its name)."""
    if split_key(key)[0] not in FAMILIES:
        return key
    fam, (_, s) = family(key), split_key(key)
    name = fam.short if s in (None, "lora") else f"{fam.short} {'Δ' if s == 'delta' else s}"
    return f"{name} {fam.arrow}".strip()


def fmt(key: str, value, missing: str = "—") -> str:
    """A value as the vocabulary prints it (4 significant digits, deltas signed; ``missing`` for None)."""
    if value is None or value == "":
        return missing
    if isinstance(value, (bool, int)) or not isinstance(value, float):
        return str(value)
    if value != value:  # NaN
        return "nan"
    _, s = split_key(key)
    spec = ".4g" if s == "ratio" else family(key).fmt
    return f"{value:+.4g}" if s == "delta" else f"{value:{spec}}"


def rows(metrics: dict) -> list[tuple[Family, dict]]:
    """Flat metrics -> [(family, {set: value})], families in vocabulary order, unknown ones after."""
    by: dict[str, dict] = {}
    for key, value in metrics.items():
        stem, s = split_key(key)
        if s is not None and stem != "n":
            by.setdefault(stem, {})[s] = value
    known = [f for f in FAMILIES if f in by]
    return [(family(f"{stem}_lora"), by[stem]) for stem in known + [s for s in by if s not in FAMILIES]]


def headline(metrics: dict) -> dict:
    """The ``HEADLINE`` keys of ``metrics`` that are present, in HEADLINE order, then the operating point's."""
    return {k: metrics[k] for k in HEADLINE + OPERATING_POINT if k in metrics}
