"""The training objective as the trainer computes it (stages.models.trainer.Trainer.loss), pinned
directly rather than through "the loss falls" (which any learnable target satisfies):

- a model that predicts the exact rectified-flow velocity ``ε - x0`` has loss 0, and the usual
  wrong targets (negated, x0 and noise swapped, timestep ×1000) have a large one;
- what the transformer receives: ``x_t = (1-σ)x0 + σε``, the timestep σ itself (in (0, 1)), the
  guidance ``train.guidance`` (FLUX.1-dev: 1.0), positional ids of the 2x2-packed latents;
- one ``Trainer.loss`` on the tiny model equals a float64 reference of the objective written
  here independently (own packing, ids, interpolation and MSE) to 1e-6.
"""
import copy

import pytest
import torch

from stages.core.params import Lora, Model, Train
from stages.models import flux
from stages.models.cache import Batch
from stages.models.trainer import Trainer
from tests import trainkit

B, C, H, W, L, D = 3, 4, 4, 6, 5, 32  # tiny Flux: 4 latent channels, T5/CLIP width 32


@pytest.fixture(scope="module")
def tiny_transformer(tmp_path_factory):
    """The tiny random Flux transformer (a fresh copy per test: the trainer adds a LoRA to it)."""
    torch.set_num_threads(1)
    with trainkit.tiny_cache(tmp_path_factory.getbasetemp() / "tiny-cache"):
        return flux.load_transformer(Model(base="tiny-random"), device="cpu")


def make_batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(latents=torch.randn(B, C, H, W, generator=g), prompt_embeds=torch.randn(B, L, D, generator=g),
                 pooled=torch.randn(B, D, generator=g), ids=[str(i) for i in range(B)])


def make_trainer(transformer, **train) -> Trainer:
    tp = Train(resolution=32, steps=2, warmup_steps=0, caption_dropout=0.0, **train)
    return Trainer(copy.deepcopy(transformer), Lora(rank=4), tp, seed=0, device="cpu")


def ref_pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, 4C): each 2x2 patch's channels, row-major over patches."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h // 2 * w // 2, c * 4)


