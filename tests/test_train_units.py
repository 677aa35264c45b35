"""Flow-matching maths, σ samplers, aspect buckets and the seeded batch plan."""

import pytest
import torch

from stages.models import cache, flow


def test_pack_unpack_shapes_and_inverse():
    lat = torch.randn(2, 16, 12, 8)  # (B, C, H/8, W/8) for a 96x64 image
    tokens = flow.pack(lat)
    assert tokens.shape == (2, 6 * 4, 64)
    assert torch.equal(flow.unpack(tokens, 96, 64), lat)
    ids = flow.image_ids(12, 8)
    assert ids.shape == (24, 3) and ids[:, 1].max() == 5 and ids[:, 2].max() == 3
    assert flow.text_ids(7).shape == (7, 3)


def test_flow_matching_target():
    x0, noise = torch.randn(3, 10, 64), torch.randn(3, 10, 64)
    sigmas = torch.tensor([0.0, 0.5, 1.0])
    xt, target = flow.noisy_and_target(x0, noise, sigmas)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], noise[2])
    assert torch.allclose(xt[1], 0.5 * (x0[1] + noise[1]))
    assert torch.allclose(target, noise - x0)
    # the exact velocity makes the loss zero; moving along it from x_t reaches noise at σ=1
    assert flow.flow_loss(target, target) == 0
    assert torch.allclose(xt[1] + 0.5 * target[1], noise[1], atol=1e-6)


@pytest.mark.parametrize("mode", ["uniform", "logit_normal", "shift"])
def test_sigma_samplers_range(mode):
    s = flow.sample_sigmas(20000, mode, generator=torch.Generator().manual_seed(0), shift=3.0)
    assert s.shape == (20000,) and s.dtype == torch.float32
    assert 0 < s.min() and s.max() < 1
    if mode == "uniform":
        assert abs(s.mean() - 0.5) < 0.02 and s.min() < 0.01 and s.max() > 0.99
    if mode == "logit_normal":
        assert abs(s.median() - 0.5) < 0.02 and ((s > 0.1) & (s < 0.9)).float().mean() > 0.9
    if mode == "shift":  # shifted towards noise: median sigmoid(0)=0.5 -> 3*0.5/(1+2*0.5) = 0.75
        assert abs(s.median() - 0.75) < 0.02
    with pytest.raises(ValueError, match=r"^unknown sigma sampling 'cosine' \(uniform \| logit_normal \| shift\)$"):
        flow.sample_sigmas(2, "cosine")


@pytest.mark.parametrize("mode", ["logit_normal", "shift"])
def test_sigma_samplers_equal_their_formulas(mode):
    """σ = sigmoid(N(0,1)·std + mean), then s·σ / (1 + (s-1)·σ) for ``shift``, clamped to [1e-4, 1-1e-4]."""
    got = flow.sample_sigmas(4000, mode, generator=torch.Generator().manual_seed(1), logit_mean=0.5, logit_std=2.0,
                             shift=2.5)
    s = torch.sigmoid(torch.randn(4000, generator=torch.Generator().manual_seed(1)) * 2.0 + 0.5)
    if mode == "shift":
        s = 2.5 * s / (1 + 1.5 * s)
    assert torch.allclose(got, s.clamp(1e-4, 1 - 1e-4), atol=1e-7, rtol=0)


def test_same_seed_same_sigmas():
    a = flow.sample_sigmas(5, "shift", generator=torch.Generator().manual_seed(3))
    b = flow.sample_sigmas(5, "shift", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("res", [64, 512, 1024])
def test_buckets_near_resolution_divisible_by_16(res):
    bs = cache.buckets(res)
    assert (res // 16 * 16, res // 16 * 16) in bs and len(bs) == len(set(bs)) >= 5
    for w, h in bs:
        assert w % 16 == 0 and h % 16 == 0
        assert 0.75 < w * h / res ** 2 < 1.3
    assert cache.buckets(res, enabled=False) == [(res // 16 * 16,) * 2]
    assert cache.nearest_bucket(2000, 1000, bs)[0] > cache.nearest_bucket(2000, 1000, bs)[1]
    assert cache.nearest_bucket(500, 500, bs) == (res // 16 * 16,) * 2


def test_epoch_plan_is_seeded_bucket_pure_and_covers_everything():
    c = cache.Cache.__new__(cache.Cache)
    c.buckets = [{"ids": [f"a{i}" for i in range(5)]}, {"ids": [f"b{i}" for i in range(3)]}]
    plan = c.epoch_plan(seed=1, epoch=0, batch_size=2)
    assert plan == c.epoch_plan(seed=1, epoch=0, batch_size=2)
    assert plan != c.epoch_plan(seed=1, epoch=1, batch_size=2) or plan != c.epoch_plan(seed=2, epoch=0, batch_size=2)
    seen = sorted((b, r) for b, rows in plan for r in rows)
    assert seen == [(0, i) for i in range(5)] + [(1, i) for i in range(3)]
    assert len(c.epoch_plan(seed=1, epoch=0, batch_size=2, world=2)) % 2 == 0


def test_fp8_refused_without_a_capable_gpu_and_unknown_modes():
    from stages.models import quant

    if not torch.cuda.is_available():
        with pytest.raises(quant.QuantizationError, match="fp8 needs a CUDA GPU"):
            quant.check_supported("fp8", torch.device("cpu"))
    with pytest.raises(quant.QuantizationError, match="allowed"):
        quant.check_supported("int3", torch.device("cpu"))
    quant.check_supported("nf4", torch.device("cpu"))  # nf4 and int8 run on CPU (module swap / torchao)
    quant.check_supported("int8", torch.device("cpu"))


def test_epoch_plan_honours_repeats():
    c = cache.Cache.__new__(cache.Cache)
    c.buckets = [{"ids": ["a", "b", "c"], "repeats": [1, 3, 1]}]
    plan = c.epoch_plan(seed=1, epoch=0, batch_size=1)
    assert sorted(r for _, rows in plan for r in rows) == [0, 1, 1, 1, 2]


def test_sigma_sampler_defaults_are_the_params_defaults():
    """Callers other than the trainer (benchmarks, notebooks) get train.*'s defaults."""
    import inspect

    from stages.core.params import Train

    defaults = {k: v.default for k, v in inspect.signature(flow.sample_sigmas).parameters.items()
                if k in ("logit_mean", "logit_std", "shift")}
    t = Train()
    assert defaults == {"logit_mean": t.logit_mean, "logit_std": t.logit_std, "shift": t.shift}


def test_sigmas_are_clamped_away_from_0_and_1():
    """σ = 0 would train on clean latents, σ = 1 on pure noise: both are clamped by 1e-4."""
    g = torch.Generator().manual_seed(0)
    near_one = flow.sample_sigmas(50, "shift", generator=g, shift=1e7)
    near_zero = flow.sample_sigmas(50, "logit_normal", generator=g, logit_mean=-100.0)
    assert torch.equal(near_one, torch.full((50,), 1 - 1e-4)) and torch.equal(near_zero, torch.full((50,), 1e-4))
