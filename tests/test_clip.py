"""stages.models.clip: the tiny random CLIP (seeded, offline), loading by path, the embedding cache,
zero-shot scores, and the real ViT-L-14 architecture built without a download."""
import types

import numpy as np
import pytest
import torch
from PIL import Image

from stages.models import clip


def params(**kw):
    base = dict(model="tiny", pretrained=None, batch_size=4)
    return types.SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return clip.load_clip(params(), device="cpu", seed=3)


def pictures(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 60, 3), dtype=np.uint8)) for i in range(n)]


def test_tiny_embeddings_are_normalised_batched_and_deterministic(tiny):
    ims = pictures(6)
    emb = tiny.embed_images(ims)  # batch_size 4: two batches
    assert emb.shape == (6, tiny.dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(tiny.embed_images(ims, batch_size=1), emb, atol=1e-5)
    again = clip.load_clip(params(), device="cpu", seed=3)
    np.testing.assert_allclose(again.embed_images(ims), emb, atol=1e-6)
    other = clip.load_clip(params(), device="cpu", seed=4)
    assert not np.allclose(other.embed_images(ims), emb, atol=1e-3)
    assert tiny.embed_images([]).shape == (0, tiny.dim)


def test_texts_and_zero_shot(tiny):
    txt = tiny.embed_texts(["a painting", "a photograph"])
    assert txt.shape == (2, tiny.dim)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    emb = tiny.embed_images(pictures(3))
    p = tiny.zero_shot(emb, ["a painting"], ["a photograph", "text"])
    assert p.shape == (3,) and np.all((p > 0) & (p < 1))
    # an image embedding equal to the positive prompt's text embedding must lean positive
    lean = tiny.zero_shot(txt[:1], ["a painting"], ["a photograph"])
    assert lean[0] > 0.5
    with pytest.raises(ValueError):
        tiny.zero_shot(emb, [], ["text"])


def test_tiny_loads_from_a_local_checkpoint(tiny, tmp_path):
    path = tmp_path / "tiny_clip.pt"
    torch.save(tiny.model.state_dict(), path)
    loaded = clip.load_clip(params(pretrained=str(path)), device="cpu", seed=99)  # seed ignored
    ims = pictures(2)
    np.testing.assert_allclose(loaded.embed_images(ims), tiny.embed_images(ims), atol=1e-6)
    assert str(path) in loaded.name


def test_embedding_cache_roundtrip(tmp_path):
    emb = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    path = clip.save_embeddings(tmp_path / "e.safetensors", ["a", "b", "c"], emb, "tiny/seed=1")
    ids, back, model = clip.load_embeddings(path)
    assert ids == ["a", "b", "c"] and model == "tiny/seed=1"
    # stored on the float16 grid (close to the input), so float32 noise of another machine's
    # kernels does not change the file's bytes
    np.testing.assert_array_equal(back, clip.on_float16_grid(emb))
    np.testing.assert_allclose(back, emb, rtol=1e-3)
    noisy = clip.save_embeddings(tmp_path / "n.safetensors", ["a", "b", "c"], emb * np.float32(1 + 2e-7), "tiny/seed=1")
    assert noisy.read_bytes() == path.read_bytes()
    with pytest.raises(ValueError):
        clip.save_embeddings(tmp_path / "bad.safetensors", ["a"], emb, "x")


@pytest.mark.slow
def test_vit_l_14_builds_without_download():
    """The real architecture (the aesthetic head's 768-d input) constructs offline, random weights."""
    model = clip.load_clip(params(model="ViT-L-14", pretrained=None, batch_size=1), device="cpu")
    assert model.dim == 768
    assert model.name == "ViT-L-14/random"
    assert model.preprocess.transforms[0].size in (224, (224, 224))