def draws(seed: int, b: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """σ ~ U(0, 1) then ε ~ N(0, 1) from one generator (train.sigma_sampling=uniform, no caption dropout)."""
    g = torch.Generator().manual_seed(seed)
    sigma = torch.rand(b, generator=g).clamp(1e-4, 1 - 1e-4)
    return sigma, torch.randn(shape, generator=g)


class Oracle(torch.nn.Module):
    """A fake transformer that knows x0 and answers with the velocity its inputs imply,
    ``(x_t - x0) / t`` = ``ε - x0`` exactly when x_t and t are what the objective says; records
    its inputs. ``wrong`` plants a wrong target: the loss must then be large."""

    def __init__(self, x0: torch.Tensor, wrong: str = ""):
        super().__init__()
        self.x0, self.wrong, self.seen = x0, wrong, {}
        self.config = {"guidance_embeds": True}

    def forward(self, **kw):
        self.seen = kw
        t = kw["timestep"].double().view(-1, 1, 1)
        v = (kw["hidden_states"].double() - self.x0.double()) / t
        if self.wrong == "negated":
            v = -v
        elif self.wrong == "timestep_x1000":  # a model that reads t on diffusers' 0-1000 scale
            v = v / 1000
        return (v.float(),)


def oracle_loss(tiny_transformer, wrong: str = "", seed: int = 7):
    trainer = make_trainer(tiny_transformer, sigma_sampling="uniform")
    batch = make_batch()
    oracle = Oracle(ref_pack(batch.latents), wrong)
    trainer.model = oracle
    loss = trainer.loss(batch, torch.Generator().manual_seed(seed))
    return float(loss), oracle.seen, batch


def test_the_exact_velocity_has_zero_loss_and_the_model_gets_x_t_sigma_and_guidance_1(tiny_transformer):
    loss, seen, batch = oracle_loss(tiny_transformer)
    assert loss < 1e-9, loss
    x0 = ref_pack(batch.latents)
    sigma, eps = draws(7, B, x0.shape)
    s = sigma.view(-1, 1, 1)
    assert torch.allclose(seen["timestep"], sigma, atol=0, rtol=0)  # σ itself, in (0, 1), not ×1000
    assert 0 < seen["timestep"].min() and seen["timestep"].max() < 1
    assert torch.allclose(seen["hidden_states"], (1 - s) * x0 + s * eps, atol=1e-6)
    assert torch.equal(seen["guidance"], torch.ones(B))  # FLUX.1-dev trains with guidance 1.0
    assert torch.equal(seen["encoder_hidden_states"], batch.prompt_embeds)
    assert torch.equal(seen["pooled_projections"], batch.pooled)
    ids = torch.tensor([[0, i, j] for i in range(H // 2) for j in range(W // 2)], dtype=torch.float32)
    assert torch.equal(seen["img_ids"], ids) and torch.equal(seen["txt_ids"], torch.zeros(L, 3))


def test_guidance_follows_train_guidance(tiny_transformer):
    trainer = make_trainer(tiny_transformer, sigma_sampling="uniform", guidance=3.5)
    batch = make_batch()
    trainer.model = oracle = Oracle(ref_pack(batch.latents))
    trainer.loss(batch, torch.Generator().manual_seed(0))
    assert torch.equal(oracle.seen["guidance"], torch.full((B,), 3.5))


@pytest.mark.parametrize("wrong", ["negated", "timestep_x1000"])
def test_wrong_predictions_have_a_large_loss(tiny_transformer, wrong):
    loss, _, _ = oracle_loss(tiny_transformer, wrong)
    assert loss > 0.5, (wrong, loss)  # E|ε - x0|² ≈ 2 for unit-variance latents


@pytest.mark.parametrize("bug", ["negated_target", "x0_noise_swapped"])
def test_a_wrong_objective_in_the_trainer_gives_the_exact_velocity_a_large_loss(tiny_transformer, monkeypatch,
                                                                             bug):
    """The zero-loss test above tells these bugs apart (planted here through the flow module the
    trainer calls)."""
    from stages.models import flow

    real = flow.noisy_and_target
    if bug == "negated_target":
        monkeypatch.setattr(flow, "noisy_and_target", lambda x0, eps, s: (real(x0, eps, s)[0], -real(x0, eps, s)[1]))
    else:
        monkeypatch.setattr(flow, "noisy_and_target", lambda x0, eps, s: real(eps, x0, s))
    loss, _, _ = oracle_loss(tiny_transformer)
    assert loss > 0.5, (bug, loss)


def reference_loss(transformer, batch: Batch, seed: int, guidance: float = 1.0) -> float:
    """The rectified-flow objective in float64, from the definitions: x_t = (1-σ)x0 + σε, the model
    gets x_t, the timestep σ and the guidance, and is regressed onto ε - x0 (MSE)."""
    model = copy.deepcopy(transformer).double()
    x0 = ref_pack(batch.latents.double())
    sigma, eps = draws(seed, B, x0.shape)
    sigma, eps = sigma.double(), eps.double()
    s = sigma.view(-1, 1, 1)
    xt, target = (1 - s) * x0 + s * eps, eps - x0
    ids = torch.tensor([[0, i, j] for i in range(H // 2) for j in range(W // 2)], dtype=torch.float64)
    with torch.no_grad():
        pred = model(hidden_states=xt, encoder_hidden_states=batch.prompt_embeds.double(),
                     pooled_projections=batch.pooled.double(), timestep=sigma, img_ids=ids,
                     txt_ids=torch.zeros(L, 3, dtype=torch.float64),
                     guidance=torch.full((B,), guidance, dtype=torch.float64), return_dict=False)[0]
    return float(((pred - target) ** 2).mean())


def test_one_trainer_loss_equals_a_float64_reference_on_the_tiny_model(tiny_transformer):
    trainer = make_trainer(tiny_transformer, sigma_sampling="uniform")
    batch = make_batch(3)
    with torch.no_grad():
        got = float(trainer.loss(batch, torch.Generator().manual_seed(11)))
    want = reference_loss(tiny_transformer, batch, 11)  # a fresh LoRA is a no-op (B = 0): the base model
    assert abs(got - want) < 1e-6, (got, want)
    assert want > 0.1  # not trivially zero: the random tiny model is far from the velocity
