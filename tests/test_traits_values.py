"""stages/metrics/traits.py on exact values: the colour conversion against the sRGB and OKLab
definitions, the image preparation, the thresholds at their edges, and the frozen global score.
(The traits on constructed pictures: tests/test_metrics_traits.py.)"""
import numpy as np
import pytest
from PIL import Image

from stages.metrics import traits


def flat(rgb, n=16) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=float), (n, n, 3)).copy()


def test_oklab_of_greys_is_the_cube_root_of_linear_light():
    """A grey has a = b = 0 and L = cbrt(linear sRGB): the power segment (0.5) and the linear
    segment (0.02 < 0.04045) of the sRGB curve."""
    lab = traits.srgb_to_oklab(np.array([[0.5, 0.5, 0.5], [0.02, 0.02, 0.02], [0.04045, 0.04045, 0.04045]]))
    linear = np.array([((0.5 + 0.055) / 1.055) ** 2.4, 0.02 / 12.92, 0.04045 / 12.92])
    np.testing.assert_allclose(lab[:, 0], np.cbrt(linear), rtol=1e-6)
    np.testing.assert_allclose(lab[:, 1:], 0, atol=1e-6)


def test_to_rgb_array_keeps_every_level_from_each_input_type():
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    want = levels / 255.0
    for img in (levels, levels / 255.0, Image.fromarray(levels)):  # uint8, float in [0, 1], PIL
        got = traits.to_rgb_array(img, 16)
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, want)
    assert traits.to_rgb_array(Image.fromarray(levels).resize((40, 20)), 16).shape == (16, 16, 3)
    np.testing.assert_array_equal(traits.to_rgb_array(flat((1.5, -0.5, 0.5)), 16)[0, 0], [1.0, 0.0, 128 / 255])


@pytest.mark.parametrize("hue,cool", [(139.5, False), (140.5, True), (319.5, True), (320.5, False), (230.0, True),
                                      (40.0, False)])
def test_cool_shadows_hue_range_is_140_to_320_degrees(hue, cool):
    lab = np.zeros((8, 8, 3))
    lab[..., 0] = 0.3  # one lightness: every pixel is a shadow
    lab[..., 1], lab[..., 2] = 0.1 * np.cos(np.radians(hue)), 0.1 * np.sin(np.radians(hue))
    assert traits.cool_shadows(lab) == (1.0 if cool else 0.0)
    lab[..., 1:] *= 0.049 / 0.1  # under SHADOW_C = 0.05: not chromatic
    assert traits.cool_shadows(lab) == 0.0


def test_shadows_are_the_darkest_fifth():
    lab = np.zeros((10, 10, 3))
    lab[..., 0] = np.arange(100).reshape(10, 10) / 100  # L = 0.00 .. 0.99
    lab[..., 2] = -0.1  # every pixel cool and chromatic (hue 270)
    lab[3:, :, 2] = 0.1  # ... except from L = 0.30 on (warm, hue 90)
    assert traits.cool_shadows(lab) == 1.0  # the darkest 20 % are all cool
    lab[:2, :, 2] = 0.1
    assert traits.cool_shadows(lab) == pytest.approx(0, abs=0.06)  # only L 0.20 is cool of the darkest 21


def test_pure_colour_needs_mid_to_high_lightness():
    diag = traits.image_traits(flat((1.0, 1.0, 0.0)), 16, diagnostics=True)  # yellow: C 0.21 at L 0.97 > 0.9
    assert diag["pure_colour"] == 0.0 and diag["saturated_colour"] == 1.0
    assert traits.image_traits(flat((0.0, 0.0, 1.0)), 16, diagnostics=True)["pure_colour"] == 0.0  # blue: L 0.45
    assert "global_score" in diag and traits.GLOBAL == "global_score"


