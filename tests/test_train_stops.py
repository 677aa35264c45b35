"""A failed or stopped train damages nothing (issue 26, point 6): the tracked reports stay byte-identical,
an earlier run's checkpoints go only once the new run has saved its first, SIGTERM saves a checkpoint
and a rerun resumes exactly there, and a stage dies with the DVC process that started it."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.core import lifecycle
from tests.trainkit import FAST, run_train, write_params

REPO = Path(__file__).resolve().parents[1]


class Interrupt(Exception):
    pass


def crash_at(at: int):
    def crash(metrics, step):
        if step == at:
            raise Interrupt
    return crash


def tracked(root: Path) -> dict[str, bytes]:
    """The train stage's git-tracked reports (dvc.yaml: loss.tsv and validation/, persist)."""
    files = [root / "reports/train/loss.tsv", *sorted((root / "reports/train/validation").rglob("*"))]
    return {str(f.relative_to(root)): f.read_bytes() for f in files if f.is_file()}


def checkpoint_steps(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "models/checkpoints").glob("step-*"))


def test_a_failed_train_leaves_the_tracked_reports_byte_identical(workdir):
    first = dict(train__steps=4, train__checkpoint_every=2, train__validate_every=2, train__validation_steps=1,
                 sample__prompts=str(REPO / "conf/prompts/smoke.txt"))
    run_train(workdir, **first)
    before = tracked(workdir)
    assert "reports/train/validation/index.json" in before and len(before) > 3
    for params in ({**first, "train__lr": 5e-3}, {**first, "train__steps": 8}):  # fresh / continued run
        with pytest.raises(Interrupt):
            run_train(workdir, callbacks=[crash_at(3)], **params)
        assert tracked(workdir) == before
    with pytest.raises(SystemExit, match="non-finite"):  # diverging
        run_train(workdir, callbacks=[], **{**first, "train__lr": 1e30, "train__max_grad_norm": 1e30})
    assert tracked(workdir) == before


def test_an_earlier_runs_checkpoints_go_only_once_the_new_run_saved_its_first(workdir, capfd):
    run_train(workdir, train__steps=4, train__checkpoint_every=2)
    old = checkpoint_steps(workdir)
    assert old == ["step-000002", "step-000004"]
    with pytest.raises(Interrupt):  # other params: a new run, which fails before its first checkpoint
        run_train(workdir, callbacks=[crash_at(1)], train__steps=4, train__checkpoint_every=2, train__lr=5e-3)
    assert checkpoint_steps(workdir) == old
    with pytest.raises(Interrupt):  # ... and one that saves step 2, then fails
        run_train(workdir, callbacks=[crash_at(3)], train__steps=4, train__checkpoint_every=2, train__lr=5e-3)
    assert checkpoint_steps(workdir) == ["step-000002"]
    assert (workdir / "models/checkpoints/step-000002/meta.json").stat().st_mtime > time.time() - 60


def test_a_diverging_run_says_whether_it_has_a_checkpoint(workdir, monkeypatch):
    from stages import train

    real = train.Trainer.resolve
    nan_at = {}

    def resolve(self, pending, since=None):
        out = real(self, pending, since)
        return {**out, "loss": float("nan")} if pending.step == nan_at["step"] else out

    monkeypatch.setattr(train.Trainer, "resolve", resolve)
    nan_at["step"] = 0
    with pytest.raises(SystemExit, match="at step 1: .* this run has saved no checkpoint yet"):
        run_train(workdir, train__steps=5, train__checkpoint_every=2, train__lr=7e-3)
    nan_at["step"] = 2
    with pytest.raises(SystemExit, match=r"at step 3: .* this run's last checkpoint \(step 2\) is kept"):
        run_train(workdir, train__steps=5, train__checkpoint_every=2, train__lr=6e-3)


def saved_steps(root: Path, folder: str) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (root / "models" / folder).glob("step-*"))


