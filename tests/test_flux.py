"""The base-model loader: tiny-random builds deterministically, reloads by path with identical
weights through the same from_pretrained code as FLUX.1-dev, and generates images."""
import pytest
import torch
from safetensors.torch import load_file

from stages.core.params import Model
from stages.models import flux


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return flux.build_tiny_random(tmp_path_factory.mktemp("tiny") / "flux")


def test_build_is_deterministic(tiny, tmp_path):
    again = flux.build_tiny_random(tmp_path / "again")
    for comp in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        files = sorted((tiny / comp).glob("*.safetensors"))
        assert files, comp
        for f in files:
            a, b = load_file(f), load_file(again / comp / f.name)
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), comp


def test_reload_by_path_gives_identical_weights(tiny):
    pipe = flux.load_pipeline(Model(base=str(tiny)), device="cpu")
    saved = load_file(next((tiny / "transformer").glob("*.safetensors")))
    loaded = pipe.transformer.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    cfg = pipe.transformer.config
    assert cfg.guidance_embeds and cfg.in_channels == 4 * pipe.vae.config.latent_channels
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    assert cfg.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert cfg.pooled_projection_dim == pipe.text_encoder.config.hidden_size


def test_tiny_pipeline_generates_right_size(tiny):
    pipe = flux.load_pipeline(Model(base=str(tiny)), device="cpu")
    out = pipe("a river at dawn", num_inference_steps=2, height=48, width=80, guidance_scale=3.5,
               generator=torch.Generator().manual_seed(0), max_sequence_length=32)
    assert out.images[0].size == (80, 48)


def test_resolve_base(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXIMP_CACHE", str(tmp_path))
    path = flux.resolve_base(Model(base="tiny-random"))
    assert (tmp_path / f"tiny-random-flux-v{flux.TINY_VERSION}" / "model_index.json").exists()
    assert flux.resolve_base(Model(base="tiny-random")) == path  # built once, then reused
    assert flux.resolve_base(Model(base="black-forest-labs/FLUX.1-dev")) == "black-forest-labs/FLUX.1-dev"
    with pytest.raises(flux.ModelLoadError, match="no model_index.json"):
        flux.resolve_base(Model(base=str(tmp_path)))


def test_offline_hub_model_fails_fast_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(flux.ModelLoadError, match="FLUX.1-dev.*not in the local Hugging Face cache"):
        flux.load_pipeline(Model(base="black-forest-labs/FLUX.1-dev", revision="abc"), device="cpu")


def test_memory_estimate_refuses_too_big(tiny, monkeypatch):
    monkeypatch.setattr(flux, "available_bytes", lambda device: 1000)
    with pytest.raises(flux.ModelLoadError, match="not enough CPU memory.*quantization=none"):
        flux.load_transformer(Model(base=str(tiny)), device="cpu")
    sizes = flux.component_bytes(str(tiny), None, ["transformer"])
    assert sizes["transformer"] > 0
