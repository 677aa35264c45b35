"""Atomic outputs (stages/core/io.py): one write path (temp sibling, umask mode, fsync, rename), a
failure mid-write leaves the old bytes, and no stage writes a tracked output around it."""
import os
import re
from pathlib import Path

import pytest

from stages.core import io
from stages.core.params import ROOT


class Crash(Exception):
    pass


@pytest.fixture
def old(tmp_path):
    target = tmp_path / "metrics.json"
    io.write_json(target, {"fid": 1.0})
    return target


def test_write_bytes_goes_through_a_synced_temp_sibling_then_a_rename(tmp_path, monkeypatch):
    target = tmp_path / "reports/out.bin"
    calls = []
    real_replace, real_fsync = os.replace, os.fsync

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", str(src), Path(src).read_bytes(), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "fsync", fsync)
    monkeypatch.setattr(io.os, "replace", replace)
    io.write_bytes(target, b"new bytes")
    assert target.read_bytes() == b"new bytes"
    (_, synced), (_, src, content, dst) = calls
    assert synced == src and Path(src).parent == target.parent and Path(src).name.startswith(".out.bin.")
    assert content == b"new bytes" and dst == str(target)  # complete before the rename
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]


def test_a_failure_mid_write_leaves_the_old_bytes(old, monkeypatch):
    before = old.read_bytes()

    def fail(fd):  # the data is written, the flush to the disk fails (EIO, a yanked disk)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(io.os, "fsync", fail)
    with pytest.raises(OSError, match="Input/output"):
        io.write_json(old, {"fid": 2.0, "kid": 0.1})
    assert old.read_bytes() == before
    assert [p.name for p in old.parent.iterdir()] == ["metrics.json"]  # no temp file left


