"""stages/data/folder.py in process: ``folder.scan`` of the hostile tree of
tests/test_download_hostile.py (which runs the whole stage on it in a subprocess), entry by entry,
and the smaller rules of the folder source. Fast: nothing is decoded."""
import json
import os

import pytest

from stages.core.params import FolderSource
from stages.data import folder
from tests.test_download_hostile import _hostile, _png  # noqa: F401 (_png: below)

OUT = "a symlink that leads outside data.path: not read"


@pytest.fixture(scope="module")
def hostile_scan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-scan")
    root, _ = _hostile(tmp)
    cands, rep = folder.scan(root, max_bytes=150_000)
    return root, {c["path"]: c for c in cands}, rep


def test_every_entry_of_a_hostile_folder_is_classified(hostile_scan):
    root, cands, _ = hostile_scan
    rejects = {p: c["reject"] for p, c in cands.items() if "reject" in c}
    assert rejects == {
        "a-loop.png": ("unreadable", "a symlink loop"), "b-loop.png": ("unreadable", "a symlink loop"),
        "loop.jpg": ("unreadable", "a symlink loop"),
        "cap.png": ("outside_folder", f"caption file cap.txt: {OUT}"),
        "dotdot.png": ("outside_folder", OUT), "notes.txt": ("outside_folder", OUT),
        "out.png": ("outside_folder", OUT), "passwd.jpg": ("outside_folder", OUT),
        "sub2/metadata.csv": ("outside_folder", OUT), "zero.jpg": ("outside_folder", OUT),
        "outdir": ("outside_folder", "a symlink to a folder outside data.path: not read"),
        "fifo-cap.png": ("bad_caption", "fifo-cap.txt: a FIFO: never opened"),
        "pipe.jpg": ("special_file", "a FIFO: never opened"),
        "metadata.csv:3": ("outside_folder", "file_name '../../../etc/passwd' is outside data.path: not read"),
        "metadata.csv:4": ("outside_folder", "file_name '/etc/passwd' is outside data.path: not read"),
        "metadata.csv:5": ("outside_folder", "file_name '../outside/outside.png' is outside data.path: not read"),
        "sub/metadata.jsonl:5": ("outside_folder",
                                 "file_name '../../outside/secret.txt' is outside data.path: not read"),
    }
    # the rest are read, each from its real path inside the folder (big.png and text.jpg are refused
    # later, by the reader: too large / not an image)
    files = {p: os.path.relpath(c["file"], root) for p, c in cands.items() if "reject" not in c}
    assert files == {"big.png": "big.png", "good1.png": "good1.png", "good2.png": "good2.png",
                     "in-link.png": "good1.png", "linked-cap.png": "linked-cap.png", "sub/good3.png": "sub/good3.png",
                     "text.jpg": "text.jpg"}
    assert all(c["source"] == "folder" for c in cands.values())
    assert cands["good2.png"]["provenance"] == "folder:good2.png"


def test_sidecars_and_caption_files_of_a_hostile_folder(hostile_scan):
    _, cands, rep = hostile_scan
    fields = {"title", "artist", "caption"}
    described = {p: {k: c[k] for k in fields if c.get(k)} for p, c in cands.items() if fields & set(c)}
    assert described == {
        "good1.png": {"artist": "Pierre-Auguste Renoir", "title": "Été à Chatou"},  # a cp1252 sidecar
        "in-link.png": {"artist": "Pierre-Auguste Renoir", "title": "Été à Chatou"},  # found by its target
        "sub/good3.png": {"title": "Haystack", "caption": "a haystack in the snow"},
        "linked-cap.png": {"caption": "a haystack in the snow"},  # an inside caption link is followed
    }
    problems = rep["sidecar_problems"]
    assert problems[:3] == ["metadata.csv: not UTF-8 (byte 55), read as cp1252",
                            "sub/metadata.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes)",
                            "sub/metadata.jsonl:3: not a JSON object"]
    try:  # the 5000-digit number: Python's message, cut at 100 characters
        json.loads("9" * 5000)
    except ValueError as exc:
        assert len(str(exc)) > 100 and problems[3] == f"sub/metadata.jsonl:6: not valid JSON ({str(exc)[:100]})"
    assert problems[4:] == ["sub/metadata.jsonl:7: not valid JSON (too deeply nested)"]
    assert rep["ignored_files"] == 1 and rep["ignored_examples"] == [
        "indir (symlink to a folder inside data.path: not followed)"]
    assert rep["with_sidecar_metadata"] == 3 and rep["caption_files"] == 4 and rep["bad_caption_files"] == 1
    assert rep["repeat_folders"] == {"images": 0, "max_repeats": 0}


EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
              ".tga", ".ico", ".jfif")  # the common image extensions Pillow reads


def test_every_image_extension_is_a_candidate_in_any_case(tmp_path):
    for ext in EXTENSIONS:
        (tmp_path / f"x{ext}").write_bytes(b"bytes decide later")
        (tmp_path / f"y{ext.upper()}").write_bytes(b"bytes decide later")
    (tmp_path / "z.svg").write_text("<svg/>")
    cands, rep = folder.scan(tmp_path)
    assert sorted(c["path"] for c in cands) == sorted([f"x{e}" for e in EXTENSIONS] + [f"y{e.upper()}" for e in EXTENSIONS])
    assert rep["ignored_examples"] == ["z.svg"]


