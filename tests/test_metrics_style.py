"""Style similarity, diversity, CLIP score, KID/FID and the CSD loader on known inputs."""
import numpy as np
import pytest
import torch
from PIL import Image

from stages.metrics import fidelity, style


def unit(x):
    x = np.asarray(x, float)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_centroid_and_nearest_neighbour_cosine():
    ref = unit([[1, 0, 0], [0, 1, 0]])
    same_dir = unit([[1, 1, 0]])
    assert style.centroid_cosine(same_dir, ref) == pytest.approx(1.0)
    assert style.centroid_cosine(unit([[0, 0, 1]]), ref) == pytest.approx(0.0)
    assert style.nn_cosine(unit([[1, 0, 0], [0, 0, 1]]), ref) == pytest.approx(0.5)
    # leave-one-out: each reference vector against the others only
    assert style.nn_cosine(ref, ref, leave_one_out=True) == pytest.approx(0.0)
    assert style.centroid_cosine(ref, ref, leave_one_out=True) == pytest.approx(0.0)
    assert np.isnan(style.centroid_cosine(np.zeros((0, 3)), ref))


def test_diversity_within_groups():
    e = unit([[1, 0], [1, 0], [1, 0], [0, 1]])
    assert style.diversity(e, ["a", "a", "b", "b"]) == pytest.approx(0.5)  # (0 + 1) / 2
    assert style.diversity(e[:2]) == pytest.approx(0.0)
    assert np.isnan(style.diversity(e[:2], ["a", "b"]))
    with pytest.raises(ValueError):
        style.diversity(e, ["a"])


def test_clip_score_definition():
    img = unit([[1, 0], [1, 0]])
    txt = unit([[1, 1], [-1, 0]])
    assert fidelity.clip_score(img, txt) == pytest.approx(100 * (np.sqrt(0.5) + 0) / 2)
    with pytest.raises(ValueError):
        fidelity.clip_score(img, txt[:1])


def test_kid_and_fid_rank_distributions():
    rng = np.random.default_rng(0)
    real, same, shifted = (rng.normal(size=(48, 8)) for _ in range(3))
    shifted += 1.5
    k_same, _, size = fidelity.kid(real, same, subset_size=16, subsets=10)
    k_far, _, _ = fidelity.kid(real, shifted, subset_size=16, subsets=10)
    assert size == 16 and k_far > 10 * abs(k_same)
    assert fidelity.kid(real, same, 16, 5) == fidelity.kid(real, same, 16, 5)  # seeded
    assert fidelity.kid(real[:5], same, 16, 5)[2] == 5  # subset clipped to the smaller set
    assert fidelity.fid(real, real) == pytest.approx(0.0, abs=1e-6)
    assert fidelity.fid(real, shifted) > fidelity.fid(real, same)


def test_csd_checkpoint_loads_style_projection(tmp_path):
    from stages.metrics.csd import load_csd
    from stages.models import clip as clip_mod

    import open_clip as oc

    clip_mod._register_tiny(oc)
    torch.manual_seed(0)
    model, _, preprocess = oc.create_model_and_transforms(clip_mod.TINY_NAME, pretrained=None,
                                                          force_quick_gelu=True)
    visual = model.visual.eval()
    style_proj = torch.randn(visual.proj.shape[0], 24)
    state = {f"module.backbone.{k}": v for k, v in visual.state_dict().items() if k != "proj"}
    state["module.last_layer_style"] = style_proj
    state["module.last_layer_content"] = torch.randn_like(style_proj)
    torch.save({"model_state_dict": state}, tmp_path / "checkpoint.pth")

    csd = load_csd(tmp_path / "checkpoint.pth", arch="tiny")
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    got = csd.embed_images([img])
    visual.proj = None
    with torch.no_grad():
        want = torch.nn.functional.normalize(visual(preprocess(img)[None]) @ style_proj, dim=-1)
    assert got.shape == (1, 24)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)

    torch.save({"model_state_dict": {"backbone.x": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a CSD checkpoint"):
        load_csd(tmp_path / "bad.pth", arch="tiny")