def test_a_failed_rename_leaves_the_old_bytes(old, monkeypatch):
    before = old.read_bytes()
    monkeypatch.setattr(io.os, "replace", lambda *a: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        io.write_text(old, "half")
    assert old.read_bytes() == before
    assert [p.name for p in old.parent.iterdir()] == ["metrics.json"]


def test_a_crash_in_the_serializer_leaves_the_old_bytes(old):
    before = old.read_bytes()
    with pytest.raises(TypeError, match="not JSON serialisable"):
        io.write_json(old, {"fid": 2.0, "bad": object()})
    assert old.read_bytes() == before


def test_atomic_file_syncs_before_the_rename_and_keeps_the_old_bytes_on_a_crash(old, monkeypatch):
    before = old.read_bytes()
    with pytest.raises(Crash):
        with io.atomic_file(old) as tmp:
            tmp.write_text('{"fid": 2')  # half a file, then the writer dies
            raise Crash
    assert old.read_bytes() == before
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    with io.atomic_file(old) as tmp:
        tmp.write_text("{}")
    assert synced and old.read_text() == "{}"


def test_a_checkpoint_meta_json_and_the_loss_log_survive_a_failed_rewrite(tmp_path, monkeypatch):
    """mark_finished rewrites meta.json in place and a resumed run rewrites loss.tsv: both atomically."""
    import torch

    from stages.models import checkpoint as ckpt
    from stages.train import LossLog

    class Fake:
        def state_dict(self):
            return {"lora": {"a": torch.zeros(2)}, "optimizer": {}, "scheduler": {}}

    ckpt.save(tmp_path / "ck", Fake(), 3, {"x": 1}, keep=2)
    meta = tmp_path / "ck/step-000003/meta.json"
    loss = tmp_path / "loss.tsv"
    log = LossLog(loss, 0)
    for step in (1, 2, 3, 4):
        log({"loss": 0.5, "lr": 1e-2, "grad_norm": 1.0}, step)
    with open(loss, "a") as fh:
        fh.write("5\t0.4")  # a row cut short by a kill
    before = meta.read_bytes(), loss.read_bytes()
    monkeypatch.setattr(io.os, "fsync", lambda fd: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        ckpt.mark_finished(tmp_path / "ck", 3)
    with pytest.raises(Crash):
        LossLog(loss, 3)
    assert (meta.read_bytes(), loss.read_bytes()) == before
    monkeypatch.undo()
    kept = LossLog(loss, 5)  # the cut row is dropped, complete ones kept
    assert [r["step"] for r in kept.kept] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- no writer around io
RAW = re.compile(r"(?<!\bio)\.write_text\(|(?<!\bio)\.write_bytes\(|open\([^)]*['\"][wax]b?\+?['\"]|"
                 r"(?<!tensorfiles)(?<!ckpt)\.save\(|json\.dump\(|"
                 r"to_csv\(|pq\.write_table\(|save_file\(|savefig\(|torch\.save\(|save_pretrained\(|save_model\(")
# every raw write in stages/ (outside io.py) and why it is safe: it writes into a temp file or folder
# of io.atomic_file/atomic_dir (renamed into place when complete), into memory, or outside the outputs
ALLOWED = {
    ("stages/core/secrets.py", 'tmp.write_text(clean, encoding="utf-8")'): "a temp sibling, renamed over the file",
    ("stages/core/stagecache.py", "Path(tmp).write_bytes(payload)"): "atomic_file",
    ("stages/core/stagecache.py", 'Path(tmp).write_text(json.dumps({"key": key'): "atomic_file",
    ("stages/metrics/operating_point.py", "fig.savefig(tmp, dpi=100"): "atomic_file",
    ("stages/sample.py", 'img.save(buf, format="PNG")'): "into memory",
    ("stages/sample.py", "(tmp / name).write_bytes(pngs[scale][k])"): "atomic_dir",
    ("stages/train.py", "checkpoints.save(done)"): "not a file write: stages.models.checkpoint.save (atomic_dir)",
    ("stages/caption.py", "(folder / name).write_bytes("): "imagefolder export inside atomic_dir(paths.curated)",
    ("stages/caption.py", '(folder / "metadata.jsonl").write_text('): "same",
    ("stages/caption.py", 'open(out / "captions.csv", "w"'): "write_reports(out) gets atomic_dir(paths.reports)",
    ("stages/caption.py", 'fig.savefig(out / "lengths.png"'): "same",
    ("stages/caption.py", "img.save(buf,"): "into memory",
    ("stages/caption.py", '(out / "thumbs" /'): "inside atomic_dir(paths.reports)",
    ("stages/sample.py", "img.save(tmp / name)"): "atomic_dir",
    ("stages/sample.py", ".save(tmp / name)"): "atomic_dir",
    ("stages/publish.py", '(tmp / "metrics.json").write_text('): "atomic_dir",
    ("stages/publish.py", '(tmp / "params.yaml").write_text('): "atomic_dir",
    ("stages/publish.py", '(tmp / "README.md").write_text('): "atomic_dir",
    ("stages/metrics/report.py", 'open(tmp, "w", newline="")'): "atomic_file",
    ("stages/metrics/report.py", "fig.savefig(tmp,"): "atomic_file",
    ("stages/metrics/ab.py", "img.save(tmp,"): "atomic_file",
    ("stages/models/quant_cache.py", "save_file(tensors, _block_file("): "cache entry inside atomic_dir",
    ("stages/models/render.py", "save_file({"): "atomic_file",
    ("stages/models/flux.py", "pipe.save_pretrained(path,"): "the tiny model cache, built into atomic_dir",
    ("stages/models/checkpoint.py", 'save_file(state.pop("lora"), tmp'): "atomic_dir",
    ("stages/models/checkpoint.py", "torch.save({**state"): "atomic_dir",
    ("stages/models/clip.py", "(folder / f\"{TINY_NAME}.json\").write_text("): "a private mkdtemp, not an output",
    ("stages/models/validation.py", "img.save(tmp,"): "atomic_file",
    ("stages/models/streaming.py", "convert .bin weights with save_pretrained("): "a message",
    ("stages/dedupe.py", '.save(tmp / "largest_clusters.png")'): "atomic_dir",
    ("stages/data/report.py", 'fig.savefig(buf,'): "into memory",
    ("stages/data/report.py", "path.write_bytes(buf.getvalue())"): "figures inside atomic_dir(out / 'figures')",
    ("stages/data/report.py", 'open(tmp, "w", newline="")'): "atomic_file",
    ("stages/data/report.py", '.save(tmp / "contact_sheet.png")'): "atomic_dir",
    ("stages/encode.py", "save_file({"): "atomic_dir",
    ("stages/filter.py", 'fig.savefig(fig_dir / "scores.png"'): "fig_dir is atomic_dir(reports/filter/figures)",
    ("stages/filter.py", "sheet.save(fig_dir / name)"): "same",
    ("stages/sweep.py", "fig.savefig(tmp,"): "atomic_file",
    ("stages/core/log.py", 'open(os.devnull, "w")'): "not a file",
    ("stages/core/images.py", "img.save(buf,"): "into memory",
    ("stages/core/images.py", '.save(buf, format="JPEG"'): "into memory",
    ("stages/core/registry.py", "mlflow.diffusers.save_model("): "a TemporaryDirectory logged to MLflow",
    ("stages/core/registry.py", "mlmodel.write_text("): "same",
    ("stages/core/tensorfiles.py", "save_file(tensors, str(path)"): "the safetensors wrapper: callers pass temp paths",
    ("stages/core/tracking.py", "path.write_text(text,"): "a scrubbed copy in a TemporaryDirectory",
    ("stages/core/shards.py", "pq.write_table(table, tmp,"): "atomic_file",
    ("stages/train.py", 'open(self.path, "a")'): "loss.tsv appended per step; a resume rewrites it atomically "
                                                  "and drops a row cut short",
}


def raw_writes() -> list[tuple[str, str]]:
    found = []
    for f in sorted((ROOT / "stages").rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        if rel == "stages/core/io.py":
            continue
        for line in f.read_text().splitlines():
            if RAW.search(line) and not line.lstrip().startswith(("def ", "#")):
                found.append((rel, line.strip()))
    return found


def test_every_raw_write_in_stages_is_into_a_temp_path_or_memory():
    unexplained = [(f, line) for f, line in raw_writes()
                   if not any(f == af and snippet in line for af, snippet in ALLOWED)]
    assert not unexplained, ("write outputs through stages.core.io (write_bytes/write_text/write_json, "
                             f"atomic_file, atomic_dir), or explain in ALLOWED why it is safe: {unexplained}")


# ----------------------------------------------------------------------------- the helpers around it
def test_json_values_numpy_torch_and_paths(tmp_path):
    import numpy as np
    import torch

    target = tmp_path / "m.json"
    assert io.write_json(target, {"b": np.float32(0.5), "a": torch.tensor(3), "p": Path("x/y"), "n": [1]}) == target
    assert target.read_text() == '{\n  "b": 0.5,\n  "a": 3,\n  "p": "x/y",\n  "n": [\n    1\n  ]\n}\n'
    assert io.read_json(target) == {"b": 0.5, "a": 3, "p": "x/y", "n": [1]}
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        io.write_json(target, {"x": object()})
    assert io.write_text(tmp_path / "t.txt", "é\n").read_bytes() == "é\n".encode("utf-8")


def test_atomic_dir_keeps_the_old_folder_when_the_block_fails(tmp_path):
    target = tmp_path / "out"
    with io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(Crash):
        with io.atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("new")
            raise Crash
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_clear_stale_removes_an_interrupted_swaps_old_folder_only_when_the_target_is_in_place(tmp_path):
    old = tmp_path / ".out.old"
    old.mkdir()
    assert io.clear_stale(tmp_path / "out") == []  # out missing: .out.old may be all there is
    (tmp_path / "out").mkdir()
    (tmp_path / f".out.{os.getpid()}-abcdefgh.tmp").mkdir()  # ours (this process): kept
    assert io.clear_stale(tmp_path / "out") == [old] and not old.exists()
    assert (tmp_path / f".out.{os.getpid()}-abcdefgh.tmp").exists()
    assert io.clear_stale(tmp_path / "missing-dir/out") == []


def test_pid_alive():
    assert io.pid_alive(os.getpid())
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    assert not io.pid_alive(dead.pid)


def test_pid_alive_when_not_allowed_to_signal(monkeypatch):
    def refuse(pid, sig):
        raise PermissionError

    monkeypatch.setattr(io.os, "kill", refuse)
    assert io.pid_alive(12345)  # another user's process: it runs


def test_umask_is_read_without_changing_it():
    old = os.umask(0o027)
    try:
        assert io.umask() == 0o027 and io.umask() == 0o027
    finally:
        os.umask(old)


def test_pid_alive_only_asks(tmp_path):
    """Signal 0 checks a process exists without touching it (any other signal would hit it)."""
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                              "for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):\n"
                              "    signal.signal(s, signal.SIG_DFL)\n"
                              "time.sleep(30)"])
    try:
        time.sleep(0.5)
        assert io.pid_alive(child.pid)
        time.sleep(0.2)
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("free,full", [(io.LOW_SPACE - 1, True), (io.LOW_SPACE, False)])
def test_a_write_error_is_a_full_disk_below_64_mib_free(tmp_path, monkeypatch, free, full):
    import shutil
    from collections import namedtuple

    assert io.LOW_SPACE == 64 * 2 ** 20
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(2 ** 40, 0, free))
    with pytest.raises(io.NoSpaceError if full else OSError) as err:
        with io.no_space_errors(tmp_path / "out.bin"):
            raise OSError(5, "Input/output error")
    assert isinstance(err.value, io.NoSpaceError) is full