def test_every_sidecar_field_is_read_and_others_ignored(tmp_path):
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / "b.png", 2)
    _png(tmp_path / "c.png", 3)
    _png(tmp_path / "d.png", 4)
    _png(tmp_path / "e.png", 5)
    row = {f: f"{f} value" for f in ("title", "artist", "style", "genre", "date", "description", "caption",
                                     "license", "provenance")}
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", **row, "extra": "x", "rating": 5}) + "\n"
        + json.dumps({"file": "b.png", "title": "", "artist": None, "date": 1874}) + "\n"  # other key names
        + json.dumps({"path": "c.png", "title": "C"}) + "\n"
        + json.dumps({"file_name": "d.png", "artist": "D"}) + "\n" + json.dumps({"file_name": "e.png", "caption": "E"})
        + "\n" + json.dumps({"file_name": 7, "title": "no name"}) + "\n" + json.dumps({"title": "no name"}) + "\n")
    cands, rep = folder.scan(tmp_path)
    by = {c["path"]: c for c in cands}
    assert {k: by["a.png"].get(k) for k in row} == row and "extra" not in by["a.png"]
    assert by["a.png"]["provenance"] == "provenance value"  # the sidecar's wins
    assert (by["b.png"]["title"], by["b.png"]["artist"], by["b.png"]["date"]) == (None, None, "1874")
    assert by["c.png"]["title"] == "C" and by["c.png"]["provenance"] == "folder:c.png"
    assert rep["sidecar_problems"] == ["metadata.jsonl:6: a row without a file_name",
                                       "metadata.jsonl:7: a row without a file_name"]
    assert rep["with_sidecar_metadata"] == 4  # a title, an artist or a caption: a, c, d, e (b has only a date)


def test_sidecar_rows_that_name_nothing_or_escape(tmp_path):
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "sub" / "a.png", 1)
    (tmp_path / "sub" / "metadata.csv").write_text(
        "file_name,title\n"
        "a.png,A\n"
        "./a.png,A again\n"           # normalised: the same file
        "missing.png,M\n"
        "..,up\n"
        "C:\\Windows\\x.png,drive\n"
        "../sub/a.png,through the parent\n"
        "nul\x00.png,nul\n")
    (tmp_path / "metadata.csv").write_text("file_name\n..\n")
    cands, rep = folder.scan(tmp_path)
    by = {c["path"]: c for c in cands}
    assert by["sub/a.png"]["title"] == "through the parent"  # inside after normalising: read; the last row wins
    assert {p: c["reject"][0] for p, c in by.items() if "reject" in c} == {
        "metadata.csv:2": "outside_folder", "sub/metadata.csv:6": "outside_folder", "sub/metadata.csv:8": "outside_folder"}
    assert rep["sidecar_problems"] == ["sub/metadata.csv:4: missing.png does not exist",
                                       "sub/metadata.csv:5: .. does not exist"]  # sub/.. is the root: no file


def test_sidecar_encodings_and_malformed_csv(tmp_path):
    assert folder.decode_text("é".encode("utf-8"), "m") == ("é", None)
    assert folder.decode_text(b"\xef\xbb\xbfa", "m") == ("a", None)  # a BOM
    assert folder.decode_text(b"caf\xe9 \x80", "m") == ("café €", "m: not UTF-8 (byte 3), read as cp1252")
    assert folder.decode_text(b"x\x81", "m") == ("x\x81", "m: not UTF-8 (byte 1), read as latin-1")
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / "b.png", 2)
    (tmp_path / "metadata.csv").write_text("file_name,title\na.png,A\nb.png," + "x" * 140_000 + "\nc.png,C\n")
    cands, rep = folder.scan(tmp_path)
    assert [c.get("title") for c in cands] == ["A", None]
    assert len(rep["sidecar_problems"]) == 1 and rep["sidecar_problems"][0].startswith(
        "metadata.csv:2: not valid CSV (field larger than field limit") and rep["sidecar_problems"][0].endswith(
        "the rows after it are skipped")


def test_a_sidecar_over_max_bytes_is_a_problem_not_read(tmp_path):
    _png(tmp_path / "a.png", 1)
    (tmp_path / "metadata.csv").write_text("file_name,title\na.png," + "x" * 200 + "\n")
    cands, rep = folder.scan(tmp_path, max_bytes=100)
    assert "title" not in cands[0]
    assert rep["sidecar_problems"] == ["metadata.csv: 223 bytes > data.max_bytes = 100"]


