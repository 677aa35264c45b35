"""Caption stage: templates, trigger, token lengths, the VLM path on a tiny random BLIP, the held-out
split and the curated outputs (shards, split table, imagefolder export, reports)."""
import json
import re
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages import caption as stage
from stages.core import params, shards
from stages.core.images import encode_png
from stages.core.paths import Caption
from stages.curation import captions
from stages.data.holdout import split_holdout
from stages.models import tokens

TEMPLATE = "{description}, {genre} by {artist}, in the style of {trigger}"


def _clean(text):
    """Assert a caption has no leftovers of missing fields."""
    assert "None" not in text and "nan" not in text.split()
    assert ",," not in text.replace(" ", "") and not re.search(r"[,;]\s*$|^\s*[,;]", text)
    assert "  " not in text and "{" not in text


# ---------------------------------------------------------------------------------------- templates
@pytest.mark.parametrize("row,expect", [
    (dict(description="a river at dusk.", genre="landscape", artist="claude-monet"),
     "a river at dusk, landscape by Claude Monet, in the style of sks"),
    (dict(description=None, genre="landscape", artist="Unknown Artist"), "landscape, in the style of sks"),
    (dict(description="boats", genre=None, artist="Berthe Morisot"), "boats, by Berthe Morisot, in the style of sks"),
    (dict(description="None", genre=float("nan"), artist=""), "in the style of sks"),
    ({}, "in the style of sks"),
])
def test_template_with_missing_fields(row, expect):
    out = captions.render(TEMPLATE, row, "sks")
    assert out == expect
    _clean(out)


def test_template_articles_brackets_and_no_trigger():
    t = "{title} ({date}), a {genre} painting by {artist}"
    assert captions.render(t, dict(title="Water Lilies", date="1906", genre="landscape", artist="Monet"), "") == \
        "Water Lilies (1906), a landscape painting by Monet"
    assert captions.render(t, dict(title="Water Lilies", artist="Monet"), None) == "Water Lilies, a painting by Monet"
    assert captions.render("an {genre} study of {title}", dict(title="fog"), None) == "a study of fog"
    assert captions.render(t, {}, None) == ""
    for row in [dict(title="X"), dict(date="1880"), dict(genre="portrait", artist="Degas")]:
        _clean(captions.render(t, row, "impressionism style"))


@pytest.mark.parametrize("bad", ["{foo}", "{title", "{}"])
def test_bad_template_is_named(bad):
    with pytest.raises(ValueError, match="caption.template"):
        captions.render(bad, {}, "x")


# ----------------------------------------------------------------------------------------- trigger
def test_trigger_placed_by_template_or_appended():
    row = dict(title="Haystacks", artist="Monet")
    assert captions.render("{trigger}: {title} by {artist}", row, "sks") == "sks: Haystacks by Monet"
    assert captions.render("{title} by {artist}", row, "sks") == "Haystacks by Monet, sks"
    assert captions.render("{title} by {artist}.", row, "sks") == "Haystacks by Monet, sks"
    assert captions.render("{title} by {artist}", row, "").endswith("Monet")
    assert captions.add_trigger("A field at noon. ", "sks") == "A field at noon, sks"
    assert captions.add_trigger("a SKS field", "sks") == "a SKS field"  # already there: not twice
    assert captions.add_trigger("a field", None) == "a field"


