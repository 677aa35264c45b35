"""stages/curation/hashing.py in detail: the geometry of the hashed views, the JPEG quantisation
step, the reduced decode, hex round trips, the multi-index search at every hash size and radius
branch, clustering edge cases and the P/R scores' edge cases. (The stage-level behaviour and the
search against brute force at the default sizes: tests/test_dedupe.py.)"""
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from stages.core import images
from stages.curation import hashing
from tests.paintings import painting
from tests.test_dedupe import brute_reference


def coords(w: int, h: int) -> Image.Image:
    """An image whose pixel (x, y) is (x, y, 0): every crop shows where it was cut."""
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8))


@pytest.mark.parametrize("w,h,box", [
    (240, 60, (60, 0, 180, 60)),    # wider than 2:1: the centred 120 x 60 columns
    (100, 120, (0, 35, 100, 85)),   # taller: the centred 100 x 50 rows
    (90, 30, (15, 0, 75, 30)),
])
def test_band_is_the_centred_two_to_one_crop(w, h, box):
    img = coords(w, h)
    got = hashing.band(img)
    assert got.size[0] == 2 * got.size[1]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(img.crop(box)))
    square = coords(80, 40)  # already 2:1: the whole image
    np.testing.assert_array_equal(np.asarray(hashing.band(square)), np.asarray(square))


@pytest.mark.parametrize("w", [6, 7, 8])
def test_fold_is_the_left_half_of_the_image_averaged_with_its_mirror(w):
    img = painting(3, 3, size=(w, 5))
    got = np.asarray(hashing.fold(img)).astype(int)
    half = (w + 1) // 2  # an odd width keeps its middle column
    assert got.shape == (5, half, 3)
    a, m = np.asarray(img).astype(int), np.asarray(ImageOps.mirror(img)).astype(int)
    np.testing.assert_allclose(got, (a[:, :half] + m[:, :half]) / 2, atol=1)
    # a flipped copy has the same fold
    np.testing.assert_array_equal(np.asarray(hashing.fold(ImageOps.mirror(img))), got)


def test_views_are_named_and_ordered_as_VIEWS_and_hashed_in_that_order():
    img = painting(4, 4)
    v = hashing.views(img)
    assert tuple(v) == hashing.VIEWS
    assert v["band_fold"].size == hashing.fold(hashing.band(img)).size
    stacked = hashing.hash_views(img)
    assert stacked.shape == (len(hashing.VIEWS), 2, 8)  # the default hash_size 8: 64 bits
    for k, name in enumerate(hashing.VIEWS):
        ph, dh = hashing.hash_image(v[name])
        assert stacked[k, 0].tolist() == ph.tolist() and stacked[k, 1].tolist() == dh.tolist()