def test_special_files_are_named(tmp_path, monkeypatch):
    import stat as st

    (tmp_path / "dev").write_bytes(b"")
    real_stat = os.stat
    for mode, kind in ((st.S_IFCHR, "a character device"), (st.S_IFBLK, "a block device"),
                       (st.S_IFSOCK, "a socket"), (st.S_IFIFO, "a FIFO"), (st.S_IFDIR, "not a regular file")):
        monkeypatch.setattr(folder.os, "stat", lambda p, m=mode: os.stat_result((m | 0o644,) + real_stat(p)[1:]))
        entry = folder._classify(str(tmp_path / "dev"), "dev", str(tmp_path))
        monkeypatch.setattr(folder.os, "stat", real_stat)
        assert entry.reject == ("special_file", f"{kind}: never opened") and entry.real is None


def test_captions_are_normalised_and_repeats_can_be_off(tmp_path):
    (tmp_path / "5_set").mkdir()
    _png(tmp_path / "5_set" / "a.png", 1)
    (tmp_path / "5_set" / "a.txt").write_bytes(b"  a\x00field\n\n of  poppies \t")
    cands, rep = folder.scan(tmp_path)
    assert (cands[0]["caption"], cands[0]["repeats"]) == ("a field of poppies", 5)
    assert rep["repeat_folders"] == {"images": 1, "max_repeats": 5}
    cands, rep = folder.scan(tmp_path, FolderSource(repeats=False))
    assert "repeats" not in cands[0] and rep["repeat_folders"] == {"images": 0, "max_repeats": 0}
    assert folder.read_caption(tmp_path / "5_set" / "a.txt", 10) == (None, "a.txt: 25 bytes > data.folder.caption_max_bytes = 10")


def test_dangling_links_and_unlistable_folders_are_named(tmp_path, monkeypatch):
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    cands, _ = folder.scan(tmp_path)
    assert cands == [{"path": "gone.png", "source": "folder", "provenance": "folder:gone.png",
                      "reject": ("unreadable", "a dangling symlink")}]
    real_walk = os.walk

    def walk(top, onerror=None, **kw):  # a folder that cannot be listed (root reads any folder: simulated)
        onerror(PermissionError(13, "Permission denied", str(tmp_path / "locked")))
        yield from real_walk(top, onerror=onerror, **kw)

    monkeypatch.setattr(folder.os, "walk", walk)
    _, _, problems = folder.walk(tmp_path)
    assert problems == [f"{tmp_path / 'locked'}: Permission denied"]
    assert folder.scan(tmp_path)[1]["sidecar_problems"] == problems  # reported with the sidecars' problems
    with pytest.raises(SystemExit) as exc:
        folder.scan(tmp_path / "gone.png")
    assert str(exc.value) == f"data.path = {str(tmp_path / 'gone.png')!r} is not a directory (data.source=folder needs one)"


def test_rows_that_leave_the_folder_even_to_come_back_are_rejects(tmp_path):
    root, out = tmp_path / "pics", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    out.mkdir()
    _png(root / "x.png", 1)
    _png(out / "y.png", 2)
    (out / "metadata.csv").write_text("file_name,title\nx.png,never read\n")
    (root / "a" / "metadata.csv").symlink_to(out / "metadata.csv")  # a rejected sidecar, listed first
    (root / "outdir").symlink_to(out)
    long = "../" + "z" * 300
    (root / "metadata.csv").write_text(f"file_name,title\nx.png,X\n../pics/x.png,out and back\noutdir/y.png,Y\n{long},L\n")
    cands, rep = folder.scan(root)
    by = {c["path"]: c for c in cands}
    assert by["x.png"]["title"] == "X"  # read although a rejected sidecar came before
    assert {p: c["reject"] for p, c in by.items() if "reject" in c} == {
        "a/metadata.csv": ("outside_folder", OUT),
        "outdir": ("outside_folder", "a symlink to a folder outside data.path: not read"),
        "metadata.csv:3": ("outside_folder", "file_name '../pics/x.png' is outside data.path: not read"),
        "metadata.csv:4": ("outside_folder", "file_name 'outdir/y.png' is outside data.path: not read"),
        "metadata.csv:5": ("outside_folder", f"file_name {long[:200]!r} is outside data.path: not read")}
    assert rep["sidecar_problems"] == []


def test_caption_file_problems_are_named(tmp_path):
    (tmp_path / "l.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "e.txt").write_bytes(b" \n\t\x00 ")
    assert folder.read_caption(tmp_path / "l.txt", 100) == (None, "l.txt: not UTF-8 (byte 3: unexpected end of data)")
    assert folder.read_caption(tmp_path / "e.txt", 100) == (None, "e.txt: empty")


def test_the_report_keeps_10_ignored_examples_and_20_sidecar_problems(tmp_path):
    for k in range(12):
        (tmp_path / f"note{k:02d}.doc").write_text("x")
    (tmp_path / "metadata.jsonl").write_text("".join(f'{{"file_name": "gone{k:02d}.png"}}\n' for k in range(22)))
    _, rep = folder.scan(tmp_path)
    assert rep["ignored_files"] == 12 and rep["ignored_examples"] == [f"note{k:02d}.doc" for k in range(10)]
    assert rep["sidecar_problems"] == [f"metadata.jsonl:{k + 1}: gone{k:02d}.png does not exist" for k in range(20)]