@pytest.mark.parametrize("nan_at", [3, 5])  # a snapshot step / one resolved after step 6 was launched
def test_a_nan_stops_the_pipelined_run_naming_its_step_before_anything_of_it_is_saved(workdir, monkeypatch, nan_at):
    """Step N is checked after step N+1 is launched (stages.models.trainer.StepPipeline), yet a NaN loss
    computed on the device at step N stops the run naming step N, with no checkpoint, snapshot or
    loss.tsv row of step N or later."""
    from stages import train
    from stages.models.divergence import TrainingDiverged

    real_accumulate, real_launch = train.Trainer.accumulate, train.Trainer.launch
    monkeypatch.setattr(train.Trainer, "accumulate", lambda self, batches, step: real_accumulate(
        self, batches, step) * (float("nan") if step + 1 == nan_at else 1.0))
    launched = []
    monkeypatch.setattr(train.Trainer, "launch", lambda self, b, step: launched.append(step + 1) or
                        real_launch(self, b, step))
    kept = "this run has saved no checkpoint yet" if nan_at == 3 else r"this run's last checkpoint \(step 4\) is kept"
    with pytest.raises(TrainingDiverged, match=rf"^non-finite loss \(nan\) at step {nan_at}: training stopped "
                                               rf"before saving it; {kept}\."):
        run_train(workdir, train__steps=8, train__checkpoint_every=4, train__save_every=3)
    assert launched == list(range(1, nan_at + (1 if nan_at == 3 else 2)))  # 5: step 6 launched before 5 resolved
    assert all(s < nan_at for s in saved_steps(workdir, "checkpoints") + saved_steps(workdir, "snapshots"))
    assert saved_steps(workdir, "checkpoints") == ([] if nan_at == 3 else [4])
    rows = (workdir / "models/checkpoints/progress/loss.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rows] == list(range(1, nan_at))
    assert not (workdir / "models/lora").exists()


def test_a_stop_resolves_the_pending_step_then_checkpoints_it_and_the_rerun_is_exact(workdir, tmp_path_factory,
                                                                                     capfd):
    """SIGTERM while step 4 is in flight (signalled when step 3 is reported): the run resolves and logs
    step 4, checkpoints it and exits; the rerun resumes there and ends with the uninterrupted adapter."""
    from stages import train
    from stages.core.paths import Train

    params = dict(train__steps=8, train__checkpoint_every=100, lora__dropout=0.1)
    stop = lifecycle.StopSignals("train")  # not entered: the signal is set by hand

    def signal_at_3(metrics, step):
        if step == 3:
            stop.signal = signal.SIGTERM

    with pytest.raises(SystemExit) as err:
        train.run(write_params(workdir, **{**FAST, **params}), Train().under(workdir), callbacks=[signal_at_3],
                  stop=stop)
    assert err.value.code == 128 + signal.SIGTERM
    assert "train: stopped by SIGTERM at step 4; checkpoint saved; rerun to resume" in capfd.readouterr().err
    assert checkpoint_steps(workdir) == ["step-000004"]
    rows = (workdir / "models/checkpoints/progress/loss.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rows] == [1, 2, 3, 4]
    resumed = run_train(workdir, **params)
    other = tmp_path_factory.mktemp("uninterrupted")
    shutil.copytree(workdir / "data/cache", other / "data/cache")
    assert run_train(other, **params) == resumed
    weights = "models/lora/pytorch_lora_weights.safetensors"
    assert (workdir / weights).read_bytes() == (other / weights).read_bytes()


# ----------------------------------------------------------------------------- signals
STAGE = [sys.executable, "-m", "stages.train"]


def stage_env(workdir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_STAGE", "MLFLOW_TRACKING_URI")}
    return {**env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "FLUXIMP_PROGRESS": "0", **extra}


def wait_for_rows(workdir: Path, rows: int, proc, timeout: float = 120) -> None:
    """Until the running stage has logged ``rows`` steps (its in-progress loss log)."""
    log = workdir / "models/checkpoints/progress/loss.tsv"
    end = time.time() + timeout
    while time.time() < end:
        if log.exists() and len(log.read_text().splitlines()) > rows:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the stage ended early:\n{proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("the stage logged no steps in time")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_a_rerun_resumes_exactly_there(workdir, monkeypatch):
    from stages import train

    write_params(workdir, **{**FAST, "train__steps": 5000, "train__checkpoint_every": 4000})
    proc = subprocess.Popen(STAGE, cwd=workdir, env=stage_env(workdir), stderr=subprocess.PIPE, text=True)
    wait_for_rows(workdir, 5, proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err
    found = re.findall(r"^train: stopped by SIGTERM at step (\d+); checkpoint saved; rerun to resume$", err, re.M)
    assert len(found) == 1, err
    stopped = int(found[0])
    assert stopped >= 5 and checkpoint_steps(workdir) == [f"step-{stopped:06d}"]
    assert not (workdir / "reports/train/loss.tsv").exists()  # nothing tracked written by a stopped run

    executed = []  # the steps the rerun really trains (not the ones it replays from the log)
    real = train.Trainer.launch
    monkeypatch.setattr(train.Trainer, "launch", lambda self, b, step: executed.append(step) or real(self, b, step))
    rows = run_train(workdir, train__steps=stopped + 3, train__checkpoint_every=4000)  # constant lr: resumes
    assert executed == [stopped, stopped + 1, stopped + 2]  # 0-based: the first new step is stopped + 1
    assert [int(r["step"]) for r in rows] == list(range(1, stopped + 4))


@pytest.mark.slow
def test_a_stage_dies_with_the_dvc_process_that_runs_it_and_registers_nothing(workdir):
    """(`kill` of `dvc repro` left train running as an orphan that registered an MLflow version.)"""
    write_params(workdir, **{**FAST, "train__steps": 5000, "train__checkpoint_every": 4000})
    db = workdir / "mlflow.db"
    env = stage_env(workdir, DVC_STAGE="train", FLUXIMP_MLFLOW="1", MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    # a stand-in for DVC: starts the stage as DVC does (DVC_STAGE set), reports its pid, waits
    fake_dvc = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys\n"
        f"p = subprocess.Popen({STAGE!r}, stderr=open('stage.err', 'w'))\n"
        "print(p.pid, flush=True)\n"
        "p.wait()\n")], cwd=workdir, env=env, stdout=subprocess.PIPE, text=True)
    stage = int(fake_dvc.stdout.readline())
    wait_for_rows(workdir, 3, fake_dvc, timeout=180)
    fake_dvc.kill()
    fake_dvc.wait()
    end = time.time() + 30
    while lifecycle.alive(stage) and time.time() < end:
        time.sleep(0.1)
    assert not lifecycle.alive(stage), "the stage outlived DVC"
    err = (workdir / "stage.err").read_text()
    assert "train: stopped by SIGTERM at step" in err, err
    time.sleep(2)
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    assert client.search_model_versions() == []
    assert [r.info.status for r in client.search_runs(client.search_experiments()[0].experiment_id)] == ["FAILED"]


# a stage with a slow stop point: it saves for 1 s (many watch periods) after the first signal
SLOW_STOP = ("import os, sys, time, pathlib\n"
             "from stages.core import lifecycle\n"
             "assert lifecycle.die_with_parent(every=0.05)\n"
             "with lifecycle.StopSignals('train') as stop:\n"
             "    pathlib.Path('ready').write_text(f'{os.getppid()} {os.getpid()}')\n"
             "    while stop.signal is None:\n"
             "        time.sleep(0.01)\n"
             "    pathlib.Path('stopping').touch()\n"
             "    time.sleep(1.0)  # a checkpoint being saved\n"
             "    raise stop.exit('at step 1')\n")


def run_under_fake_dvc(tmp_path: Path, command: str):
    """(fake DVC, the stage's pid): a stand-in for DVC runs ``command`` (the stage, or a shell running it)."""
    fake_dvc = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys\n"
        f"p = subprocess.Popen({command!r}, shell=True, stderr=open('stage.err', 'w'))\n"
        "p.wait()\n")], cwd=tmp_path, env=stage_env(tmp_path, DVC_STAGE="train"))
    end = time.time() + 30
    while not (tmp_path / "ready").exists() and time.time() < end:
        time.sleep(0.02)
    return fake_dvc


