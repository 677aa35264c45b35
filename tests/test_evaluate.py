"""evaluate stage end to end on the smoke profile (samples from tests/samplekit.py's project, a
held-out set of constructed stroke paintings), plus the embedding-cache reuse rule."""
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from stages import evaluate
from stages.core import images, params, shards
from stages.core.paths import Evaluate
from stages.metrics import reference, traits, vocab
from tests.samplekit import PROMPTS
from tests.stagerun import run_stage, write_params

ROOT = Path(params.ROOT)
SETS = ("holdout", "base", "lora")


def stroke_painting(seed: int, side: int = 96) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (side, side), tuple(int(x) for x in rng.integers(160, 250, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(250):
        x, y = rng.uniform(0, side, 2)
        a = rng.uniform(0, np.pi)
        # light tints (colours mixed with white), not saturated primaries with hard edges
        draw.line([(x, y), (x + 5 * np.cos(a), y + 5 * np.sin(a))], width=2,
                  fill=tuple(int(v) for v in rng.integers(96, 255, 3)))
    return img


def write_holdout(root: Path, n: int = 10) -> list[str]:
    rows = []
    for i in range(n):
        data = images.encode_png(stroke_painting(i))
        rows.append({"id": shards.content_id(data), "image": data, "format": "PNG", "width": 96,
                     "height": 96, "caption": "a painting, impressionism style"})
    rows.append({"id": "broken", "image": b"not an image", "format": "PNG"})  # skipped, logged
    shards.write_shards(rows, root / "data/curated/holdout", shard_rows=4)
    return [r["id"] for r in rows[:-1]]


@pytest.fixture(scope="module")
def evaluated(sampled):
    write_holdout(sampled)
    run_stage(evaluate.main, sampled)
    return sampled


@pytest.mark.slow
def test_metrics_json_has_every_family_for_every_set(evaluated):
    m = json.loads((evaluated / "reports/eval/metrics_all.json").read_text())
    # the DVC metrics file holds the headline only, with the same values
    assert json.loads((evaluated / "reports/metrics.json").read_text()) == vocab.headline(m)
    assert list(vocab.headline(m)) == list(vocab.HEADLINE)
    assert (m["n_holdout"], m["n_base"], m["n_lora"], m["lora_scale"]) == (10, 4, 4, 1.0)
    stems = ["style_centroid", "style_nn", "aesthetic", "diversity"]
    for stem in stems:
        for s in SETS + ("delta",):
            assert isinstance(m[f"{stem}_{s}"], float), f"{stem}_{s}"
        assert m[f"{stem}_delta"] == pytest.approx(m[f"{stem}_lora"] - m[f"{stem}_base"], abs=2e-6)
    for t in traits.NAMES:  # traits: set means, and distances to the held-out set (closer is better)
        assert all(isinstance(m[f"trait_{t}_{s}"], float) for s in SETS)
        assert f"trait_{t}_delta" not in m  # a raw trait difference would reward overshooting
        for s in ("base", "lora"):
            assert m[f"trait_{t}_dist_{s}"] >= 0.0
        assert m[f"trait_{t}_dist_delta"] == pytest.approx(
            m[f"trait_{t}_dist_lora"] - m[f"trait_{t}_dist_base"], abs=2e-6)
    assert m["clip_score_delta"] == pytest.approx(m["clip_score_lora"] - m["clip_score_base"], abs=2e-6)
    for stem in ("clip_score", "kid"):
        assert isinstance(m[f"{stem}_base"], float) and isinstance(m[f"{stem}_lora"], float)
    if m["clip_score_base"] > 0:  # a random CLIP can score 0 (cosines clamp at 0): ratio is then null
        assert m["clip_score_ratio"] == pytest.approx(m["clip_score_lora"] / m["clip_score_base"], rel=1e-4)
    else:
        assert m["clip_score_ratio"] is None
    assert not any(k.startswith("fid_") for k in m)  # too few images: omitted, with a note
    assert all(v is None or np.isfinite(v) for v in m.values())
    # the constructed held-out strokes (short dabs on a light ground) vs tiny-random's samples
    assert m["trait_stroke_isotropy_holdout"] > m["trait_stroke_isotropy_base"]
    # The composite (a texture model frozen at 256 px on real paintings) is not asked to rank these
    # 96-px constructed strokes above tiny-random's noise-like samples at the smoke size (it does not:
    # 0.55 vs 0.61); its ranking is tested in test_metrics_traits.py. Here: every reported trait's
    # held-out value is exactly the mean of traits.image_traits over the held-out paintings.
    size = params.load(evaluated / "params.yaml").eval.trait_size
    direct = traits.mean_traits([stroke_painting(i) for i in range(10)], size)
    for t in traits.NAMES:
        assert m[f"trait_{t}_holdout"] == pytest.approx(direct[t], abs=1e-6)
    assert -1 <= m["style_centroid_base"] <= 1
    details = json.loads((evaluated / "reports/eval/details.json").read_text())
    assert any(n.startswith("FID omitted") for n in details["notes"])
    assert len(details["images"]) == 2 * 2 * 3 and len(details["holdout_ids"]) == 10


@pytest.mark.slow
def test_plots_ab_page_and_report(evaluated):
    with open(evaluated / "reports/plots/traits.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(traits.NAMES) * 3
    assert all(float(r["relative_to_holdout"]) == pytest.approx(1.0) for r in rows if r["set"] == "holdout"
               and r["relative_to_holdout"])
    with open(evaluated / "reports/plots/sweep.csv") as fh:
        sweep = list(csv.DictReader(fh))
    assert [float(r["scale"]) for r in sweep] == [0.0, 0.5, 1.0] and "style_centroid" in sweep[0]
    assert Image.open(evaluated / "reports/eval/traits.png").size[0] > 500
    key = json.loads((evaluated / "reports/eval/abtest-key.json").read_text())
    assert len(key["pairs"]) == len(PROMPTS) * 2
    assert (evaluated / "reports/eval/abtest/index.html").exists()
    page = (evaluated / "reports/report.html").read_text()
    targets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert "samples/grids/seed-0.png" in targets and "eval/traits.png" in targets
    for t in targets:
        assert (evaluated / "reports" / t).exists(), t


def test_dvc_yaml_declares_what_evaluate_writes():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
    metrics = [next(iter(o)) for o in stage["metrics"]]
    plots = [next(iter(o)) for o in stage["plots"]]
    where = Evaluate()
    assert str(where.eval) in outs and str(where.report) in outs
    assert metrics == [str(where.metrics)]
    assert sorted(plots) == sorted(str(where.plots / f) for f in ("traits.csv", "sweep.csv"))
    assert {"eval", "clip", "seed", "filter.aesthetic.head"} <= set(stage["params"])


def test_holdout_embeddings_reused_only_for_the_same_model(tmp_path):
    from stages.models.clip import save_embeddings

    class FakeClip:
        name = "tiny/seed=1"

        def embed_images(self, imgs):
            return np.full((len(imgs), 3), 7.0, np.float32)

    emb = np.eye(3, dtype=np.float32)
    cache = save_embeddings(tmp_path / Evaluate().embeddings.name, ["a", "b", "c"], emb, "tiny/seed=1")
    got = reference.holdout_clip_embeddings(FakeClip(), ["c", "a"], [None, None], cache)
    np.testing.assert_array_equal(got, emb[[2, 0]])
    FakeClip.name = "ViT-L-14/openai"  # another model: re-embed
    assert reference.holdout_clip_embeddings(FakeClip(), ["c", "a"], [None, None], cache)[0, 0] == 7.0
    FakeClip.name = "tiny/seed=1"  # an id the cache lacks: re-embed
    assert reference.holdout_clip_embeddings(FakeClip(), ["z"], [None], cache)[0, 0] == 7.0


@pytest.mark.slow
def test_csd_weights_switch_the_style_embeddings(evaluated, tmp_path):
    """With eval.csd_weights the style metrics use the CSD encoder (here a tiny random one)."""
    import torch

    from stages.models import clip as clip_mod

    import open_clip as oc

    clip_mod._register_tiny(oc)
    torch.manual_seed(3)
    visual = oc.create_model(clip_mod.TINY_NAME, pretrained=None, force_quick_gelu=True).visual
    state = {f"backbone.{k}": v for k, v in visual.state_dict().items() if k != "proj"}
    state["last_layer_style"] = torch.randn(visual.proj.shape[0], 16)
    torch.save({"model_state_dict": state}, tmp_path / "csd.pth")
    before = json.loads((evaluated / "reports/eval/metrics_all.json").read_text())
    raw = yaml.safe_load((evaluated / "params.yaml").read_text())
    saved = yaml.safe_dump(raw)
    raw["eval"].update(csd_weights=str(tmp_path / "csd.pth"), csd_model="tiny")
    (evaluated / "params.yaml").write_text(yaml.safe_dump(raw))
    try:
        run_stage(evaluate.main, evaluated)
    finally:
        (evaluated / "params.yaml").write_text(saved)
    after = json.loads((evaluated / "reports/eval/metrics_all.json").read_text())
    notes = json.loads((evaluated / "reports/eval/details.json").read_text())["notes"]
    assert notes[0] == "style embeddings: csd/csd.pth"
    assert after["style_centroid_lora"] != before["style_centroid_lora"]
    assert after["kid_lora"] != before["kid_lora"]
    # CLIP-based metrics do not depend on the style encoder
    assert after["clip_score_lora"] == before["clip_score_lora"]
    assert after["trait_impressionism_lora"] == before["trait_impressionism_lora"]


def test_missing_samples_is_a_clear_error(tmp_path, monkeypatch):
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="run the sample stage first"):
        evaluate.main()
