"""stages/data/folder.py in process: ``folder.scan`` of the hostile tree of
tests/test_download_hostile.py (which runs the whole stage on it in a subprocess), entry by entry,
and the smaller rules of the folder source. Fast: nothing is decoded."""
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
    assert problems[3].startswith("sub/metadata.jsonl:6: not valid JSON (") and len(problems[3]) < 160  # the 5000 digits
    assert problems[4:] == ["sub/metadata.jsonl:7: not valid JSON (too deeply nested)"]
    assert rep["ignored_files"] == 1 and rep["ignored_examples"] == [
        "indir (symlink to a folder inside data.path: not followed)"]
    assert rep["with_sidecar_metadata"] == 3 and rep["caption_files"] == 4 and rep["bad_caption_files"] == 1
    assert rep["repeat_folders"] == {"images": 0, "max_repeats": 0}