def test_caption_batch_keeps_existing_and_falls_back():
    rows = [dict(id="a", caption="my own words", title="T"), dict(id="b", caption=None, title="T"),
            dict(id="c", caption="  ", title="T")]
    out = captions.caption_batch(rows, "template", "{title}", "sks", keep_existing=True)
    assert out == [("my own words, sks", "existing"), ("T, sks", "template"), ("T, sks", "template")]
    out = captions.caption_batch(rows, "template", "{title}", "sks", keep_existing=False)
    assert [how for _, how in out] == ["template"] * 3

    img = encode_png(Image.new("RGB", (8, 8), "red"))
    rows = [dict(id="x", image=img, title="T"), dict(id="y", image=b"not an image", title="T"),
            dict(id="z", image=img, title="T")]
    out = captions.caption_batch(rows, "combined", "{title}", "sks", describe=lambda ims: ["a red square", ""][:len(ims)])
    assert out[0] == ("a red square, T, sks", "combined")
    assert out[1] == ("T, sks", "template (vlm failed: undecodable image)")
    assert out[2] == ("T, sks", "template (vlm failed: empty output)")
    out = captions.caption_batch(rows[:1], "vlm", "{title}", "sks", describe=lambda ims: ["a red square."])
    assert out == [("a red square, sks", "vlm")]
    with pytest.raises(ValueError, match="caption.model"):
        captions.caption_batch(rows[:1], "vlm", "{title}", "sks")


# ------------------------------------------------------------------------------------ token lengths
def test_clip_counts_match_the_real_clip_bpe():
    counter = tokens.TokenCounter()  # no base model: open_clip's CLIP BPE + T5 estimate
    clip, t5 = counter.count(["a photo of a cat", "", "A photo of a cat!"])
    # OpenAI CLIP: <start> a photo of a cat <end> = 7 tokens; "!" is one more
    assert clip == [7, 2, 8]
    assert t5[0] >= 6 and t5[1] == 1
    assert counter.method["clip"].startswith("open_clip")


def test_truncation_accounting():
    counter = tokens.TokenCounter()
    texts = ["a small boat on the river", " ".join(["water lilies"] * 60), " ".join(["haystack"] * 600)]
    clip, t5 = counter.count(texts)
    assert clip[0] <= 77 < clip[1] and clip[2] > 77
    assert t5[0] < 512 and t5[2] > 512
    stats = tokens.truncation_counts(clip, t5)
    assert stats["clip_truncated"] == 2 and stats["t5_truncated"] == 1
    assert stats["clip_tokens_max"] == max(clip) and stats["clip_max_tokens"] == 77


def test_t5_estimate_counts_pieces():
    assert tokens.t5_estimate("") == 1
    assert tokens.t5_estimate("a river, 1874") == 1 + 1 + 2 + 1 + 4  # eos, a, ri|ver, ",", 1|8|7|4
    assert tokens.t5_estimate("impressionism") == 1 + 4


# ------------------------------------------------------------------------------------------- split
def test_split_is_deterministic_stratified_and_disjoint():
    ids = [f"id{i:03d}" for i in range(100)]
    artists = ["Monet"] * 50 + ["Degas"] * 30 + [None] * 20
    a = split_holdout(ids, artists, 0.2, seed=7)
    b = split_holdout(list(reversed(ids)), list(reversed(artists)), 0.2, seed=7)
    assert a == b  # independent of input order
    assert set(a) == set(ids) and set(a.values()) == {"train", "holdout"}
    held = [i for i in ids if a[i] == "holdout"]
    assert len(held) == 20
    by_artist = {name: sum(a[i] == "holdout" for i, x in zip(ids, artists) if x == name) for name in ("Monet", "Degas", None)}
    assert by_artist == {"Monet": 10, "Degas": 6, None: 4}
    c = split_holdout(ids, artists, 0.2, seed=8)
    assert held != [i for i in ids if c[i] == "holdout"]


@pytest.mark.parametrize("n,frac,expect", [(1, 0.5, 0), (2, 0.1, 1), (10, 0.0, 0), (10, 0.99, 9), (7, 0.3, 2)])
def test_split_edge_sizes(n, frac, expect):
    split = split_holdout([str(i) for i in range(n)], [None] * n, frac, seed=0)
    assert sum(s == "holdout" for s in split.values()) == expect


