"""The folder source on a hostile folder: symlinks in and out, a loop, a FIFO, a link to /dev/zero,
bad sidecars, Latin-1, traversal rows, malformed JSON lines. Every good image is kept, every bad
entry is a reject with a reason, nothing outside the folder is read, and the stage ends in bounded time."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, PngImagePlugin

from stages.core import shards
from stages.data import folder
from tests.stagerun import overrides, write_params

REPO = Path(__file__).resolve().parents[1]
MARKER = "ZZ-OUTSIDE-MARKER-7f3a9c"  # in every outside file: must appear in no output byte


def _png(path: Path, seed: int, size=(90, 90), text: str | None = None) -> None:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    info = PngImagePlugin.PngInfo()
    if text:
        info.add_text("Comment", text)
    img.save(path, pnginfo=info)


def _hostile(tmp: Path) -> tuple[Path, Path]:
    root, out = tmp / "pics", tmp / "outside"
    (root / "sub").mkdir(parents=True)
    (root / "sub2").mkdir()
    out.mkdir()
    (out / "secret.txt").write_text(f"root:x:0:0:{MARKER}\n")
    _png(out / "outside.png", 99, text=MARKER)  # a valid image: still never read
    (out / "metadata.csv").write_text(f"file_name,caption\n../pics/good1.png,{MARKER}\n")
    # good entries
    _png(root / "good1.png", 1)
    _png(root / "good2.png", 2)
    _png(root / "sub" / "good3.png", 3)
    (root / "sub" / "good3.txt").write_text("a haystack in the snow")
    _png(root / "linked-cap.png", 4)
    (root / "linked-cap.txt").symlink_to(root / "sub" / "good3.txt")  # an inside link: followed
    (root / "in-link.png").symlink_to(root / "good1.png")  # inside: read, a byte duplicate of good1
    (root / "indir").symlink_to(root / "sub")  # an inside folder link: not descended
    # escaping entries
    (root / "out.png").symlink_to(out / "outside.png")
    (root / "passwd.jpg").symlink_to(out / "secret.txt")
    (root / "notes.txt").symlink_to(out / "secret.txt")
    _png(root / "cap.png", 5)
    (root / "cap.txt").symlink_to(out / "secret.txt")
    (root / "outdir").symlink_to(out)
    (root / "sub2" / "metadata.csv").symlink_to(out / "metadata.csv")
    (root / "zero.jpg").symlink_to("/dev/zero")
    (root / "dotdot.png").symlink_to("../outside/outside.png")
    # entries that must neither crash nor hang
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    (root / "a-loop.png").symlink_to(root / "b-loop.png")
    (root / "b-loop.png").symlink_to(root / "a-loop.png")
    os.mkfifo(root / "pipe.jpg")
    os.mkfifo(root / "fifo-cap.txt")
    _png(root / "fifo-cap.png", 6)
    (root / "text.jpg").write_text("INSIDE-TEXT-9d1e not a picture")  # not_image: no bytes of it in rejects
    big = root / "big.png"
    _png(big, 7, size=(400, 400))  # ~480 kB > data.max_bytes below
    # sidecars: Latin-1 CSV with traversal rows, malformed JSON lines
    (root / "metadata.csv").write_bytes(
        "file_name,artist,title\n"
        "good1.png,Pierre-Auguste Renoir,Été à Chatou\n"
        "../../../etc/passwd,x,y\n"
        "/etc/passwd,x,y\n"
        "../outside/outside.png,x,y\n"
        "indir/good3.png,Berthe Morisot,\n".encode("latin-1"))
    (root / "sub" / "metadata.jsonl").write_text(
        '{"file_name": "good3.png", "title": "Haystack"}\n{"file_name": "good3.png", \n[1, 2]\n\n'
        '{"file_name": "../../outside/secret.txt"}\n'
        '{"file_name": "good3.png", "n": ' + "9" * 5000 + '}\n' + "[" * 100_000 + "\n", encoding="utf-8")
    return root, out


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    root, _ = _hostile(tmp)
    work = tmp / "work"
    work.mkdir()
    write_params(work, *overrides("data", {"source": "folder", "path": str(root), "workers": 2,
                                           "max_bytes": 150_000}))
    env = {**os.environ, "FLUXIMP_MLFLOW": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "stages.download"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=180)  # a FIFO or /dev/zero read would hang or exhaust memory
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, work, proc.stdout + proc.stderr


def test_every_good_image_is_kept(hostile_run):
    _, work, _ = hostile_run
    rows = {r["path"]: r for r in shards.read_table(work / "data/raw/shards").to_pylist()}
    assert set(rows) == {"good1.png", "good2.png", "sub/good3.png", "linked-cap.png"}
    assert (rows["good1.png"]["artist"], rows["good1.png"]["title"]) == ("Pierre-Auguste Renoir", "Été à Chatou")
    assert rows["sub/good3.png"]["caption"] == rows["linked-cap.png"]["caption"] == "a haystack in the snow"
    assert rows["sub/good3.png"]["title"] == "Haystack"


def test_every_bad_entry_is_a_reject_with_a_reason(hostile_run):
    _, work, _ = hostile_run
    rejects = {r["path"]: r for r in pq.read_table(work / "data/raw/rejects.parquet").to_pylist()}
    assert {p: r["reason"] for p, r in rejects.items()} == {
        "in-link.png": "duplicate_bytes",
        "out.png": "outside_folder", "passwd.jpg": "outside_folder", "notes.txt": "outside_folder",
        "cap.png": "outside_folder", "outdir": "outside_folder", "sub2/metadata.csv": "outside_folder",
        "zero.jpg": "outside_folder", "dotdot.png": "outside_folder",
        "metadata.csv:3": "outside_folder", "metadata.csv:4": "outside_folder", "metadata.csv:5": "outside_folder",
        "sub/metadata.jsonl:5": "outside_folder",
        "loop.jpg": "unreadable", "a-loop.png": "unreadable", "b-loop.png": "unreadable",
        "pipe.jpg": "special_file", "fifo-cap.png": "bad_caption", "big.png": "too_large", "text.jpg": "not_image"}
    assert all(r["detail"] for r in rejects.values())
    assert "caption file cap.txt" in rejects["cap.png"]["detail"]
    assert "loop" in rejects["loop.jpg"]["detail"] and "FIFO" in rejects["pipe.jpg"]["detail"]
    assert "data.max_bytes = 150000" in rejects["big.png"]["detail"]
    assert not any("INSIDE-TEXT" in r["detail"] for r in rejects.values())
    rep = json.loads((work / "reports/data/download.json").read_text())
    assert rep["stored"] == 4 and rep["rejected"] == len(rejects)
    problems = " | ".join(rep["sidecar_problems"])
    assert "metadata.csv: not UTF-8 (byte" in problems and "read as cp1252" in problems
    assert "sub/metadata.jsonl:2: not valid JSON" in problems and "sub/metadata.jsonl:3: not a JSON object" in problems
    assert "sub/metadata.jsonl:6: not valid JSON" in problems  # a 5000-digit number
    assert "sub/metadata.jsonl:7: not valid JSON (too deeply nested)" in problems
    assert any(e.startswith("indir (symlink to a folder inside") for e in rep["ignored_examples"])


def test_nothing_outside_the_folder_is_read(hostile_run):
    _, work, output = hostile_run
    assert MARKER not in output
    for f in work.rglob("*"):
        if f.is_file():
            assert MARKER.encode() not in f.read_bytes(), f
        if f.suffix == ".parquet":  # compressed: look in every decoded cell too
            for row in pq.read_table(f).to_pylist():
                for v in row.values():
                    assert MARKER.encode() not in (v if isinstance(v, bytes) else str(v).encode()), f


def test_an_inside_sidecar_row_through_a_folder_link_finds_its_image(tmp_path):
    (tmp_path / "real").mkdir()
    _png(tmp_path / "real" / "x.png", 1)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "metadata.csv").write_text("file_name,artist\nlink/x.png,Berthe Morisot\n")
    cands, rep = folder.scan(tmp_path)
    assert [(c["path"], c["artist"]) for c in cands] == [("real/x.png", "Berthe Morisot")]
    assert rep["sidecar_problems"] == []


def test_first_caption_extension_wins_and_the_other_is_not_an_orphan(tmp_path):
    from stages.core.params import FolderSource

    _png(tmp_path / "a.png", 1)
    (tmp_path / "a.txt").write_text("from the txt")
    (tmp_path / "a.caption").write_text("from the caption")
    (tmp_path / "b.caption").write_text("no image")
    cands, rep = folder.scan(tmp_path)
    assert [c.get("caption") for c in cands] == ["from the txt"]
    assert rep["ignored_examples"] == ["a.caption (caption file not used: an earlier "
                                       "data.folder.caption_extensions entry won)",
                                       "b.caption (caption file without an image)"]
    cands, _ = folder.scan(tmp_path, FolderSource(caption_extensions=[".caption", ".txt"]))
    assert [c.get("caption") for c in cands] == ["from the caption"]


def test_read_bytes_refuses_special_and_oversized_files(tmp_path):
    from stages.data.normalize import Reject, read_bytes

    os.mkfifo(tmp_path / "p")
    with pytest.raises(Reject, match="never read") as exc:
        read_bytes(tmp_path / "p", 10)
    assert exc.value.reason == "special_file"
    (tmp_path / "f").write_bytes(b"x" * 11)
    with pytest.raises(Reject) as exc:
        read_bytes(tmp_path / "f", 10)
    assert exc.value.reason == "too_large"
    assert read_bytes(tmp_path / "f", 11) == b"x" * 11
    (tmp_path / "l").symlink_to(tmp_path / "f")
    with pytest.raises(Reject, match="not followed"):
        read_bytes(tmp_path / "l", 11)
