"""The metrics vocabulary (stages.metrics.vocab) pinned: which way each metric is better, the
headers' arrows, the formatting, and `make exps` (stages.experiments) sorting the best run first."""
import math

import pytest

from stages import experiments
from stages.metrics import traits, vocab

# which way is better, per family: a flipped sign would sort the worst run first and show ↑ for a distance
BETTER = {"style_centroid": 1, "style_nn": 1, "clip_score": 1, "kid": -1, "fid": -1, "aesthetic": 1, "diversity": 1,
          # the operating point (stages/operating_point.py): style and content there are better higher; its
          # step and scale are where, not how good (no direction)
          "op_style": 1, "op_content": 1, "op_step": 0, "op_scale": 0}


def test_the_direction_of_every_family():
    for t in traits.NAMES:
        BETTER[f"trait_{t}"] = traits.DIRECTION.get(t, 0)
        BETTER[f"trait_{t}_dist"] = -1  # a distance to the held-out paintings: lower = closer
    assert {name: f.better for name, f in vocab.FAMILIES.items()} == BETTER
    assert traits.DIRECTION[traits.COMPOSITE] == 1 and "trait_impressionism_dist" in vocab.FAMILIES


@pytest.mark.parametrize("key,head", [
    ("kid_lora", "KID ↓"), ("fid_lora", "FID ↓"), ("style_centroid_lora", "style ↑"), ("style_nn_base", "style NN base ↑"),
    ("clip_score_ratio", "CLIP ratio ↑"), ("kid_delta", "KID Δ ↓"), ("aesthetic_holdout", "aesthetic holdout ↑"),
    ("trait_impressionism_lora", "impressionism ↑"), ("trait_impressionism_dist_lora", "impressionism dist ↓"),
    ("trait_stroke_isotropy_dist_delta", "stroke isotropy dist Δ ↓"), ("unknown_metric_lora", "unknown_metric_lora"),
])
def test_headers_show_the_right_arrow(key, head):
    assert vocab.header(key) == head


def test_every_dist_metric_is_lower_is_better_with_a_down_arrow():
    dists = [f for name, f in vocab.FAMILIES.items() if name.endswith("_dist")]
    assert len(dists) == len(traits.NAMES)
    assert all(f.better == -1 and f.arrow == "↓" and vocab.header(f"{f.name}_lora").endswith("↓") for f in dists)


def test_keys_split_into_family_and_set():
    assert vocab.split_key("style_nn_lora") == ("style_nn", "lora")
    assert vocab.split_key("trait_impressionism_dist_holdout") == ("trait_impressionism_dist", "holdout")
    assert vocab.split_key("lora_scale") == ("lora_scale", None) and vocab.split_key("fid") == ("fid", None)
    assert vocab.family("n_lora").better == 0 and vocab.family("mystery_lora").arrow == ""


@pytest.mark.parametrize("key,value,text", [
    ("style_centroid_lora", 0.123456, "0.1235"), ("kid_lora", 0.0012345, "0.001234"), ("kid_delta", 0.5, "+0.5"),
    ("kid_delta", -0.25, "-0.25"), ("style_centroid_ratio", 1.23456, "1.235"), ("kid_lora", None, "—"),
    ("kid_lora", "", "—"), ("kid_lora", math.nan, "nan"), ("n_lora", 12, "12"), ("x_lora", True, "True"),
])
def test_values_print_the_same_everywhere(key, value, text):
    assert vocab.fmt(key, value) == text


def test_rows_group_sets_in_vocabulary_order_and_headline_keeps_its_order():
    metrics = {"mystery_lora": 1.0, "kid_base": 0.2, "style_centroid_lora": 0.8, "kid_lora": 0.1, "n_lora": 4,
               "style_centroid_delta": 0.05, "lora_scale": 1.0}
    out = vocab.rows(metrics)
    assert [(f.name, sets) for f, sets in out] == [
        ("style_centroid", {"lora": 0.8, "delta": 0.05}), ("kid", {"base": 0.2, "lora": 0.1}),
        ("mystery", {"lora": 1.0})]
    assert list(vocab.headline({"kid_lora": 1, "style_centroid_lora": 2, "other": 3})) == ["style_centroid_lora",
                                                                                            "kid_lora"]
    assert len(vocab.HEADLINE) == 7 and vocab.BEST_STYLE in vocab.HEADLINE