# ------------------------------------------------------------------------------------- the stage
def _fixture(tmp_path, n=12, holdout=0.25, **caption):
    rows = []
    for i in range(n):
        data = encode_png(Image.new("RGB", (32 + i, 24), (20 * i % 255, 120, 200)))
        rows.append(dict(id=shards.content_id(data), image=data, format="PNG", width=32 + i, height=24,
                         source="synthetic", artist=["Monet", "Degas", None][i % 3],
                         genre="landscape" if i % 2 else None, description=f"scene {i}",
                         caption="a sidecar caption" if i == 0 else None))
    raw = tmp_path / "raw" / "shards"
    shards.write_shards(rows, raw, shard_rows=5)
    kept = [i != 1 for i in range(n)]
    filt = tmp_path / "filter.parquet"
    shards.write_table(pa.table({"id": [r["id"] for r in rows], "kept": kept,
                                 "reason": [None if k else "blur" for k in kept]}), filt)
    raw_p = params.Params().model_dump()
    raw_p["data"].update(shard_rows=4)
    raw_p["caption"].update(caption)
    p = params.validate(raw_p)
    p.data.holdout = holdout  # validate refuses 0 (evaluate needs held-out paintings); the stage copes with it
    paths = Caption(shards=raw, filter=filt, curated=tmp_path / "curated", reports=tmp_path / "reports")
    return p, paths, rows


def test_stage_writes_curated_split_and_reports(tmp_path):
    p, paths, rows = _fixture(tmp_path, export_imagefolder=True)
    stats = stage.run(p, paths)
    cur = paths.curated
    train = shards.read_table(cur / "train")
    hold = shards.read_table(cur / "holdout")
    assert train.schema.equals(shards.IMAGE_SCHEMA) and hold.schema.equals(shards.IMAGE_SCHEMA)
    assert train.num_rows + hold.num_rows == 11 and hold.num_rows == 3  # round(0.25 * 11)
    assert not set(train["id"].to_pylist()) & set(hold["id"].to_pylist())
    assert rows[1]["id"] not in set(train["id"].to_pylist()) | set(hold["id"].to_pylist())  # not kept
    caps = dict(zip(train["id"].to_pylist() + hold["id"].to_pylist(),
                    train["caption"].to_pylist() + hold["caption"].to_pylist()))
    assert caps[rows[0]["id"]] == "a sidecar caption, impressionism style"
    assert caps[rows[2]["id"]] == "scene 2, impressionism style"  # no genre, no artist
    assert caps[rows[3]["id"]] == "scene 3, a landscape painting by Monet, impressionism style"
    assert all(c.endswith("impressionism style") for c in caps.values())
    split = pq.read_table(cur / "split.parquet").to_pydict()
    assert split["split"].count("holdout") == 3 and sorted(split["id"]) == sorted(caps)
    assert len(list((cur / "train").glob("part-*.parquet"))) == 2  # 8 rows, shard_rows=4

    assert stats["images"] == 11 and stats["by_origin"] == {"existing": 1, "template": 10}
    assert stats["clip_truncated"] == 0 and stats["t5_truncated"] == 0
    rep = paths.reports
    assert json.loads((rep / "stats.json").read_text())["by_split"] == {"train": 8, "holdout": 3}
    assert (rep / "lengths.png").stat().st_size > 1000
    preview = (rep / "preview.md").read_text()
    assert preview.count("](thumbs/") == 11 and "scene 3, a landscape painting by Monet" in preview
    assert len(list((rep / "thumbs").glob("*.jpg"))) == 11
    assert len((rep / "captions.csv").read_text().splitlines()) == 12

    # imagefolder export, read back by datasets offline
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(cur / "imagefolder"), cache_dir=str(tmp_path / "hf"))
    assert set(ds) == {"train", "test"} and ds["train"].num_rows == 8 and ds["test"].num_rows == 3
    assert sorted(list(ds["train"]["caption"]) + list(ds["test"]["caption"])) == sorted(caps.values())
    assert ds["train"][0]["image"].size[1] == 24

    # determinism: a rerun gives the same split and the same shard bytes
    before = (cur / "train" / "part-00000.parquet").read_bytes()
    stage.run(p, paths)
    assert (cur / "train" / "part-00000.parquet").read_bytes() == before
    assert pq.read_table(cur / "split.parquet").to_pydict() == split