TEMP_NAME = r"\.{name}\.{pid}-[a-z0-9_]{{8}}{suffix}\.tmp"


def test_temp_names_are_recognisable_and_parents_are_created(tmp_path, monkeypatch):
    """Temp siblings are named .<name>.<pid>-<8 random>[suffix].tmp (what clear_stale removes once
    their process is gone), next to targets in folders that may not exist yet."""
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(io.os, "replace", lambda src, dst: seen.append(Path(src).name) or real_replace(src, dst))
    pid = os.getpid()
    io.write_bytes(tmp_path / "a/b/out.bin", b"x")
    with io.atomic_file(tmp_path / "c/d/t.csv") as tmp:
        tmp.write_text("x")
    with io.atomic_file(tmp_path / "c/d/t.parquet", ".parquet") as tmp:
        tmp.write_text("x")
    with io.atomic_dir(tmp_path / "e/f/folder") as tmp:
        (tmp / "x").write_text("1")
    assert re.fullmatch(TEMP_NAME.format(name=r"out\.bin", pid=pid, suffix=""), seen[0])
    assert re.fullmatch(TEMP_NAME.format(name=r"t\.csv", pid=pid, suffix=""), seen[1])
    assert re.fullmatch(TEMP_NAME.format(name=r"t\.parquet", pid=pid, suffix=r"\.parquet"), seen[2])
    assert re.fullmatch(TEMP_NAME.format(name="folder", pid=pid, suffix=""), seen[3])
    assert (tmp_path / "a/b/out.bin").read_bytes() == b"x" and (tmp_path / "e/f/folder/x").exists()