def test_broken_colour_divides_by_the_lightness_step_plus_0_02():
    lab = np.zeros((100, 100, 3))
    lab[:, 50:, 1] = 0.1  # a hue step at equal lightness between two halves: one patch boundary per row
    assert traits.broken_colour(lab) == pytest.approx(0.1 / 0.02 * 100 / (2 * 100 * 99))
    lab[:, 50:, 0] = 0.08  # with a lightness step of 0.08
    assert traits.broken_colour(lab) == pytest.approx(0.1 / 0.1 * 100 / (2 * 100 * 99))


def test_the_frozen_global_score_is_the_fitted_one():
    """The global score's weights are a fit (docs/evaluation.md), frozen: a deliberate refit updates
    these two numbers with them. At the corpus means the score is sigmoid(bias)."""
    means = {k: mu for k, (mu, _, _) in traits.COMPOSITE_WEIGHTS.items()}
    assert traits.composite(means) == pytest.approx(1 / (1 + np.exp(0.145663)), rel=1e-9)
    assert traits.composite({k: 0.0 for k in means}) == pytest.approx(0.06523451055080935, rel=1e-9)
    assert set(means) == set(traits.COMPONENTS)


def test_a_pixel_is_textured_from_a_gradient_of_2_56_per_side():
    """Two ramps of lightness meeting on the diagonal (L rises along x below it, along y above it):
    the tensors mix there (isotropy > 0) only where the gradient counts as texture, > 2.56 L per side."""
    n = 64
    yy, xx = np.mgrid[0:n, 0:n]
    iso = {}
    for slope in (2.5, 3.0):
        lab = np.zeros((n, n, 3))
        lab[..., 0] = 0.3 + slope * np.minimum(xx, yy) / n
        iso[slope] = traits.stroke_isotropy(lab)
    assert iso[2.5] == 0.0 and iso[3.0] > 0.005


@pytest.mark.parametrize("direction", ["vertical", "diagonal", "anti-diagonal"])
def test_straight_stripes_are_coherent_in_any_direction(direction):
    """Stripes of one direction: every textured pixel's tensor is coherent (coherence 1), so the
    isotropy is about 0 whatever the direction."""
    n = 128
    yy, xx = np.mgrid[0:n, 0:n]
    t = {"vertical": xx, "diagonal": xx + yy, "anti-diagonal": xx - yy}[direction]
    lab = np.zeros((n, n, 3))
    lab[..., 0] = 0.5 + 0.2 * np.sin(2 * np.pi * t / 16)
    assert 0.0 <= traits.stroke_isotropy(lab) < 0.02


def test_broken_colour_needs_two_patches_a_side():
    assert traits.broken_colour(np.zeros((2, 2, 3))) == 0.0
    with pytest.raises(ValueError, match=r"^image 1x1 too small for patches of 1 px$"):
        traits.broken_colour(np.zeros((1, 1, 3)))


def test_broken_colour_patches_are_a_hundredth_of_the_side():
    """A 1-px checkerboard of two isoluminant hues (a = +-0.1) at 300 px: patches of 3 px average
    it (5 cells against 4), so neighbouring patches differ by 2 x 0.1 / 9 in a."""
    n = 300
    yy, xx = np.mgrid[0:n, 0:n]
    lab = np.zeros((n, n, 3))
    lab[..., 0] = 0.5
    lab[..., 1] = np.where((xx + yy) % 2 == 0, 0.1, -0.1)
    assert traits.broken_colour(lab) == pytest.approx(2 * 0.1 / 9 / 0.02)


def test_the_tensor_window_scales_with_the_picture():
    """The structure tensor's window is a fraction of the side (above 140 px): the two ramps of
    test_a_pixel_is_textured... at 256 and 512 px score about alike (a fixed window would halve it)."""
    def iso(n):
        yy, xx = np.mgrid[0:n, 0:n]
        lab = np.zeros((n, n, 3))
        lab[..., 0] = 0.3 + 5.0 * np.minimum(xx, yy) / n
        return traits.stroke_isotropy(lab)

    assert 0.8 < iso(256) / iso(512) < 1.0


