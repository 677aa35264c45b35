"""Trait metrics on constructed images whose answer is known."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from stages.metrics import traits

S = 64


def gradient(c0=(0.2, 0.4, 0.8), c1=(0.9, 0.8, 0.3)) -> np.ndarray:
    t = np.linspace(0, 1, S)[None, :, None]
    return np.broadcast_to(np.array(c0) * (1 - t) + np.array(c1) * t, (S, S, 3)).copy()


def strokes(palette, n=400, seed=0, length=5, width=2, bg=(128, 128, 128)) -> Image.Image:
    """Short straight strokes in random directions, colours drawn from ``palette``."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (S, S), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(n):
        x, y = rng.uniform(0, S, 2)
        a = rng.uniform(0, np.pi)
        dx, dy = length * np.cos(a), length * np.sin(a)
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=palette[rng.integers(len(palette))],
                  width=width)
    return img


def flat(rgb) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=float), (S, S, 3)).copy()


def shadowed(shadow_rgb) -> np.ndarray:
    """A light scene (pale yellow) whose lower 30% is a shadow of ``shadow_rgb``."""
    img = flat((0.95, 0.9, 0.6))
    img[int(S * 0.7):] = shadow_rgb
    return img


def test_lab_known_values():
    lab = traits.srgb_to_lab(np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(lab[0], [100, 0, 0], atol=0.05)
    np.testing.assert_allclose(lab[1], [53.24, 80.09, 67.20], atol=0.1)
    np.testing.assert_allclose(lab[2], [0, 0, 0], atol=1e-6)


def test_stroke_texture_has_high_frequency_energy_and_gradient_none():
    smooth = traits.image_traits(gradient(), S)["hf_energy"]
    stroked = traits.image_traits(strokes([(230, 60, 40), (40, 90, 220), (250, 220, 40)]), S)["hf_energy"]
    assert smooth < 0.02
    assert stroked > 0.3
    assert traits.image_traits(flat((0.5, 0.5, 0.5)), S)["hf_energy"] == 0.0


def test_broken_colour_separates_juxtaposed_hues_from_blends():
    # A checkerboard of 4 px blue/orange squares = exactly the patch size at S=64, 16 patches.
    yy, xx = np.mgrid[0:S, 0:S]
    board = np.where((((yy // 4) + (xx // 4)) % 2 == 0)[..., None], (0.1, 0.3, 0.9), (0.95, 0.55, 0.1))
    juxtaposed = traits.image_traits(board, S)["broken_colour"]
    blended = traits.image_traits(gradient(), S)["broken_colour"]
    mixed_flat = traits.image_traits(flat((0.5, 0.4, 0.45)), S)["broken_colour"]
    grey_strokes = traits.image_traits(strokes([(20, 20, 20), (240, 240, 240)]), S)["broken_colour"]
    assert mixed_flat == pytest.approx(0.0, abs=1e-9)
    assert grey_strokes < 1.0  # luminance texture is not broken colour
    assert blended < 8.0
    # blue vs orange differ by > 100 in a*b*: every neighbouring pair differs by that much
    lab = traits.srgb_to_lab(np.array([[0.1, 0.3, 0.9], [0.95, 0.55, 0.1]]))
    expected = np.linalg.norm(lab[0, 1:] - lab[1, 1:])
    assert juxtaposed == pytest.approx(expected, rel=0.05)
    assert juxtaposed > 10 * blended


def test_pure_colour_saturation():
    pure = traits.image_traits(flat((1.0, 0.0, 0.0)), S)
    assert pure["saturation"] == pytest.approx(1.0, abs=0.01)
    assert pure["pure_share"] == 1.0
    muddy = traits.image_traits(flat((0.6, 0.5, 0.45)), S)
    assert muddy["saturation"] == pytest.approx(0.25, abs=0.01)
    assert muddy["pure_share"] == 0.0
    half = flat((0.5, 0.5, 0.5))
    half[:, : S // 2] = (0.1, 0.8, 0.2)
    assert traits.image_traits(half, S)["pure_share"] == pytest.approx(0.5, abs=0.03)


def test_black_avoidance_black_vs_coloured_shadows():
    black = traits.image_traits(shadowed((0.02, 0.02, 0.02)), S)
    coloured = traits.image_traits(shadowed((0.3, 0.25, 0.6)), S)
    assert black["black_share"] == pytest.approx(0.3, abs=0.03)
    assert coloured["black_share"] == 0.0
    assert black["shadow_chroma"] < 2.0
    assert coloured["shadow_chroma"] > 30.0


def test_light_emphasis_key():
    assert traits.image_traits(flat((1, 1, 1)), S)["light_key"] == pytest.approx(1.0, abs=0.01)
    assert traits.image_traits(flat((0, 0, 0)), S)["light_key"] == pytest.approx(0.0, abs=0.01)
    mid = traits.image_traits(flat((119 / 255,) * 3), S)
    assert mid["light_key"] == pytest.approx(0.50, abs=0.01)
    assert mid["highkey_share"] == 0.0
    high = traits.image_traits(shadowed((0.3, 0.25, 0.6)), S)
    assert high["highkey_share"] == pytest.approx(0.7, abs=0.03)
    assert high["light_key"] > traits.image_traits(shadowed((0.02, 0.02, 0.02)), S)["light_key"]


def test_resizing_and_mean_traits():
    big = Image.fromarray((gradient() * 255).astype(np.uint8)).resize((200, 120))
    one = traits.image_traits(big, S)
    assert set(one) == set(traits.NAMES)
    m = traits.mean_traits([flat((1, 1, 1)), flat((0, 0, 0))], S)
    assert m["light_key"] == pytest.approx(0.5, abs=0.01)
    assert all(np.isnan(v) for v in traits.mean_traits([], S).values())
    with pytest.raises(ValueError):
        traits.broken_colour(np.zeros((4, 4, 3)), patches=16)