def test_stage_combined_backend_with_a_stub_describer(tmp_path):
    p, paths, _ = _fixture(tmp_path, n=6, holdout=0.0, backend="combined", keep_existing=False,
                           template="{description}, by {artist}", batch_size=2)
    calls = []

    def describe(images):
        calls.append(len(images))
        return [f"a {im.width}px wide field" for im in images]

    stats = stage.run(p, paths, describe=describe)
    assert calls and max(calls) <= 2 and sum(calls) == 5
    assert stats["by_origin"] == {"combined": 5} and stats["by_split"] == {"train": 5}
    caps = shards.read_table(paths.curated / "train")["caption"].to_pylist()
    assert all(re.match(r"a \d+px wide field, scene \d+(, by \w+)?, impressionism style$", c) for c in caps)
    assert shards.read_table(paths.curated / "holdout").num_rows == 0


def test_stage_rejects_bad_inputs(tmp_path):
    p, paths, rows = _fixture(tmp_path, n=4)
    shards.write_table(pa.table({"id": ["deadbeef"], "kept": [True], "reason": [None]}), paths.filter)
    with pytest.raises(SystemExit, match="not in"):
        stage.run(p, paths)
    shards.write_table(pa.table({"id": [r["id"] for r in rows], "kept": [False] * 4}), paths.filter)
    with pytest.raises(SystemExit, match="kept no images"):
        stage.run(p, paths)
    with pytest.raises(SystemExit, match="filter stage"):
        stage.run(p, replace(paths, filter=tmp_path / "missing.parquet"))
    vlm = params.validate({**p.model_dump(), "caption": {**p.caption.model_dump(), "backend": "vlm"}})
    shards.write_table(pa.table({"id": [r["id"] for r in rows], "kept": [True] * 4}), paths.filter)
    with pytest.raises(SystemExit, match="caption.model"):
        stage.run(vlm, paths)
    assert not paths.curated.exists()


def test_clip_counts_are_open_clips_tokenizer_on_hard_text():
    """Punctuation, accents, case, runs of spaces and over-long text: counted, never truncated."""
    texts = ["Claude Monet's \"Impression, soleil levant\" (1872) — Le Havre!", "naïve café façade, 12 o'clock",
             "UPPER case and    spaces", " ".join(["water lilies"] * 60)]
    clip, _ = tokens.TokenCounter().count(texts)
    assert clip[2] == tokens.TokenCounter().count(["upper case and spaces"])[0][0]  # case and spaces don't count
    assert clip[3] == 2 + 60 * 2  # "water", "lilies": one token each, no cut at 77
    assert all(n > len(t.split()) for n, t in zip(clip[:2], texts))  # punctuation and accents are pieces


def test_user_captions_keep_their_words_get_the_trigger_once_and_repeats_carry_over(tmp_path):
    """What the folder source hands over (caption files, kohya repeats) survives the caption stage."""
    p, paths, rows = _fixture(tmp_path, n=6, holdout=0.0)
    rows[2].update(caption="a haystack at dusk", repeats=10)
    rows[3].update(caption="poplars, Impressionism Style", repeats=3)
    shards.write_shards(rows, paths.shards, shard_rows=5)
    stage.run(p, paths)
    out = {r["id"]: r for r in shards.read_table(paths.curated / "train").to_pylist()}
    assert out[rows[2]["id"]]["caption"] == "a haystack at dusk, impressionism style"
    assert out[rows[3]["id"]]["caption"] == "poplars, Impressionism Style"  # already there: not twice
    assert out[rows[4]["id"]]["caption"].startswith("scene 4")  # no user caption: the template
    assert (out[rows[2]["id"]]["repeats"], out[rows[3]["id"]]["repeats"], out[rows[4]["id"]]["repeats"]) == (10, 3, None)
    p2 = p.model_copy(update={"caption": p.caption.model_copy(update={"keep_existing": False})})
    stage.run(p2, paths)
    out = {r["id"]: r for r in shards.read_table(paths.curated / "train").to_pylist()}
    assert out[rows[2]["id"]]["caption"].startswith("scene 2")  # configured: templates win