def test_the_reported_traits_labels_are_the_ones_the_docs_quote():
    """The labels of the reported traits (NAMES) head the report's and the model card's metric
    tables (stages/metrics/vocab.py); docs/results.md quotes those tables: a new label needs them
    regenerated. (The diagnostics' labels are not shown anywhere.)"""
    from pathlib import Path

    results = (Path(__file__).resolve().parents[1] / "docs/results.md").read_text()
    for name in traits.NAMES:
        assert f"`trait_{name}` (trait: {traits.LABELS[name]})" in results, name


def test_hard_edges_in_any_direction_with_or_without_a_tensor():
    """A step of 0.5 in L is a hard edge across or along the picture alike; hard_edges computes the
    tensor itself when not given one."""
    lab = np.zeros((32, 32, 3))
    lab[16:, :, 0] = 0.5  # a horizontal edge (gradient along y)
    across = traits.hard_edges(lab)
    assert across > 0.05
    assert traits.hard_edges(lab.transpose(1, 0, 2)) == across  # the same edge, vertical
    assert traits.hard_edges(lab, traits.colour_tensor(lab)) == across


def test_impressionism_is_the_sigmoid_of_the_texture_logit_and_64_px_the_default_size():
    from stages.metrics import texture

    rng = np.random.default_rng(3)
    pictures = [flat((0.2, 0.5, 0.7), 64), rng.uniform(0, 1, (50, 80, 3))]
    for img in pictures:
        lab = traits.srgb_to_oklab(traits.to_rgb_array(img, 64))
        logit = texture.texture_logit(lab, traits.colour_tensor(lab))
        got = traits.image_traits(img)  # the default size: 64
        assert got["impressionism"] == pytest.approx(1 / (1 + np.exp(-logit)), rel=1e-12)
        assert 0.0 < got["impressionism"] < 1.0
        assert got == traits.image_traits(img, 64)
    noisy = pictures[1]
    assert traits.trait_table([noisy])["stroke_isotropy"][0] == traits.image_traits(noisy, 64)["stroke_isotropy"]
    assert traits.mean_traits([noisy])["stroke_isotropy"] == traits.image_traits(noisy, 64)["stroke_isotropy"]
    assert traits.image_traits(noisy, 65)["stroke_isotropy"] != traits.image_traits(noisy, 64)["stroke_isotropy"]


def test_distance_is_in_reference_standard_deviations_once_it_varies_above_1e_9():
    one = {k: np.array([5.0]) for k in traits.NAMES}
    for ref, want in (([0.0, 4.0], 1.5),          # mean 2, sd 2: (5 - 2) / 2
                      ([0.0, 3e-9], 5 / 1.5e-9),  # sd 1.5e-9: still a spread
                      ([0.0, 2e-9], 5 - 1e-9),    # sd 1e-9: no spread, raw units
                      ([1.0], 4.0)):              # one reference picture: raw units
        got = traits.distance(one, {k: np.array(ref) for k in traits.NAMES})
        assert got == {k: pytest.approx(want, rel=1e-9) for k in traits.NAMES}, ref


def test_a_gradient_exactly_at_a_threshold_is_not_texture_and_not_a_hard_edge():
    """"from which ... counts" is strict: a colour gradient exactly at TEXTURE_GRAD (per image side) or
    HARD_STEP (per pixel) does not count; a hair above it does. Structure tensors given directly, so
    the gradient is exact (an isotropic one: counted texture makes stroke_isotropy 1)."""
    n = 64
    lab = np.zeros((n, n, 3))
    zero = np.zeros((n, n))
    for factor, counted in ((1.0, False), (1.01, True)):
        half = np.full((n, n), (factor * traits.TEXTURE_GRAD / n) ** 2 / 2)
        assert traits.stroke_isotropy(lab, (half, half.copy(), zero)) == (1.0 if counted else 0.0)
        step = np.full((n, n), (factor * traits.HARD_STEP) ** 2)
        assert traits.hard_edges(lab, (step, zero, zero)) == (1.0 if counted else 0.0)
