"""The wikiart source on local parquet shards written in huggan/wikiart's exact schema
(``datasets`` features with ClassLabel columns), loaded through the same ``load_dataset`` path."""
import io
import json
import os
import time
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
from PIL import Image

from stages.core import shards
from tests.stagerun import override, write_params
from stages.data import wikiart

# Label orders deliberately differ from huggan/wikiart's: ids must come from the features.
ARTISTS = ["Unknown Artist", "claude-monet", "camille-pissarro", "berthe-morisot", "vincent-van-gogh"]
GENRES = ["portrait", "landscape", "still_life", "Unknown Genre"]
STYLES = ["Baroque", "Post_Impressionism", "Realism", "Impressionism", "Pointillism"]
N_SHARDS, ROWS = 6, 10


def _style(s, i):
    return (s * 3 + i) % len(STYLES)


@pytest.fixture(scope="module")
def fake_wikiart(tmp_path_factory):
    """data/train-0000k-of-00006.parquet, 10 rows each, written by datasets itself."""
    root = tmp_path_factory.mktemp("wikiart")
    (root / "data").mkdir()
    feats = datasets.Features({"image": datasets.Image(), "artist": datasets.ClassLabel(names=ARTISTS),
                               "genre": datasets.ClassLabel(names=GENRES), "style": datasets.ClassLabel(names=STYLES)})
    for s in range(N_SHARDS):
        imgs = []
        for i in range(ROWS):
            arr = np.random.default_rng([s, i]).integers(0, 255, (48, 64, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            imgs.append({"bytes": buf.getvalue(), "path": None})
        ds = datasets.Dataset.from_dict({"image": imgs, "artist": [(s + i) % len(ARTISTS) for i in range(ROWS)],
                                         "genre": [i % len(GENRES) for i in range(ROWS)],
                                         "style": [_style(s, i) for i in range(ROWS)]}, features=feats)
        ds.to_parquet(str(root / "data" / f"train-{s:05d}-of-{N_SHARDS:05d}.parquet"))
    return root


def _cfg(root, **kw):
    return SimpleNamespace(**{"dataset": str(root), "revision": None, "split": "train", "styles": ["Impressionism"],
                              "artists": [], "genres": [], **kw})


def _expected(styles, genres=None):
    return sum(1 for s in range(N_SHARDS) for i in range(ROWS) if STYLES[_style(s, i)] in styles
               and (genres is None or GENRES[i % len(GENRES)] in genres))


def test_style_filter_resolves_labels_through_the_features(fake_wikiart, tmp_path):
    rows = list(wikiart.candidates(_cfg(fake_wikiart), seed=0, limit=None, cache_root=tmp_path))
    assert len(rows) == _expected(["Impressionism"]) > 0
    assert {r["style"] for r in rows} == {"Impressionism"}
    assert {r["artist"] for r in rows} <= {None, "Claude Monet", "Camille Pissarro", "Berthe Morisot",
                                           "Vincent Van Gogh"}
    assert all(r["data"][:2] == b"\xff\xd8" and r["source"] == "wikiart" for r in rows)
    both = list(wikiart.candidates(_cfg(fake_wikiart, styles=["Impressionism", "Post_Impressionism"],
                                        genres=["landscape", "still_life"]), 0, None, tmp_path / "b"))
    assert len(both) == _expected(["Impressionism", "Post_Impressionism"], ["landscape", "still life", "still_life"])
    assert {r["genre"] for r in both} <= {"landscape", "still life"}


def test_limit_is_deterministic_and_reads_few_shards(fake_wikiart, tmp_path):
    a = [r["provenance"] for r in wikiart.candidates(_cfg(fake_wikiart), 3, 3, tmp_path / "a")]
    b = [r["provenance"] for r in wikiart.candidates(_cfg(fake_wikiart), 3, 3, tmp_path / "b")]
    c = [r["provenance"] for r in wikiart.candidates(_cfg(fake_wikiart), 4, 3, tmp_path / "c")]
    assert a == b and len(a) == 3 and a != c
    assert len(list((tmp_path / "a").rglob("*.parquet"))) < N_SHARDS  # a small limit does not read every shard


def test_resume_after_an_interruption_reads_only_the_unfinished_shards(fake_wikiart, tmp_path, monkeypatch):
    full = [r["provenance"] for r in wikiart.candidates(_cfg(fake_wikiart), 5, None, tmp_path / "ref")]
    real_open, opened = wikiart.open_shard, []

    def crash_on_third(dataset, shard, revision, split):
        if len(opened) == 2:
            raise KeyboardInterrupt("simulated interruption")
        opened.append(shard)
        return real_open(dataset, shard, revision, split)

    monkeypatch.setattr(wikiart, "open_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        list(wikiart.candidates(_cfg(fake_wikiart), 5, None, tmp_path / "run"))
    done = list(opened)
    assert len(list((tmp_path / "run").rglob("*.parquet"))) == 2

    def counting(dataset, shard, revision, split):
        opened.append(shard)
        return real_open(dataset, shard, revision, split)

    monkeypatch.setattr(wikiart, "open_shard", counting)
    opened.clear()
    resumed = [r["provenance"] for r in wikiart.candidates(_cfg(fake_wikiart), 5, None, tmp_path / "run")]
    assert resumed == full
    assert len(opened) == N_SHARDS - 2 and not set(opened) & set(done)


def test_unknown_style_names_are_named(fake_wikiart, tmp_path):
    with pytest.raises(SystemExit, match="Impresionism"):
        list(wikiart.candidates(_cfg(fake_wikiart, styles=["Impresionism"]), 0, None, tmp_path))


def test_offline_hub_id_fails_fast_with_a_hint(tmp_path):
    t0 = time.time()
    with pytest.raises(SystemExit) as exc:
        list(wikiart.candidates(_cfg("huggan/wikiart", revision="main"), 0, 5, tmp_path))
    msg = str(exc.value)
    assert "offline" in msg and "data.source=folder" in msg and "synthetic" in msg
    assert time.time() - t0 < 5


def test_the_stage_on_local_wikiart_shards(fake_wikiart, tmp_path, monkeypatch):
    from stages import download

    write_params(tmp_path, "data.source=wikiart", "data.limit=8", override("data.wikiart.dataset", str(fake_wikiart)))
    monkeypatch.chdir(tmp_path)
    download.main()
    first = (tmp_path / "data/raw/shards/part-00000.parquet").read_bytes()
    download.main()  # a rerun (checkpoints in .cache) gives the same shard bytes
    assert (tmp_path / "data/raw/shards/part-00000.parquet").read_bytes() == first
    table = shards.read_table(tmp_path / "data/raw/shards")
    assert table.num_rows == 8 and set(table["style"].to_pylist()) == {"Impressionism"}
    assert all(p.startswith(f"{fake_wikiart}:data/train-") for p in table["provenance"].to_pylist())
    rep = json.loads((tmp_path / "reports/data/download.json").read_text())
    assert rep["stored"] == 8 and rep["source"] == "wikiart"
    assert not (tmp_path / "data/raw/truth.parquet").exists()


def test_offline_stage_exits_with_a_message_not_a_traceback(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    write_params(tmp_path, "data.source=wikiart")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "stages.download"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "data.source=folder" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data/raw").exists()
