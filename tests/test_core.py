"""Core building blocks: params schema, atomic IO, shards, the torchvision compat shim."""
import subprocess
import sys
import time

import pytest
import torch
import yaml

from stages.core import io, params, shards


def test_committed_params_equal_the_smoke_composition():
    composed = params.validate(params.compose())
    committed = params.load(params.PARAMS_FILE)
    assert committed == composed
    assert composed.profile == "smoke"
    # byte for byte what `dvc exp run` (Hydra) writes, so an experiment leaves no needless diff (issue 25:
    # `profile: smoke` moved to the end on every run)
    assert params.PARAMS_FILE.read_text() == params.compose_text()


def test_schema_defaults_match_conf_defaults():
    composed = params.compose()
    assert params.validate(composed) == params.Params()


def test_flux_dev_profile_composes_and_validates():
    p = params.validate(params.compose(["profile=flux-dev", "lora.rank=32"]))
    assert p.profile == "flux-dev" and p.lora.rank == 32


@pytest.mark.parametrize(
    "key,value,expect",
    [
        (("lora", "rank"), -1, "lora.rank = -1"),
        (("model", "quantization"), "int3", "model.quantization = 'int3'"),
        (("data", "source"), "flickr", "'synthetic', 'wikiart' or 'folder'"),
        (("train", "bogus"), 1, "train.bogus: unknown key"),
    ],
)
def test_bad_params_are_named(key, value, expect):
    raw = params.Params().model_dump()
    raw[key[0]][key[1]] = value
    with pytest.raises(params.ParamsError) as exc:
        params.validate(raw)
    assert expect in str(exc.value)


