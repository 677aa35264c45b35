"""Stage logs: progress lines off a terminal, bars on one, and no third-party warning noise."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with stderr piped (not a terminal), from the repo root."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env}
    full.pop("FLUXIMP_PROGRESS", None)  # conftest turns progress off; these tests want the default
    full.pop("TQDM_DISABLE", None)  # set by this process's own `import stages`: the child decides
    full.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=300)


LOOP = """
    import time
    from stages.core import log
    logger = log.setup("train")
    bar = log.progress(range(40), desc="train", unit="step")
    for step in bar:
        time.sleep(0.02)
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}", lr="1.00e-04")
"""


def test_piped_progress_logs_step_total_rate_eta_and_postfix():
    proc = _python(LOOP, FLUXIMP_PROGRESS_EVERY="0.1")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "[train] INFO train:" in ln]
    # 40 steps x 20 ms = 0.8 s at one line per 0.1 s: several lines, far fewer than 40, the last one at 40/40
    assert 3 <= len(lines) < 40, proc.stderr
    assert "40/40 (100%)" in lines[-1] and "step/s" in lines[-1] and "ETA" in lines[-1]
    assert "loss=" in lines[-1] and "lr=1.00e-04" in lines[-1]
    assert "\r" not in proc.stderr and "|" not in proc.stderr  # no bar drawn into the pipe


def test_progress_interval_is_respected_and_off_switch_works():
    slow = _python(LOOP, FLUXIMP_PROGRESS_EVERY="30")
    lines = [ln for ln in slow.stderr.splitlines() if "INFO train:" in ln]
    assert [ln.split("INFO ")[1].split(" ")[1] for ln in lines] == ["1/40", "40/40"]  # first step + last
    off = _python(LOOP, FLUXIMP_PROGRESS="0")
    assert off.returncode == 0 and "train:" not in off.stderr


def test_bar_mode_draws_a_tqdm_bar():
    proc = _python(LOOP, FLUXIMP_PROGRESS="bar")
    assert "40/40" in proc.stderr and "step/s" in proc.stderr
    assert "INFO train:" not in proc.stderr


def test_third_party_imports_and_tiny_models_print_no_warnings():
    """What every model stage imports and loads on the smoke profile, with stderr piped: the only
    lines are ours, and none is a warning."""
    proc = _python("""
        import stages  # noqa: F401  (installs the filters, as `python -m stages.<name>` does)
        from stages.core import log, params
        logger = log.setup("encode")
        import torchao, bitsandbytes  # noqa: F401
        import bitsandbytes.backends.cpu.ops  # noqa: F401
        import diffusers.quantizers.torchao.torchao_quantizer  # noqa: F401
        from stages.models import clip, flux, quant, lora  # noqa: F401
        from stages.metrics import fidelity
        import numpy as np
        p = params.load()  # the committed params.yaml: the smoke profile
        model = clip.load_clip(p.clip, seed=p.seed)
        e = np.random.default_rng(0).normal(size=(6, model.dim)).astype("float32")
        fidelity.kid(e, e[::-1].copy(), 3, seed=0)
        from tqdm import tqdm
        list(tqdm(range(3), desc="another library's bar"))  # e.g. diffusers' "Loading pipeline components"
        logger.info("done")
    """, FLUXIMP_MLFLOW="0")
    assert proc.returncode == 0, proc.stderr
    noisy = [ln for ln in proc.stderr.splitlines() if "warn" in ln.lower() or "W1" in ln[:3]]
    assert noisy == [], "\n".join(noisy)
    assert "[encode] INFO done" in proc.stderr
    assert "another library's bar" not in proc.stderr  # off a terminal, only our progress lines