@pytest.mark.parametrize("sort,order", [
    ("trait_impressionism_dist_lora", ["near", "mid", "far", "none"]),  # lower = better: the closest first
    ("kid_lora", ["near", "mid", "far", "none"]),
    ("style_centroid_lora", ["far", "mid", "near", "none"]),  # higher = better
])
def test_make_exps_sorts_the_best_run_first(sort, order):
    rows = [{"Experiment": "mid", "trait_impressionism_dist_lora": 0.5, "kid_lora": 0.05, "style_centroid_lora": 0.5},
            {"Experiment": "none", "trait_impressionism_dist_lora": None, "kid_lora": None, "style_centroid_lora": None},
            {"Experiment": "far", "trait_impressionism_dist_lora": 2.0, "kid_lora": 0.2, "style_centroid_lora": 0.9},
            {"Experiment": "near", "trait_impressionism_dist_lora": 0.1, "kid_lora": 0.01, "style_centroid_lora": 0.1}]
    header, cells, _ = experiments.table(rows, set(), sort=sort)
    assert [c[0] for c in cells] == order
    assert "impressionism dist ↓" in header and "KID ↓" in header and "style ↑" in header


# the vocabulary's words: what the report, the model card, `make exps` and the notebook print
TABLE = [
    ("style_centroid", "style", "style: cosine to the held-out centroid", 1, ".4f"),
    ("style_nn", "style NN", "style: cosine to the nearest held-out painting", 1, ".4f"),
    ("clip_score", "CLIP", "prompt fidelity: CLIP score vs the content prompt", 1, ".4g"),
    ("kid", "KID", "KID vs held-out paintings (lower = closer)", -1, ".4g"),
    ("fid", "FID", "FID vs held-out paintings (lower = closer)", -1, ".4g"),
    ("aesthetic", "aesthetic", "LAION aesthetic score", 1, ".4g"),
    ("diversity", "diversity", "diversity: mean pairwise distance across seeds", 1, ".4g"),
]


def test_the_vocabulary_words():
    fams = [(f.name, f.short, f.label, f.better, f.fmt) for f in vocab.FAMILIES.values()]
    assert fams[:len(TABLE)] == TABLE
    for t in traits.NAMES:  # each trait: its own label (stages.metrics.traits), and its distance
        label, short = traits.LABELS[t], t.replace("_", " ")
        f, d = vocab.FAMILIES[f"trait_{t}"], vocab.FAMILIES[f"trait_{t}_dist"]
        assert (f.short, f.label, f.fmt) == (short, f"trait: {label}", ".4g")
        assert (d.short, d.label) == (f"{short} dist", f"trait distance to held-out (lower = closer): {label}")
    assert vocab.SETS == {"holdout": "held-out paintings", "base": "base", "lora": "base + LoRA",
                          "delta": "Δ (LoRA − base)", "ratio": "LoRA / base"}


def test_a_trait_without_a_label_or_direction_gets_its_name_and_none(monkeypatch):
    monkeypatch.setattr(traits, "NAMES", ("wet_paint",))
    f, d = vocab._trait_families()
    assert (f.name, f.short, f.label, f.better) == ("trait_wet_paint", "wet paint", "trait: wet paint", 0)
    assert (d.name, d.short, d.better) == ("trait_wet_paint_dist", "wet paint dist", -1)


def test_a_family_is_a_frozen_value_higher_is_better_by_default():
    import dataclasses

    f = vocab.Family("x", "x", "x")
    assert (f.better, f.fmt, f.arrow) == (1, ".4g", "↑") and vocab.Family("x", "x", "x", 0).arrow == ""
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.better = -1


def test_the_headline_keys_and_unknown_families():
    assert vocab.HEADLINE == ("style_centroid_lora", "style_nn_lora", "clip_score_lora", "clip_score_ratio", "kid_lora",
                              "trait_impressionism_lora", "trait_impressionism_dist_lora")
    f = vocab.family("wet_paint_share_lora")
    assert (f.name, f.short, f.label, f.better) == ("wet_paint_share", "wet paint share", "wet paint share", 0)
    assert vocab.fmt("kid_lora", "n/a") == "n/a" and vocab.fmt("kid_lora", 3) == "3"
