"""GPU claims (stages/core/gpus.py) on CPU with faked devices: CUDA_VISIBLE_DEVICES as the pool,
worker processes that claim and hold, one killed with SIGKILL."""
import json
import os
import signal
import subprocess
import sys

import pytest

from stages.core import gpus

WORKER = ("import sys, time\n"
          "from stages.core import gpus\n"
          "ids = gpus.claim(sys.argv[1], wait=sys.argv[2] == 'wait', poll=0.1)\n"
          "import os\n"
          "print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True)\n"
          "time.sleep(120)\n")


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXIMP_GPU_CLAIMS", str(tmp_path / "claims"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv(gpus.CLAIMED, raising=False)
    monkeypatch.delenv(gpus.SHARE, raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    yield {**os.environ}
    gpus.release()


def worker(env, name, mode="nowait"):
    return subprocess.Popen([sys.executable, "-c", WORKER, name, mode], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=os.getcwd())


def test_pool_is_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3,-1,4")
    assert gpus.pool() == ["2", "3"]  # CUDA stops at the first invalid entry
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus.pool() == [] and gpus.claim("x") == []  # no device: nothing to claim


def test_two_workers_never_share_a_device_and_a_killed_workers_claim_is_freed(env):
    a, b = worker(env, "a"), worker(env, "b")
    try:
        dev_a, dev_b = a.stdout.readline().strip(), b.stdout.readline().strip()
        assert {dev_a, dev_b} == {"0", "1"}  # one card each
        c = worker(env, "c")  # none free: a clear error, not a shared card
        assert c.wait(60) != 0 and "every GPU of 0,1 is claimed" in c.stderr.read()
        os.kill(a.pid, signal.SIGKILL)
        a.wait(30)
        d = worker(env, "d", "wait")
        assert d.stdout.readline().strip() == dev_a  # the killed worker's card, b's still held
        d.kill()
        d.wait(30)
    finally:
        for w in (a, b):
            w.kill()
            w.wait(30)
    log = gpus.history()
    assert [e["stage"] for e in log] and {e["experiment"] for e in log} == {"exp-a"}
    assert all(len(e["devices"]) == 1 for e in log)


def test_claim_sets_the_visible_devices_and_children_inherit_it(env, monkeypatch):
    assert gpus.claim("train", n=2) == ["0", "1"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1" and os.environ[gpus.CLAIMED] == "0,1"
    assert gpus.claim("train") == ["0", "1"]  # a child of the claimer (accelerate launch) claims nothing new
    lock = json.loads((gpus.claims_dir() / "gpu-0.lock").read_text())
    assert lock == {"pid": os.getpid(), "stage": "train"}
    gpus.release()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(SystemExit, match="needs 3 GPUs, the pool has 2"):
        gpus.claim("train", n=3)


def test_share_takes_no_lock(env, monkeypatch):
    monkeypatch.setenv(gpus.SHARE, "1")
    a = worker({**env, gpus.SHARE: "1"}, "a")
    try:
        assert a.stdout.readline().strip() == "0,1"
        assert gpus.claim("b") == ["0", "1"]  # a second experiment on the same cards, as asked
    finally:
        a.kill()
        a.wait(30)