def wait_gone(pid: int) -> None:
    end = time.time() + 60
    while lifecycle.alive(pid) and time.time() < end:
        time.sleep(0.05)
    assert not lifecycle.alive(pid)


def test_the_death_of_dvc_is_one_stop_request_not_two(tmp_path):
    """(The kernel's PDEATHSIG and the watch thread both signalled: the second SIGTERM ended train in
    the middle of the checkpoint that the first asked for, with no "stopped by" line.)"""
    (tmp_path / "stage.py").write_text(SLOW_STOP)
    fake_dvc = run_under_fake_dvc(tmp_path, f"exec {sys.executable} stage.py")
    parent, stage = map(int, (tmp_path / "ready").read_text().split())
    assert parent == fake_dvc.pid  # no shell between
    fake_dvc.kill()
    fake_dvc.wait()
    wait_gone(stage)
    assert (tmp_path / "stage.err").read_text() == "train: stopped by SIGTERM at step 1\n"


def test_dvc_then_the_shell_between_dying_is_one_stop_request(tmp_path):
    """DVC runs a stage's command through a shell: DVC dies (the watch thread signals), then the shell
    (the kernel signals): the stop that saves the checkpoint goes on."""
    (tmp_path / "stage.py").write_text(SLOW_STOP)
    fake_dvc = run_under_fake_dvc(tmp_path, f"{sys.executable} stage.py; true")  # `; true`: the shell stays
    shell, stage = map(int, (tmp_path / "ready").read_text().split())
    assert shell != fake_dvc.pid
    fake_dvc.kill()
    fake_dvc.wait()
    end = time.time() + 30
    while not (tmp_path / "stopping").exists() and time.time() < end:
        time.sleep(0.01)
    os.kill(shell, signal.SIGKILL)  # the stage's parent dies while it saves
    wait_gone(stage)
    assert (tmp_path / "stage.err").read_text() == "train: stopped by SIGTERM at step 1\n"


