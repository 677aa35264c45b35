"""Download: each normalisation, each reject reason, the folder source with sidecars, reruns."""
import hashlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.core import params, shards
from stages.data import normalize
from stages.data.normalize import Reject
from tests.stagerun import overrides, run_stage, write_params


def _rgb(w=80, h=60, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _bytes(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _norm(data, min_side=32, max_pixels=10**8):
    return normalize.normalize(data, min_side, max_pixels)


def _decoded(n):
    return Image.open(io.BytesIO(n.data))


# --- normalisation -------------------------------------------------------------------------------

def test_rgb_jpeg_png_webp_keep_their_original_bytes():
    for fmt in ("JPEG", "PNG", "WEBP"):
        data = _bytes(_rgb(), fmt)
        n = _norm(data)
        assert n.data == data and not n.reencoded and n.format == fmt and (n.width, n.height) == (80, 60)


def test_cmyk_is_converted_to_rgb_png():
    rgb = Image.new("RGB", (64, 48), (200, 40, 40))
    n = _norm(_bytes(rgb.convert("CMYK"), "JPEG", quality=95))
    img = _decoded(n)
    assert n.reencoded and n.format == "PNG" and img.mode == "RGB"
    assert np.abs(np.asarray(img, int)[20, 20] - [200, 40, 40]).max() < 12


def test_16bit_grayscale_is_scaled_not_clipped():
    arr = np.full((40, 50), 32768, np.uint16)
    arr[:, :10] = 65535
    n = _norm(_bytes(Image.fromarray(arr), "PNG"))
    px = np.asarray(_decoded(n))
    assert _decoded(n).mode == "RGB" and tuple(px[0, 0]) == (255, 255, 255) and abs(int(px[0, 30, 0]) - 128) <= 1


def test_16bit_rgb_png_is_reencoded_as_8bit():
    import struct
    import zlib

    h, w = 40, 40
    raw = b"".join(b"\x00" + np.full((w, 3), 40000, ">u2").tobytes() for _ in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    n = _norm(png)
    assert n.reencoded and "16-bit" in n.note and _decoded(n).mode == "RGB"
    assert n.data[24] == 8


def test_palette_with_alpha_and_la_are_composited_on_white():
    p = Image.new("P", (40, 40), 0)
    p.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    p.paste(1, (0, 0, 20, 40))
    n = _norm(_bytes(p, "PNG", transparency=0))
    px = np.asarray(_decoded(n))
    assert tuple(px[5, 5]) == (0, 0, 255) and tuple(px[5, 30]) == (255, 255, 255)
    la = Image.new("LA", (40, 40), (0, 0))
    assert tuple(np.asarray(_decoded(_norm(_bytes(la, "PNG"))))[0, 0]) == (255, 255, 255)
    grey = _decoded(_norm(_bytes(Image.new("L", (40, 40), 90), "PNG")))
    assert grey.mode == "RGB" and tuple(np.asarray(grey)[0, 0]) == (90, 90, 90)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    n = _norm(_bytes(_rgb(80, 40), "JPEG", exif=exif.tobytes()))
    assert n.reencoded and (n.width, n.height) == (40, 80) and _decoded(n).size == (40, 80)


def test_first_frame_of_an_animation():
    frames = [Image.new("RGB", (40, 40), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = _bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    n = _norm(data)
    assert n.reencoded and "3 frames" in n.note
    r, g, b = np.asarray(_decoded(n))[10, 10]
    assert r > 200 and g < 50 and b < 50


def test_non_srgb_icc_profile_is_converted_and_dropped():
    from PIL import ImageCms

    img = Image.new("RGB", (64, 48), (120, 60, 30))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert not _norm(_bytes(img, "JPEG", icc_profile=srgb)).reencoded  # sRGB-tagged: kept as is
    xyz = ImageCms.ImageCmsProfile(ImageCms.createProfile("XYZ")).tobytes()
    n = _norm(_bytes(img, "JPEG", icc_profile=xyz))
    assert n.reencoded and "ICC" in n.note and "icc_profile" not in _decoded(n).info


@pytest.mark.parametrize("case,reason", [
    ("empty", "empty"), ("text", "not_image"), ("truncated", "truncated"), ("small", "too_small"),
    ("bomb", "decompression_bomb"),
])
def test_reject_reasons(case, reason):
    jpg = _bytes(_rgb(200, 150), "JPEG")
    data = {"empty": b"", "text": b"hello, I am not a picture\n" * 10, "truncated": jpg[: len(jpg) // 2],
            "small": _bytes(_rgb(20, 100), "PNG"), "bomb": _bytes(_rgb(200, 150), "PNG")}[case]
    with pytest.raises(Reject) as exc:
        _norm(data, min_side=32, max_pixels=20_000 if case == "bomb" else 10**8)
    assert exc.value.reason == reason and exc.value.detail


def test_unreadable_paths_are_rejects_not_crashes(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    for path in (tmp_path / "dir.jpg", tmp_path / "missing.png"):
        row = normalize.process({"path": str(path)}, 32, 10**8)
        assert row["ok"] is False and row["reason"] == "unreadable" and row["id"] is None


# --- the folder source through the stage -----------------------------------------------------------

def _make_folder(root):
    (root / "sub dir").mkdir(parents=True)
    _rgb(120, 90, 1).save(root / "Café Monet – été 1.jpg", quality=90)
    _rgb(120, 90, 2).save(root / "sub dir" / "b.png")
    (root / "sub dir" / "copy of b.png").write_bytes((root / "sub dir" / "b.png").read_bytes())
    Image.new("RGB", (100, 80), (10, 200, 30)).convert("CMYK").save(root / "cmyk.jpg")
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("not an image")
    _rgb(10, 10, 3).save(root / "tiny.png")
    jpg = _bytes(_rgb(200, 150, 4), "JPEG")
    (root / "cut.jpg").write_bytes(jpg[: len(jpg) // 3])
    (root / "broken-link.png").symlink_to(root / "nowhere.png")
    (root / "README.txt").write_text("ignored, but counted")
    with open(root / "metadata.csv", "w", encoding="utf-8") as fh:
        fh.write("file_name,title,artist,style,caption\n")
        fh.write("Café Monet – été 1.jpg,Été,Claude Monet,Impressionism,a summer field\n")
        fh.write("gone.jpg,Lost,Nobody,,\n")
    with open(root / "sub dir" / "metadata.jsonl", "w", encoding="utf-8") as fh:
        row = {"file_name": "b.png", "title": "Boats", "artist": "Berthe Morisot", "genre": "marina"}
        fh.write(json.dumps(row) + "\n")


def _run_stage(workdir, data_overrides):
    from stages import download

    workdir.mkdir(exist_ok=True)
    write_params(workdir, *overrides("data", data_overrides))
    run_stage(download.main, workdir)
    return workdir


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    src = tmp_path_factory.mktemp("images")
    _make_folder(src)
    work = tmp_path_factory.mktemp("work")
    return src, _run_stage(work, {"source": "folder", "path": str(src), "workers": 2})


def test_folder_rows_metadata_and_rejects(folder_run):
    src, work = folder_run
    rows = {os.path.basename(r["path"]): r for r in shards.read_table(work / "data/raw/shards").to_pylist()}
    assert set(rows) == {"Café Monet – été 1.jpg", "b.png", "cmyk.jpg"}
    cafe = rows["Café Monet – été 1.jpg"]
    assert (cafe["title"], cafe["artist"], cafe["style"], cafe["caption"]) == ("Été", "Claude Monet", "Impressionism",
                                                                               "a summer field")
    assert cafe["image"] == (src / "Café Monet – été 1.jpg").read_bytes()  # original bytes kept
    assert cafe["id"] == hashlib.sha256(cafe["image"]).hexdigest()
    assert (rows["b.png"]["artist"], rows["b.png"]["genre"]) == ("Berthe Morisot", "marina")
    assert rows["cmyk.jpg"]["format"] == "PNG" and rows["cmyk.jpg"]["source"] == "folder"
    rejects = {os.path.basename(r["path"]): r for r in pq.read_table(work / "data/raw/rejects.parquet").to_pylist()}
    assert {k: v["reason"] for k, v in rejects.items()} == {
        "copy of b.png": "duplicate_bytes", "empty.jpg": "empty", "notes.jpg": "not_image", "tiny.png": "too_small",
        "cut.jpg": "truncated", "broken-link.png": "unreadable"}
    assert rejects["copy of b.png"]["id"] == rows["b.png"]["id"]


def test_folder_report_accounts_for_every_file(folder_run):
    _, work = folder_run
    rep = json.loads((work / "reports/data/download.json").read_text())
    assert rep["candidates"] == 9 == rep["stored"] + rep["rejected"]
    assert rep["rejects_by_reason"]["duplicate_bytes"] == 1 and rep["rejects_by_reason"]["decode_error"] == 0
    assert rep["ignored_files"] == 1 and rep["reencoded_png"] == 1
    assert any("gone.jpg" in p for p in rep["sidecar_problems"])


def test_rerun_is_byte_identical_whatever_the_workers(folder_run, tmp_path):
    src, work = folder_run
    again = _run_stage(tmp_path / "again", {"source": "folder", "path": str(src), "workers": 1})
    for rel in ("data/raw/shards/part-00000.parquet", "data/raw/rejects.parquet"):
        assert (work / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_folder_limit_is_a_seeded_sample(folder_run, tmp_path):
    src, _ = folder_run
    work = _run_stage(tmp_path / "lim", {"source": "folder", "path": str(src), "limit": 4})
    rep = json.loads((work / "reports/data/download.json").read_text())
    assert rep["candidates"] == 4


def test_missing_folder_fails_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="not a directory"):
        _run_stage(tmp_path / "w", {"source": "folder", "path": str(tmp_path / "nope")})


# --- trainer conventions: caption files, kohya repeat folders, bad caption files ----------------------

def _make_trainer_folder(root):
    (root / "10_monet" / "nested").mkdir(parents=True)
    (root / "bad").mkdir()
    _rgb(90, 90, 11).save(root / "10_monet" / "0001.png")
    (root / "10_monet" / "0001.txt").write_text("a haystack at dusk\n", encoding="utf-8")
    _rgb(90, 90, 12).save(root / "10_monet" / "nested" / "0002.png")
    (root / "10_monet" / "nested" / "0002.caption").write_text("  a row of poplars,\n  impressionism style ")
    _rgb(90, 90, 13).save(root / "0003.png")
    (root / "0003.txt").write_bytes("\ufeffles coquelicots".encode("utf-8"))  # a BOM is fine
    with open(root / "metadata.csv", "w", encoding="utf-8") as fh:
        fh.write("file_name,title,caption\n0003.png,Poppies,a sidecar caption\n")
    _rgb(90, 90, 14).save(root / "0004.png")  # no caption file: templates later
    for k, (name, data) in enumerate((("empty", b" \n\t "), ("latin", "café".encode("latin-1")), ("huge", b"x" * 40000))):
        _rgb(90, 90, 20 + k).save(root / "bad" / f"{name}.png")
        (root / "bad" / f"{name}.txt").write_bytes(data)
    (root / "orphan.txt").write_text("a caption without its image")


@pytest.fixture(scope="module")
def trainer_folder(tmp_path_factory):
    src = tmp_path_factory.mktemp("trainer-images")
    _make_trainer_folder(src)
    return src, _run_stage(tmp_path_factory.mktemp("trainer-work"), {"source": "folder", "path": str(src)})


def test_caption_files_and_repeat_folders_are_read(trainer_folder):
    _, work = trainer_folder
    rows = {r["path"]: r for r in shards.read_table(work / "data/raw/shards").to_pylist()}
    assert set(rows) == {"10_monet/0001.png", "10_monet/nested/0002.png", "0003.png", "0004.png"}
    assert rows["10_monet/0001.png"]["caption"] == "a haystack at dusk"
    assert rows["10_monet/nested/0002.png"]["caption"] == "a row of poplars, impressionism style"
    assert rows["0003.png"]["caption"] == "les coquelicots"  # the caption file wins over the sidecar
    assert rows["0003.png"]["title"] == "Poppies"  # the sidecar's other fields stay
    assert rows["0004.png"]["caption"] is None
    assert {p: r["repeats"] for p, r in rows.items()} == {"10_monet/0001.png": 10, "10_monet/nested/0002.png": 10,
                                                           "0003.png": None, "0004.png": None}


def test_bad_caption_files_are_recorded_rejects(trainer_folder):
    _, work = trainer_folder
    rejects = {r["path"]: r for r in pq.read_table(work / "data/raw/rejects.parquet").to_pylist()}
    assert {p: r["reason"] for p, r in rejects.items()} == {f"bad/{n}.png": "bad_caption" for n in ("empty", "latin", "huge")}
    assert "empty" in rejects["bad/empty.png"]["detail"]
    assert "not UTF-8" in rejects["bad/latin.png"]["detail"]
    assert "40000 bytes > data.folder.caption_max_bytes" in rejects["bad/huge.png"]["detail"]
    rep = json.loads((work / "reports/data/download.json").read_text())
    assert rep["candidates"] == 7 and rep["rejects_by_reason"]["bad_caption"] == 3
    assert rep["caption_files"] == 6 and rep["bad_caption_files"] == 3
    assert rep["ignored_files"] == 1 and "caption file without an image" in rep["ignored_examples"][0]
    assert rep["repeat_folders"] == {"images": 2, "max_repeats": 10}
    assert rep["with_sidecar_metadata"] == 1  # 0003.png; caption files are counted apart


def test_folder_conventions_are_configurable(trainer_folder, tmp_path):
    src, _ = trainer_folder
    work = _run_stage(tmp_path / "w", {"source": "folder", "path": str(src),
                                       "folder": {"caption_extensions": [".caption"], "repeats": False,
                                                  "caption_max_bytes": 100000}})
    rows = {r["path"]: r for r in shards.read_table(work / "data/raw/shards").to_pylist()}
    assert rows["10_monet/0001.png"]["caption"] is None and rows["10_monet/0001.png"]["repeats"] is None
    assert rows["10_monet/nested/0002.png"]["caption"] == "a row of poplars, impressionism style"
    assert rows["0003.png"]["caption"] == "a sidecar caption"  # no .txt reading: the sidecar's caption
    assert "bad/huge.png" in rows  # .txt files are not captions now
    with pytest.raises(params.ParamsError, match="start with a dot"):
        params.validate({"data": {"folder": {"caption_extensions": ["txt"]}}})


def test_repeats_of_nearest_kohya_folder():
    from pathlib import Path

    from stages.data.folder import repeats_of

    assert repeats_of(Path("10_monet/a.png")) == 10
    assert repeats_of(Path("3_outer/5_inner/a.png")) == 5
    assert repeats_of(Path("0_zero/a.png")) is None and repeats_of(Path("monet_10/a.png")) is None
    assert repeats_of(Path("a.png")) is None


def test_a_folder_without_usable_images_leaves_data_raw_as_it_was(folder_run, tmp_path):
    import shutil

    _, work = folder_run
    shutil.copytree(work, tmp_path / "w")
    before = (tmp_path / "w/data/raw/shards/part-00000.parquet").read_bytes()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "empty.jpg").write_bytes(b"")  # an image by name (preflight passes), none by content
    with pytest.raises(SystemExit, match="no image was stored .* left as it was"):
        _run_stage(tmp_path / "w", {"source": "folder", "path": str(broken)})
    assert (tmp_path / "w/data/raw/shards/part-00000.parquet").read_bytes() == before
    assert [p.name for p in (tmp_path / "w/data").iterdir()] == ["raw"]  # no temp folder left