def _jpeg(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_quant_step_is_the_mean_luminance_table_step():
    img = painting(6, 6)
    # luminance table 0 (step 2), chroma table 1 (step 9): only the luminance counts
    assert hashing.quant_step(_jpeg(img, qtables=[[2] * 64, [9] * 64])) == 2.0
    assert hashing.quant_step(_jpeg(img.convert("L"), qtables=[[3] * 64])) == 3.0  # grey: one table
    assert hashing.quant_step(_jpeg(img, quality=50)) > hashing.quant_step(_jpeg(img, quality=95)) > 1.0
    assert hashing.quant_step(images.encode_png(img)) == 1.0  # lossless


def test_hash_many_hashes_a_reduced_decode_and_reports_progress(monkeypatch):
    """Big JPEGs are hashed from a reduced DCT decode of at least MEASURE_SIDE = 256 px (speed; the
    hashes are those of the full image to a bit or two: test_dedupe), small images at full size."""
    seen = []
    real = hashing.hash_views
    monkeypatch.setattr(hashing, "hash_views", lambda img, hs: seen.append(img.size) or real(img, hs))
    big = _jpeg(painting(8, 8, size=(1024, 1024)), quality=90)
    small = images.encode_png(painting(9, 9, size=(300, 200)))
    done = []
    out = hashing.hash_many([big, small, b"not an image"], workers=1, progress=done.append)
    assert seen == [(256, 256), (300, 200)]
    assert done == [1, 1, 1]
    assert out[2] is None
    assert out[0][0].shape == (len(hashing.VIEWS), 2, 8) and out[1][1] == 1.0  # default hash_size 8; PNG
    assert out[0][1] == hashing.quant_step(big)


def test_hex_round_trip():
    bits = np.random.default_rng(0).integers(0, 256, (3, 8), dtype=np.uint8)
    back = hashing.from_hex([hashing.to_hex(b) for b in bits])
    np.testing.assert_array_equal(back, bits)
    assert hashing.from_hex([]).shape == (0, 0)  # no hashes: none, of no width


def test_as_words_pads_odd_hash_sizes_big_endian():
    bits = np.array([[0x01, 0x02, 0x03], [0xff, 0x00, 0x10]], np.uint8)  # 24 bits, e.g. not a multiple of 16
    np.testing.assert_array_equal(hashing._as_words(bits, np.uint16, 2), [[0x0102, 0x0300], [0xff00, 0x1000]])
    np.testing.assert_array_equal(hashing._as_words(bits, np.uint64, 8),
                                  [[0x0102030000000000], [0xff00100000000000]])


@pytest.mark.parametrize("n,nbytes,radius", [
    (2100, 13, 14),  # hash_size 10 (100 bits): 7 chunks padded to 16 bits, 2 words padded to 64
    (2100, 8, 16),   # radius // chunks = 4: no flip masks, brute force on many hashes
    (300, 8, 20),
    (2000, 8, 10),   # brute force in more than one block
])
def test_near_pairs_at_other_hash_sizes_and_radii(n, nbytes, radius):
    rng = np.random.default_rng(n + nbytes)
    bits = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    for _ in range(n // 10):
        src, dst = rng.integers(0, n, 2)
        bits[dst] = bits[src]
        for b in rng.choice(nbytes * 8, rng.integers(0, radius + 3), replace=False):
            bits[dst, b // 8] ^= 1 << (b % 8)
    np.testing.assert_array_equal(hashing.near_pairs(bits, radius, workers=1), brute_reference(bits, radius))


@pytest.mark.parametrize("n", [0, 1])
def test_near_pairs_of_fewer_than_two_hashes_is_empty(n):
    got = hashing.near_pairs(np.zeros((n, 8), np.uint8), 10)
    assert got.shape == (0, 2) and got.dtype == np.int64


def test_cluster_of_zero_and_one_item():
    assert hashing.cluster(0, np.zeros((0, 2), np.int64)).shape == (0,)
    assert hashing.cluster(1, np.zeros((0, 2), np.int64)).tolist() == [0]
    assert hashing.cluster(2, [[0, 1]]).tolist() == [0, 0]


def test_dedupe_scores_edge_cases():
    empty = hashing.dedupe_scores([], {})
    assert empty["precision"] == 1.0 and empty["recall"] == 1.0  # nothing removed, nothing to find
    rows = [dict(id="o1", cluster_id="o1", reason="best_of_cluster"),
            dict(id="c1", cluster_id="o1", reason="near_duplicate"),
            dict(id="c2", cluster_id="c2", reason="unique"),          # its original o2 is not in the set
            dict(id="o3", cluster_id="o3", reason="unique"),
            dict(id="c3", cluster_id=None, reason="unreadable")]       # a copy that did not decode
    truth = {"o1": {}, "c1": dict(kind="near_duplicate", dup_of="o1"),
             "o2": {}, "c2": dict(kind="near_duplicate", dup_of="o2"),
             "o3": {}, "c3": dict(kind="near_duplicate", dup_of="o3")}
    s = hashing.dedupe_scores(rows, truth)
    assert s["planted"] == 3 and s["planted_present"] == 1 and s["found"] == 1
    assert s["recall"] == 1.0 and s["precision"] == 1.0
