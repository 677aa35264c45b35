"""stages.core.pool: ordered, bounded parallel map whose workers die with their parent."""
import os
import signal
import subprocess
import sys
import time

import pytest

from stages.core import params
from stages.core.pool import parallel_map


def _square(x):
    return x * x


def test_in_order_whatever_the_workers():
    assert list(parallel_map(_square, range(50), 2, window=7)) == [x * x for x in range(50)]
    assert list(parallel_map(_square, iter(range(5)), 1)) == [0, 1, 4, 9, 16]


SCRIPT = """
import os, sys, time
from stages.core.pool import parallel_map
def work(x):
    open(os.path.join(sys.argv[1], f"worker-{os.getpid()}"), "w").close()
    time.sleep(600)
list(parallel_map(work, range(4), 2))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie (dead, not yet reaped by init) counts as gone
        return fh.read().split(") ")[1][0] != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_workers_die_when_the_stage_is_killed(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(params.ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("worker-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
    assert len(workers) == 2
    parent.send_signal(signal.SIGKILL)  # kill -9 of the stage: no chance to shut the pool down
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [w for w in workers if _alive(w)]
    for w in left:  # never leave them running, even when the test fails
        os.kill(w, signal.SIGKILL)
    assert not left, f"orphaned workers {left}"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_kill_9_of_download_leaves_no_workers_and_the_rerun_no_temp_folder(tmp_path):
    import yaml

    raw = params.Params().model_dump()
    raw["data"]["synthetic"].update(count=4000, size=256, contrast=0)
    raw["data"]["workers"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(params.ROOT), "FLUXIMP_MLFLOW": "0", "OMP_NUM_THREADS": "1"}
    stage = subprocess.Popen([sys.executable, "-m", "stages.download"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while time.monotonic() < deadline and stage.poll() is None:
        workers = _children(stage.pid)
        if len(workers) >= 2 and list((tmp_path / "data").glob(".raw.*.tmp/shards/part-*")):
            break
        time.sleep(0.2)
    assert stage.poll() is None, "download finished before it could be killed: raise the count"
    stage.send_signal(signal.SIGKILL)
    stage.wait()
    assert list((tmp_path / "data").glob(".raw.*.tmp"))  # what a kill -9 leaves
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"orphaned workers {left}"

    raw["data"]["synthetic"]["count"] = 16  # the rerun (smaller, to be quick) clears the litter
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    subprocess.run([sys.executable, "-m", "stages.download"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=300)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]


def test_threads_keep_the_order_and_use_the_cores_up_to_eight(monkeypatch):
    from stages.core import pool

    with pool.threads("t") as ex:
        assert list(ex.map(lambda i: (time.sleep(0.01 * (i % 3)), i)[1], range(12))) == list(range(12))
        assert 1 <= ex._max_workers <= 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    with pool.threads() as ex:
        assert ex._max_workers == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    with pool.threads() as ex:
        assert ex._max_workers == 1


def test_trait_table_on_threads_is_each_images_traits_in_order(monkeypatch, tmp_path):
    import numpy as np
    from PIL import Image

    from stages.core.images import load_many
    from stages.metrics import traits

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)  # 4 threads anywhere
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(6)]
    table = traits.trait_table(imgs, 32)
    for k in traits.NAMES:
        assert table[k].tolist() == [traits.image_traits(im, 32)[k] for im in imgs]
    paths = [tmp_path / f"{i}.png" for i in range(len(imgs))]
    for path, im in zip(paths, imgs):
        im.save(path)
    assert [np.asarray(a).tolist() for a in load_many(paths)] == [np.asarray(im).tolist() for im in imgs]