def test_bad_params_fail_fast_from_the_command_line(tmp_path):
    raw = params.Params().model_dump()
    raw["lora"]["rank"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "stages.core.params"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(params.ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert "lora.rank = -1" in proc.stderr
    assert time.time() - t0 < 5


def test_atomic_file_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    io.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert io.read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_dir_replaces_whole_folder(tmp_path):
    target = tmp_path / "d"
    with io.atomic_dir(target) as tmp:
        (tmp / "old.txt").write_text("x")
    with io.atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_shards_round_trip_and_are_deterministic(tmp_path):
    rows = [{"id": shards.content_id(bytes([i])), "image": bytes([i]), "width": i, "height": 2 * i,
             "title": f"t{i}"} for i in range(10)]
    a = shards.write_shards(rows, tmp_path / "a", shard_rows=4)
    b = shards.write_shards(rows, tmp_path / "b", shard_rows=4)
    assert len(a) == 3
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    table = shards.read_table(tmp_path / "a")
    assert table.num_rows == 10 and table.schema == shards.IMAGE_SCHEMA
    assert table["artist"].null_count == 10
    picked = shards.read_table(tmp_path / "a", columns=["id", "title"], ids=[rows[7]["id"], rows[2]["id"]])
    assert picked["title"].to_pylist() == ["t2", "t7"]
    assert [r["width"] for r in shards.iter_rows(tmp_path / "a", columns=["id", "width"])] == list(range(10))


def shim_outcome(code: str) -> str:
    """Run ``code`` in a fresh interpreter; it prints 'patched' or 'native' last."""
    out = subprocess.run([sys.executable, "-c", code], cwd=params.ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


# on CPU-only torch the PyPI torchvision's ops are missing, so the shim must act; on CUDA it must not
EXPECTED_SHIM = "native" if torch.cuda.is_available() else "patched"


def test_compat_makes_torchvision_importable():
    assert shim_outcome("from stages.core import compat; patched = compat.ensure_torchvision(); "
                        "import torchvision.transforms as T; from diffusers import FluxPipeline; import open_clip; "
                        "print('patched' if patched else 'native')") == EXPECTED_SHIM


def test_importing_stages_applies_the_shim_when_torchvision_is_first_imported():
    """No module calls the shim: importing the package is enough, and costs nothing until then."""
    assert shim_outcome("import sys, stages; from stages.core import compat; assert 'torch' not in sys.modules; "
                        "from torchmetrics.image.kid import KernelInceptionDistance; import open_clip; "
                        "print('patched' if compat._applied else 'native')") == EXPECTED_SHIM


def test_compat_is_a_noop_when_ops_exist():
    code = ("import torch; lib = torch.library.Library('torchvision', 'FRAGMENT'); "
            "lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor'); "
            "lib.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor'); "
            "from stages.core import compat; print(compat.ensure_torchvision())")
    out = subprocess.run([sys.executable, "-c", code], cwd=params.ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_model_modules_work_when_imported_first_in_a_fresh_process():
    """Regression: load_pipeline in a fresh process used to import diffusers before the shim."""
    code = ("from stages.models import flux; from stages.core import params; "
            "print(type(flux.load_pipeline(params.Params().model)).__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=params.ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("FluxPipeline")


@pytest.mark.parametrize("stage", ["validate", "download", "dedupe", "filter", "caption", "encode", "train",
                                   "operating_point", "sample", "evaluate"])
def test_every_stage_validates_params_before_doing_anything(stage, tmp_path):
    raw = params.Params().model_dump()
    raw["model"]["quantization"] = "int3"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(params.ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode != 0
    assert "model.quantization = 'int3'" in proc.stderr and "'none', 'nf4', 'int8' or 'fp8'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_atomic_outputs_get_the_umask_mode(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        io.write_text(tmp_path / "report.html", "x")
        with io.atomic_dir(tmp_path / "lora") as tmp:
            (tmp / "a.safetensors").write_bytes(b"x")
        os.umask(0o002)
        io.write_text(tmp_path / "group.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "lora").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "group.txt").stat().st_mode & 0o777 == 0o664


def test_a_rerun_clears_temp_folders_of_killed_writers_only(tmp_path):
    import os
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".raw.{dead.pid}-abcd1234.tmp").mkdir()        # a killed stage's half-written output
    (tmp_path / ".raw.k2j4h5g6.tmp").mkdir()                     # the same, older naming
    (tmp_path / f".raw.{os.getppid()}-live1234.tmp").mkdir()    # a writer that still runs
    (tmp_path / ".raw.json.abcd1234.tmp").write_text("")        # another output's temp
    with io.atomic_dir(tmp_path / "raw") as tmp:
        (tmp / "x").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["raw", f".raw.{os.getppid()}-live1234.tmp", ".raw.json.abcd1234.tmp"])


def test_full_disk_is_named(tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(io.NoSpaceError, match=f"no space left on {tmp_path / 'out.bin'}"):
        with io.no_space_errors(tmp_path / "out.bin"):
            full()
    # torch's zip writer hides ENOSPC behind "unexpected pos": the free space tells
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 1024))
    with pytest.raises(io.NoSpaceError, match="no space left on .*ckpt"):
        with io.no_space_errors(tmp_path / "ckpt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="unrelated"):  # with room on the disk: the error itself
        with io.no_space_errors(tmp_path):
            raise RuntimeError("unrelated")


def test_threaded_png_encoding_gives_the_one_by_one_bytes_in_order():
    """encode_pngs (the sample stage's, the grid's and validation's PNGs) encodes on threads: the
    bytes must be those PIL writes one image at a time, in the images' order (a swap would put one
    prompt's image under another's name)."""
    import io as _io

    import numpy as np
    from PIL import Image

    from stages.core import images

    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 256, (48 + 8 * k, 64, 3), dtype=np.uint8)) for k in range(7)]

    def pil_default(img):  # what sample.py wrote before the pool: img.save(buf, format="PNG")
        buf = _io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    got = images.encode_pngs(pics)
    assert got == [pil_default(im) for im in pics] == [images.encode_png(im) for im in pics]
    assert [images.decode(b).size for b in got] == [im.size for im in pics]