def test_stale_temp_files_removed_meanwhile_by_another_process_are_no_error(tmp_path, monkeypatch):
    """Two stages starting at once may both clear the same dead writer's temp siblings."""
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".out.{dead.pid}-abcdefgh.tmp").mkdir()
    (tmp_path / f".out.{dead.pid}-hgfedcba.json.tmp").write_text("")
    real_rmtree, real_unlink = io.shutil.rmtree, Path.unlink

    def rmtree_late(p, *a, **k):  # the other process was faster
        real_rmtree(p)
        return real_rmtree(p, *a, **k)

    def unlink_late(self, *a, **k):
        real_unlink(self, missing_ok=True)
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(io.shutil, "rmtree", rmtree_late)
    monkeypatch.setattr(Path, "unlink", unlink_late)
    assert len(io.clear_stale(tmp_path / "out")) == 2


def test_a_swap_interrupted_between_its_renames_leaves_the_old_folder_as_dot_old(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # killed after moving the old folder aside, before the new one is in
            raise Crash
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(Crash):
        with io.atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("new")
    assert (tmp_path / ".out.old/a.txt").read_text() == "old" and not target.exists()  # recoverable
    monkeypatch.undo()
    for _ in range(2):  # the next run puts its folder in place; the one after clears .out.old
        with io.atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "a.txt").read_text() == "new"


def test_the_old_folder_removed_meanwhile_is_no_error(tmp_path, monkeypatch):
    """Once the new folder is in place another writer's clear_stale may remove .<name>.old first."""
    target = tmp_path / "out"
    with io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        if Path(dst) == target:
            io.shutil.rmtree(tmp_path / ".out.old")

    monkeypatch.setattr(io.os, "replace", replace)
    with io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"


def test_the_full_disk_message(tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(2 ** 40, 0, 3 * 2 ** 20))
    with pytest.raises(io.NoSpaceError) as err:
        with io.no_space_errors(tmp_path / "out.bin"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value) == (f"no space left on {tmp_path / 'out.bin'} (3 MiB free on its disk): free some space "
                              "and rerun (OSError: [Errno 28] No space left on device)")
    with pytest.raises(TypeError, match=r"^not JSON serialisable: object$"):
        io.write_json(tmp_path / "x.json", object())
