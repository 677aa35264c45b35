"""The synthetic painting generator: determinism, planted ground truth, detectable defects."""
import io

import imagehash
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.core import params, shards
from stages.data import painting, scenes, synthetic
from tests.stagerun import run_stage, write_params


def _gray(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.float64)


def laplacian_var(a):
    return (a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] - 4 * a[1:-1, 1:-1]).var()


def clipped(a):
    return ((a <= 2) | (a >= 253)).mean()


def entropy(a):
    h = np.bincount(a.astype(int).ravel(), minlength=256) / a.size
    return float(-(h[h > 0] * np.log2(h[h > 0])).sum())


# The filter stage's smoke defaults (params.Filter); a defect must break one of them, a good painting none.
F = params.Filter()


def violations(data: bytes) -> set:
    a = _gray(data)
    out = set()
    if min(a.shape) < F.min_side:
        out.add("min_side")
    if laplacian_var(a) < F.blur_min:
        out.add("blur")
    if clipped(a) > F.clipped_max:
        out.add("exposure")
    if a.std() < F.std_min or entropy(a) < F.entropy_min:
        out.add("blank")
    return out


EXPECTED = {"tiny": "min_side", "blurred": "blur", "blank": "blank", "overexposed": "exposure",
            "underexposed": "exposure", "not_painting": "exposure"}


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """The download stage on a small synthetic set (the smoke code path, fewer images)."""

    from stages import download

    tmp = tmp_path_factory.mktemp("synth")
    write_params(tmp, "data.synthetic.count=72", "data.synthetic.size=128", "data.synthetic.near_duplicates=0.17",
                 "data.synthetic.defects=0.17", "data.synthetic.contrast=4")
    run_stage(download.main, tmp)
    return tmp


def test_set_composition_and_metadata(synthetic_run):
    table = shards.read_table(synthetic_run / "data/raw/shards")
    truth = pq.read_table(synthetic_run / "data/raw/truth.parquet").to_pylist()
    assert table.num_rows == 72 == len(truth)
    kinds = {k: sum(t["kind"] == k for t in truth) for k in ("good", "near_duplicate", "defect")}
    assert kinds == {"good": 48, "near_duplicate": 12, "defect": 12}
    assert {t["defect"] for t in truth if t["kind"] == "defect"} == set(synthetic.DEFECTS)
    rows = table.drop(["image"]).to_pylist()
    assert len({r["artist"] for r in rows}) >= 4
    assert {r["style"] for r in rows} == {"Impressionism"}
    assert {r["genre"] for r in rows} <= set(scenes.GENRES)
    assert all(r["description"] and r["title"] and r["license"] for r in rows)
    for r in table.to_pylist():
        assert r["id"] == shards.content_id(r["image"])
    contrast = shards.read_table(synthetic_run / "data/raw/contrast")
    assert contrast.num_rows == 4 and set(contrast["style"].to_pylist()) == {"photograph"}


def test_near_duplicates_are_close_to_their_original(synthetic_run):
    images = {r["id"]: r["image"] for r in shards.read_table(synthetic_run / "data/raw/shards").to_pylist()}
    truth = pq.read_table(synthetic_run / "data/raw/truth.parquet").to_pylist()
    dups = [t for t in truth if t["kind"] == "near_duplicate"]
    methods = {t["detail"].split()[0] for t in dups}
    assert methods == set(synthetic.DUP_METHODS)
    assert any(images[t["id"]][:2] == b"\xff\xd8" for t in dups)  # re-encoded copies are JPEG
    good = {t["id"] for t in truth if t["kind"] == "good"}
    for t in dups:
        assert t["dup_of"] in good
        a = imagehash.phash(Image.open(io.BytesIO(images[t["id"]])))
        b = imagehash.phash(Image.open(io.BytesIO(images[t["dup_of"]])))
        assert a - b <= synthetic.MAX_DUP_BITS, t
    # and distinct paintings are far apart: planted copies are not lost among accidental twins
    hashes = [imagehash.phash(Image.open(io.BytesIO(images[i]))) for i in sorted(good)]
    close = sum(hashes[i] - hashes[j] <= 4 for i in range(len(hashes)) for j in range(i))
    assert close <= 2


def test_defects_break_a_weight_free_rule_and_paintings_pass(synthetic_run):
    images = {r["id"]: r["image"] for r in shards.read_table(synthetic_run / "data/raw/shards").to_pylist()}
    truth = pq.read_table(synthetic_run / "data/raw/truth.parquet").to_pylist()
    for t in truth:
        v = violations(images[t["id"]])
        if t["kind"] == "defect":
            assert EXPECTED[t["defect"]] in v, (t, v)
        elif t["kind"] == "good":
            assert not v, (t, v)


def test_reports_written(synthetic_run):
    import json

    rep = json.loads((synthetic_run / "reports/data/download.json").read_text())
    assert rep["stored"] == 72 and rep["truth"] == {"good": 48, "near_duplicate": 12, "defect": 12}
    assert sum(rep["rejects_by_reason"].values()) == rep["rejected"] == 0
    sizes = (synthetic_run / "reports/data/sizes.csv").read_text().splitlines()
    assert sizes[0] == "width,height" and len(sizes) == 73
    for name in ("resolution.png", "contact_sheet.png", "counts.png", "counts.json"):
        assert (synthetic_run / "reports/data/figures" / name).stat().st_size > 100


def test_generation_is_deterministic_and_seeded():
    items = synthetic.plan(20, 0.1, 0.1, seed=7)
    assert items == synthetic.plan(20, 0.1, 0.1, seed=7)
    good = [it for it in items if it.kind == "good"][:3]
    a = [synthetic.generate(it, 7, 96, 32)["data"] for it in good]
    b = [synthetic.generate(it, 7, 96, 32)["data"] for it in good]
    c = [synthetic.generate(it, 8, 96, 32)["data"] for it in good]
    assert a == b and a != c


def test_impressionist_traits_against_the_photo_rendering():
    """Strokes of pure colour, no black or white, vs the smooth photo-like rendering."""
    for i in range(4):
        scene = scenes.make_scene(i, np.random.default_rng([1, i]))
        paint = painting.paint(scene, 128, 96, np.random.default_rng([1, i]))
        photo = painting.photo(scene, 128, 96, np.random.default_rng([1, i]))
        pa_, ph = np.asarray(paint.convert("L"), float), np.asarray(photo.convert("L"), float)
        assert laplacian_var(pa_) > 3 * laplacian_var(ph)       # visible strokes
        assert clipped(pa_) == 0                                 # high key, never burnt, never black
        sat = lambda im: np.asarray(im.convert("HSV"))[..., 1].mean()  # noqa: E731
        assert sat(paint) > sat(photo)                           # pure, unmixed colour


def test_plan_refuses_a_set_without_paintings():
    with pytest.raises(ValueError, match="no good painting"):
        synthetic.plan(10, 0.5, 0.5, seed=0)


def test_same_set_whatever_the_number_of_workers():
    from stages import download

    d = params.Data(synthetic=params.SyntheticSource(count=16, size=64, near_duplicates=0.25, defects=0.2))
    one = [(r["id"], r.get("_truth", {}).get("key")) for r in download._synthetic_results(d, 3, workers=1)]
    two = [(r["id"], r.get("_truth", {}).get("key")) for r in download._synthetic_results(d, 3, workers=2)]
    assert one == two and len(one) == 16
