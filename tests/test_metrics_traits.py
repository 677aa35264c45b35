"""Trait metrics on constructed images whose answer is known (never on real paintings)."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from stages.data import painting, scenes
from stages.metrics import texture, texture_weights, traits

S = 64
BIG = 256  # the real profile's eval.trait_size: strokes of 1-3 % of the side span pixels


def measure(img, size=S) -> dict:
    """Every trait, the reported ones and the diagnostics (the composite's other components)."""
    return traits.image_traits(img, size, diagnostics=True)


def gradient(c0=(0.2, 0.4, 0.8), c1=(0.9, 0.8, 0.3), n=S) -> np.ndarray:
    t = np.linspace(0, 1, n)[None, :, None]
    return np.broadcast_to(np.array(c0) * (1 - t) + np.array(c1) * t, (n, n, 3)).copy()


def strokes(palette, n=400, seed=0, length=5, width=2, bg=(128, 128, 128), side=S) -> Image.Image:
    """Short straight strokes in random directions, colours drawn from ``palette``."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(n):
        x, y = rng.uniform(0, side, 2)
        a = rng.uniform(0, np.pi)
        dx, dy = length * np.cos(a), length * np.sin(a)
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=palette[rng.integers(len(palette))],
                  width=width)
    return img


def stripes(period=8, n=BIG) -> np.ndarray:
    """Long straight parallel lines: all edges, one orientation."""
    on = (np.arange(n) // (period // 2)) % 2 == 0
    return np.broadcast_to(np.where(on[None, :, None], 0.9, 0.2), (n, n, 3)).copy()


def flat(rgb, n=S) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=float), (n, n, 3)).copy()


def shadowed(shadow_rgb) -> np.ndarray:
    """A light scene (pale yellow) whose lower 30% is a shadow of ``shadow_rgb``."""
    img = flat((0.95, 0.9, 0.6))
    img[int(S * 0.7):] = shadow_rgb
    return img


def board(c0, c1, cell=4, n=S) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n]
    return np.where((((yy // cell) + (xx // cell)) % 2 == 0)[..., None], c0, c1).astype(float)


def test_oklab_known_values():
    lab = traits.srgb_to_oklab(np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(lab[0], [1, 0, 0], atol=1e-4)
    np.testing.assert_allclose(lab[1], [0.62796, 0.22486, 0.12585], atol=1e-4)  # Ottosson's table
    np.testing.assert_allclose(lab[2], [0, 0, 0], atol=1e-6)


def test_stroke_isotropy_dabs_versus_lines_gradients_and_flat():
    palette = [(230, 60, 40), (40, 90, 220), (250, 220, 40)]
    dabs = traits.image_traits(strokes(palette, n=6000, length=5, width=4, side=BIG), BIG)["stroke_isotropy"]
    lines = traits.image_traits(stripes(), BIG)["stroke_isotropy"]
    smooth = traits.image_traits(gradient(n=BIG), BIG)["stroke_isotropy"]
    assert traits.image_traits(flat((0.5, 0.5, 0.5)), BIG)["stroke_isotropy"] == 0.0
    assert smooth == 0.0  # a gradient is below the texture threshold: no strokes at all
    assert lines < 0.05  # every textured pixel lies on a straight edge: coherence ~1
    assert dabs > 0.3 and dabs > 6 * lines


def test_broken_colour_hue_changes_versus_tonal_modelling():
    # Two hues of equal OKLab lightness side by side, vs one hue light/dark (same a*b* step).
    blue, orange = np.array([0.1, 0.3, 0.9]), np.array([0.95, 0.55, 0.1])
    iso = measure(board((0.56, 0.47, 0.62), (0.45, 0.55, 0.36)))["broken_colour"]
    tonal = measure(board((0.2, 0.2, 0.2), (0.9, 0.9, 0.9)))["broken_colour"]
    juxtaposed = measure(board(blue, orange))["broken_colour"]
    blended = measure(gradient())["broken_colour"]
    assert measure(flat((0.5, 0.4, 0.45)))["broken_colour"] == pytest.approx(0.0, abs=1e-9)
    assert tonal < 0.01  # value contrast without hue change is not broken colour
    assert blended < 0.2
    # isoluminant neighbours: every cell boundary (1/4 of the pairs at 4-px cells) scores |d ab| / eps
    pair = traits.srgb_to_oklab(np.array([[0.56, 0.47, 0.62], [0.45, 0.55, 0.36]]))
    d_ab, d_l = np.linalg.norm(pair[0, 1:] - pair[1, 1:]), abs(pair[0, 0] - pair[1, 0])
    assert iso == pytest.approx(0.25 * d_ab / (d_l + traits.BROKEN_EPS), rel=0.05)
    assert iso > 10 * blended
    assert juxtaposed > 3 * blended  # blue beside orange: a hue change, though with a value step too


def test_coloured_shadows_and_dark_share():
    black = measure(shadowed((0.02, 0.02, 0.02)))
    violet = measure(shadowed((0.3, 0.25, 0.6)))
    brown = measure(shadowed((0.35, 0.2, 0.1)))
    assert black["dark_share"] == pytest.approx(0.3, abs=0.02)
    assert violet["dark_share"] == 0.0
    assert black["cool_shadows"] == 0.0 and brown["cool_shadows"] == 0.0  # black / warm earth shadows
    assert violet["cool_shadows"] == pytest.approx(1.0)


def test_light_key_is_key_minus_spread():
    assert measure(flat((1, 1, 1)))["light_key"] == pytest.approx(1.0, abs=1e-3)
    assert measure(flat((0, 0, 0)))["light_key"] == pytest.approx(0.0, abs=1e-3)
    half = flat((1.0, 1.0, 1.0))
    half[:, : S // 2] = 0.0
    assert measure(half)["light_key"] == pytest.approx(0.0, abs=1e-3)  # mean .5, sd .5
    light = measure(shadowed((0.3, 0.25, 0.6)))["light_key"]
    assert light > measure(shadowed((0.02, 0.02, 0.02)))["light_key"] + 0.2


def mondrian(lines=True, n=BIG) -> Image.Image:
    """Modern flat colour: three primary blocks on off-white, optionally cut by black bars."""
    img = Image.new("RGB", (n, n), (240, 238, 230))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, 100, 90), (220, 30, 30))
    draw.rectangle((170, 160, 255, 255), (20, 50, 170))
    draw.rectangle((0, 200, 60, 255), (245, 210, 20))
    if lines:
        for x in (100, 170):
            draw.rectangle((x - 3, 0, x + 3, n), (10, 10, 10))
        for y in (90, 160, 200):
            draw.rectangle((0, y - 3, n, y + 3), (10, 10, 10))
    return img


# Impressionist stand-in: short dabs of light tints (pure hues mixed with white) in all directions.
TINTS = [(236, 200, 180), (180, 200, 230), (210, 225, 170), (240, 225, 160), (200, 180, 220)]


def dab_field() -> Image.Image:
    return strokes(TINTS, n=6000, length=5, width=4, side=BIG, bg=(225, 215, 200))


def test_hard_edges_flat_shapes_and_outlines_versus_soft_dabs():
    assert measure(flat((0.5, 0.5, 0.5), BIG), BIG)["hard_edges"] == 0.0
    assert measure(gradient(n=BIG), BIG)["hard_edges"] == 0.0  # a smooth change is no edge
    outlined, blocks, dabs = (measure(im, BIG)["hard_edges"] for im in (mondrian(), mondrian(False), dab_field()))
    assert dabs < 0.005  # neighbouring tints differ by less than 0.1 OKLab per pixel
    assert blocks > 0.005  # the borders of the colour blocks are hard edges ...
    assert outlined > 4 * blocks  # ... and black bars across the picture add many more
    assert measure(stripes(), BIG)["hard_edges"] > 0.4  # 0.2 / 0.9 grey bars every 4 px: edges everywhere


def test_saturated_colour_primaries_versus_tints():
    for primary in ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0)):
        assert measure(flat(primary))["saturated_colour"] == 1.0
    tint = (1.0, 0.6, 0.6)  # red mixed with white: still colourful (chroma 0.12), not a tube primary
    chroma = np.hypot(*traits.srgb_to_oklab(np.array(tint))[1:])
    assert 0.1 < chroma < traits.SAT_C
    assert measure(flat(tint))["saturated_colour"] == 0.0
    assert measure(dab_field(), BIG)["saturated_colour"] == 0.0
    # the three primary blocks, less the black bars over them: about a quarter of the picture
    assert measure(mondrian(), BIG)["saturated_colour"] == pytest.approx(0.28, abs=0.03)


def test_global_score_ranks_a_flat_colour_mondrian_under_a_dab_field():
    flat_art, dabs = measure(mondrian(), BIG), measure(dab_field(), BIG)
    assert flat_art[traits.GLOBAL] < 0.2 < 0.9 < dabs[traits.GLOBAL]
    # the new components push the Mondrian down: at their corpus means it would score higher
    neutral = {**flat_art, **{k: traits.COMPOSITE_WEIGHTS[k][0] for k in ("hard_edges", "saturated_colour")}}
    assert traits.composite(neutral) > flat_art[traits.GLOBAL]
    assert traits.composite(flat_art) == flat_art[traits.GLOBAL]


def hatching(n=BIG, period=6, width=2) -> Image.Image:
    """Straight diagonal hatching: parallel lines of one orientation over a light ground."""
    img = Image.new("RGB", (n, n), (225, 215, 200))
    draw = ImageDraw.Draw(img)
    for k in range(-n, n, period):
        draw.line([(k, 0), (k + n, n)], fill=(90, 80, 110), width=width)
    return img


def test_texture_descriptor_shape_and_scale():
    """64 patches of len(NAMES) numbers at every size (patches and filter scales are fractions of the
    side); a flat patch has no texture energy, dabs have much, in all directions."""
    for size in (64, 128, BIG):
        lab = traits.srgb_to_oklab(traits.to_rgb_array(dab_field(), size))
        d = texture.patch_descriptors(lab)
        assert d.shape == (64, len(texture.NAMES)) and np.isfinite(d).all()
    col = {k: i for i, k in enumerate(texture.NAMES)}
    dabs = texture.patch_descriptors(traits.srgb_to_oklab(traits.to_rgb_array(dab_field(), BIG)))
    lines = texture.patch_descriptors(traits.srgb_to_oklab(traits.to_rgb_array(hatching(), BIG)))
    plain = texture.patch_descriptors(traits.srgb_to_oklab(flat((0.5, 0.6, 0.7), BIG)))
    assert (plain[:, col["grad1"]] == np.log(texture.EPS)).all()
    assert dabs[:, col["grad1"]].min() > plain[:, col["grad1"]].max() + 4  # e^4: 50 x the energy
    # many directions vs one (the hatching's border patches mirror it into crossed lines: the median)
    assert np.median(dabs[:, col["iso1"]]) > 0.5 > 0.2 > np.median(lines[:, col["iso1"]])
    assert dabs[:, col["cgrad1"]].mean() > lines[:, col["cgrad1"]].mean()  # hue changes vs grey lines


def test_texture_weights_are_complete_and_finite():
    d = len(texture.NAMES)
    assert tuple(texture_weights.DESCRIPTORS) == texture.NAMES
    assert all(sd > 0 for _, sd, _ in texture_weights.DESCRIPTORS.values())
    assert [len(r) for r in texture_weights.QUADRATIC] == list(range(d, 0, -1))
    assert np.isfinite(np.concatenate([np.asarray(r) for r in texture_weights.QUADRATIC])).all()
    # the patch logit is the documented quadratic form
    z = np.random.default_rng(0).normal(size=(5, d))
    mu, sd, lin = (np.array([v[i] for v in texture_weights.DESCRIPTORS.values()]) for i in range(3))
    Q = np.zeros((d, d))
    for i, row in enumerate(texture_weights.QUADRATIC):
        Q[i, i:] = row
    quad = np.concatenate([np.asarray(r) for r in texture_weights.QUADRATIC])
    expect = texture_weights.BIAS + z @ lin + np.einsum("ni,ij,nj->n", z, Q, z)
    assert np.allclose(texture.patch_logits(mu + sd * z, mu, sd, lin, quad, texture_weights.BIAS), expect)


def test_impressionism_ranks_a_dab_field_over_flat_shapes_gradients_and_hatching():
    """The frozen texture model: dabs in many directions and hues score high; a Mondrian, straight
    hatching and a smooth gradient score low; a blank picture is in between (no texture either way)."""
    dabs = measure(dab_field(), BIG)["impressionism"]
    assert dabs > 0.7
    for img in (mondrian(), hatching(), stripes(), gradient(n=BIG)):
        assert measure(img, BIG)["impressionism"] < 0.25
    assert measure(mondrian(lines=False), BIG)["impressionism"] < 0.4  # flat blocks, no black bars
    assert measure(flat((0.5, 0.6, 0.7), BIG), BIG)["impressionism"] < dabs - 0.3
    assert measure(dab_field(), 128)["impressionism"] > 0.5  # still textured at half the size


def test_composite_follows_each_trait_in_its_direction():
    base = {k: mu for k, (mu, _, _) in traits.COMPOSITE_WEIGHTS.items()}
    mid = traits.composite(base)
    assert 0.0 < mid < 1.0
    for k, (_, sd, _) in traits.COMPOSITE_WEIGHTS.items():
        moved = traits.composite({**base, k: base[k] + sd * traits.DIRECTION[k]})
        assert moved > mid, k  # the frozen weights agree with the claimed directions


def test_synthetic_paintings_show_the_traits_against_their_photo_rendering():
    """The smoke pipeline's paintings (strokes of pure pigment, coloured shadows, high key) score
    as more Impressionist than the same scenes rendered smoothly, at the smoke and real trait sizes."""
    for size in (S, BIG):
        for i in range(3):
            scene = scenes.make_scene(i, np.random.default_rng([1, i]))
            paint = measure(painting.paint(scene, 128, 96, np.random.default_rng([1, i])), size)
            photo = measure(painting.photo(scene, 128, 96, np.random.default_rng([1, i])), size)
            for k in ("stroke_isotropy", "broken_colour", "light_key", "impressionism"):
                assert paint[k] > photo[k], (size, i, k)
            assert paint["dark_share"] <= photo["dark_share"]
            assert paint[traits.GLOBAL] > 0.8 and paint["impressionism"] > 0.5


def test_interface_resizing_and_mean_traits():
    assert traits.NAMES[-1] == traits.COMPOSITE and set(traits.NAMES) <= set(traits.DIRECTION)
    assert all(traits.DIRECTION[k] in (1, -1) for k in traits.NAMES + traits.DIAGNOSTICS)
    assert set(traits.COMPONENTS) <= set(traits.NAMES) | set(traits.DIAGNOSTICS)
    assert set(traits.LABELS) >= set(traits.NAMES) | set(traits.COMPONENTS)
    big = Image.fromarray((gradient() * 255).astype(np.uint8)).resize((200, 120))
    assert set(traits.image_traits(big, S)) == set(traits.NAMES)
    diag = measure(flat((1.0, 0.0, 0.0)))
    assert set(diag) == set(traits.NAMES) | set(traits.DIAGNOSTICS)
    assert diag["pure_colour"] == 1.0  # pure red: OKLab C 0.26 at L 0.63
    assert measure(flat((0.6, 0.5, 0.45)))["pure_colour"] == 0.0
    strokes_img, flat_img = strokes([(230, 60, 40), (40, 90, 220)], n=6000, side=BIG), flat((0.5, 0.5, 0.5), BIG)
    table = traits.trait_table([strokes_img, flat_img], BIG)
    assert set(table) == set(traits.NAMES) and table["stroke_isotropy"][1] == 0.0
    m = traits.mean_traits([strokes_img, flat_img], BIG)
    assert m["stroke_isotropy"] == pytest.approx(table["stroke_isotropy"].mean())
    # distance to a reference set in its standard deviations; raw units where it does not vary
    ref = {k: np.array([0.0, 2.0]) for k in traits.NAMES}
    assert traits.distance({k: np.array([4.0]) for k in traits.NAMES}, ref) == {k: 3.0 for k in traits.NAMES}
    still = {k: np.array([1.0, 1.0]) for k in traits.NAMES}
    assert traits.distance({k: np.array([0.5]) for k in traits.NAMES}, still)["impressionism"] == 0.5
    assert all(np.isnan(v) for v in traits.mean_traits([], S).values())
    with pytest.raises(ValueError):
        traits.broken_colour(np.zeros((1, 1, 3)))