def test_die_with_parent_only_when_dvc_runs_the_stage(monkeypatch):
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert lifecycle.die_with_parent() is False  # by hand (nohup, a closed terminal): not armed
    assert lifecycle.alive(os.getpid()) and not lifecycle.alive(2 ** 22 + 12345)


def test_stop_signals_defer_the_first_signal_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with lifecycle.StopSignals("train") as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.signal == signal.SIGTERM and stop.name == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) == before  # a second one: the default action
        assert stop.exit("at step 3").code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_relaunching_stage_passes_sigterm_on_to_its_processes(tmp_path):
    """(train with train.num_processes > 1 runs `accelerate launch`: a SIGTERM must reach the workers.)"""
    child = ("import signal, sys, time, pathlib\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
             "pathlib.Path('ready').touch()\n"
             "time.sleep(60)\n")
    parent = ("import sys; from stages.core import lifecycle\n"
              f"sys.exit(lifecycle.call([sys.executable, '-c', {child!r}], env=dict(__import__('os').environ)))\n")
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=tmp_path, env=stage_env(tmp_path))
    end = time.time() + 30
    while not (tmp_path / "ready").exists() and time.time() < end:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 7  # the child got the signal and its exit status came back


@pytest.mark.slow
def test_kill_of_dvc_repro_ends_its_stage(tmp_path):
    """The real process tree: `kill <dvc repro>` (SIGTERM) while a stage runs; the stage ends too."""
    import yaml

    from tests.tinydvc import BIN, env, make_project

    root = make_project(tmp_path / "proj")
    stage = ("python -c \"from stages.core import log; log.setup('slow'); import os, time, pathlib; "
             "pathlib.Path('stage.pid').write_text(str(os.getpid())); time.sleep(300)\"")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"slow": {"cmd": stage}}}))
    dvc = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=root, env=env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    end = time.time() + 120
    while not (root / "stage.pid").exists() and time.time() < end:
        time.sleep(0.1)
    pid = int((root / "stage.pid").read_text())
    dvc.terminate()
    dvc.wait(timeout=30)
    end = time.time() + 10
    while lifecycle.alive(pid) and time.time() < end:
        time.sleep(0.1)
    assert not lifecycle.alive(pid), "the stage outlived `dvc repro`"
