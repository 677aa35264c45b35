"""benchmarks/bench_real_path.py experiment: the minutes of one flux-dev experiment from measured rows
(README's "one experiment takes N minutes" comes from it), with the image counts of the flux-dev profile."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_real_path", REPO / "benchmarks/bench_real_path.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROWS = [
    {"stage": "train", "card_gib": 24, "s_per_step": 0.5, "first_step_s": 40.0, "transformer_load_s": 30.0},
    {"stage": "train", "card_gib": 24, "s_per_step": 0.4, "first_step_s": 14.0, "transformer_load_s": 16.0},
    {"stage": "sample-warm", "card_gib": 24, "s_per_denoise_step": 0.1, "seconds": 70.0, "text_encoders_load_s": 8.0,
     "denoise_s": 2.0, "denoise_calls_s": [1.0, 1.0], "ok": True},
    {"stage": "train", "card_gib": 8, "s_per_step": 0.6, "first_step_s": 14.0, "transformer_load_s": 13.0},
]


def test_phases_use_the_last_warm_rows_and_the_profiles_counts(bench):
    rows = bench.experiment(ROWS, 24, evaluate_s=30.0)
    phases = {name.split(":")[0]: (mins, name) for name, mins, _ in rows}

    def find(text):
        return next((mins, name) for name, mins, _ in rows if text in name)

    assert find("load + first step")[0] == pytest.approx((16 + 14) / 60)  # the quickest (warm) train row
    steps = find("more steps")
    assert "1499 more steps x 0.4 s" in steps[1] and steps[0] == pytest.approx(1499 * 0.4 / 60)
    fixed = 70 - 8 - 2  # the stage's time but the text encoders (cached prompts) and the timed denoising
    sample = find("sample: 160")
    assert "160 LoRA images x 28 steps" in sample[1]  # 20 prompts x 4 seeds x scales 0.5, 1
    assert sample[0] == pytest.approx((160 * 28 * 0.1 + fixed) / 60)
    grid = phases["operating point"]
    assert "30 LoRA images" in grid[1]  # snapshots 1000, 1250, 1500 x 2 scales x 5 prompts x 1 seed
    assert "120 images x 4 steps" in phases["validation"][1]  # every 250 of 1500 steps x 20 prompts
    assert phases["evaluate"][0] == pytest.approx(0.5)


def test_report_sums_the_phases_and_says_when_a_card_has_no_rows(bench, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    text = bench.experiment_report([path], [24, 8], evaluate_s=30.0)
    phases = bench.experiment(ROWS, 24, 30.0)
    core = sum(m for name, m, _ in phases if not name.startswith("operating point"))
    assert f"**{core:.1f}**" in text and f"**{core + phases[3][1]:.1f}**" in text
    assert "8 GiB: no train + sample rows" in text


def test_fixed_cost_from_a_run_with_warm_caches_net_of_its_images_at_the_warm_rate(bench):
    """A sample row without ``warm`` after the caches were filled (the second experiment's case): its time
    but its images rendered at the warm row's rate; a failed row or one without an image count is not used."""
    cold = {"stage": "sample-ssteps=8+seeds=4", "card_gib": 24, "seconds": 24.0, "denoise_s": 7.9,
            "denoise_calls_s": [7.9], "denoise_images": 4, "ok": True}
    failed = {**cold, "ok": False, "seconds": 999.0}
    rows = bench.experiment(ROWS + [cold, failed], 24, evaluate_s=30.0)
    sample = next((mins, how) for name, mins, how in rows if name.startswith("sample: 160"))
    fixed = 24.0 - 4 * 8 * 0.1
    assert sample[0] == pytest.approx((160 * 28 * 0.1 + fixed) / 60)
    assert f"fixed {fixed:.0f} s measured (a sample run with warm caches, 4 images" in sample[1]
    old = {k: v for k, v in cold.items() if k != "denoise_images"}  # rows of an older bench: the warm row's cost
    rows = bench.experiment(ROWS + [old], 24, evaluate_s=30.0)
    assert "fixed 60 s measured (cold compile cache)" in next(h for n, _, h in rows if n.startswith("sample: 160"))


def test_a_run_with_the_profiles_image_counts_and_a_measured_validation_are_preferred(bench):
    """A ``flux-dev`` sample row (160 LoRA images: their VAE, PNG and grid costs are in its time) beats a
    later 4-image row for the fixed cost; a ``validate+flux-dev`` train row replaces the extrapolated
    validation: its first call (no-grad graphs compiled) once, the mean of the others for the other 5."""
    small = {"stage": "sample-ssteps=8+seeds=4", "card_gib": 24, "seconds": 24.0, "denoise_s": 7.9,
             "denoise_calls_s": [7.9], "denoise_images": 4, "ok": True}
    full = {"stage": "sample-flux-dev+ssteps=2", "card_gib": 24, "seconds": 100.0, "denoise_s": 32.0,
            "denoise_calls_s": [16.0, 16.0], "denoise_images": 160, "ok": True}
    val = {"stage": "train-validate+flux-dev", "card_gib": 24, "ok": True, "s_per_step": 9.0,
           "validation_calls_s": [30.0, 10.0, 12.0]}
    # a later row that rendered its 80 base images too (cache cold): not a second experiment's stage
    with_base = {**full, "seconds": 130.0, "denoise_images": 240, "denoise_calls_s": [16.0, 16.0, 16.0]}
    rows = bench.experiment(ROWS + [full, small, with_base, val], 24, evaluate_s=30.0)
    sample = next((mins, how) for name, mins, how in rows if name.startswith("sample: 160"))
    fixed = 100.0 - 160 * 2 * 0.1
    assert sample[0] == pytest.approx((160 * 28 * 0.1 + fixed) / 60)
    assert "the profile's 160 LoRA images" in sample[1]
    validation = next((mins, how) for name, mins, how in rows if name.startswith("validation"))
    assert validation[0] == pytest.approx((30.0 + 5 * 11.0) / 60) and validation[1].startswith("measured")
    steps = next(name for name, _, _ in rows if "more steps" in name)
    assert "x 0.4 s" in steps  # the validation row is not the train speed row
    rows = bench.experiment(ROWS + [small], 24, evaluate_s=30.0)  # without them: as before, and it says so
    assert "the per-image VAE/PNG/grid costs of 160 not in it" in next(h for n, _, h in rows if n.startswith("sample: 160"))
    assert next(h for n, _, h in rows if n.startswith("validation")).startswith("extrapolated")


def test_a_measured_grid_run_gives_the_grids_fixed_cost(bench):
    """An operating_point row (the grid stage with warm caches) replaces the sample stage's fixed cost in the
    grid's phase; its images are netted out at the warm rate like the sample stage's."""
    grid = {"stage": "operating_point-flux-dev+grid+ssteps=2", "card_gib": 24, "seconds": 39.4, "denoise_s": 16.4,
            "denoise_calls_s": [9.7, 2.2, 2.2, 2.2], "denoise_images": 40, "ok": True}
    # a later grid run of a fresh machine: its shapes compiled, its prompts embedded (text encoders netted out)
    cold = {**grid, "seconds": 61.0, "text_encoders_load_s": 7.7, "denoise_images": 21, "call": 12}
    rows = bench.experiment(ROWS + [{**grid, "call": 11}, cold], 24, evaluate_s=30.0)
    mins, how = next((m, h) for n, m, h in rows if n.startswith("operating point"))
    fixed = 39.4 - 40 * 2 * 0.1
    assert mins == pytest.approx((30 * 28 * 0.1 + fixed) / 60)
    assert f"fixed {fixed:.0f} s measured (the quickest of 2 grid runs: call 11, 40 images)" in how
    mins, how = next((m, h) for n, m, h in bench.experiment(ROWS, 24, 30.0) if n.startswith("operating point"))
    assert "grid not run at real size" in how and mins == pytest.approx((30 * 28 * 0.1 + 60) / 60)


def test_the_start_is_the_quickest_train_rows_and_the_speed_the_last(bench):
    """Rows of a fresh machine come last at times (cold caches): a second experiment's start is the quickest
    load + first step among the card's train rows, while s/step stays the last row's."""
    cold = {"stage": "train", "card_gib": 24, "s_per_step": 0.45, "first_step_s": 38.0, "transformer_load_s": 29.0,
            "call": 10}
    rows = bench.experiment(ROWS + [cold], 24, evaluate_s=30.0)
    start = next((m, n, h) for n, m, h in rows if "first step" in n)
    assert start[0] == pytest.approx((16 + 14) / 60) and "quickest of 3 train rows" in start[2]
    assert any("x 0.45 s" in n for n, _, _ in rows)


def test_a_stopped_bench_takes_its_running_phase_with_it(tmp_path):
    """``timeout`` stops the bench with SIGTERM: the phase it runs (a process of its own) must end too, or it
    goes on rendering on the GPU beside the call's next rows and skews them."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "phase.pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    driver = (f"import importlib.util, sys\n"
              f"spec = importlib.util.spec_from_file_location('b', {str(REPO / 'benchmarks/bench_real_path.py')!r})\n"
              f"b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n"
              f"b.run_killable([sys.executable, '-c', {sleeper!r}], {{}})\n")
    bench = subprocess.Popen([sys.executable, "-c", driver])
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    phase = int(pid_file.read_text())
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):  # killed and reaped by the bench
        os.kill(phase, 0)


def test_an_evaluate_row_after_the_profiles_samples_replaces_the_old_figure(bench):
    rows = ROWS + [
        {"stage": "evaluate", "card_gib": 24, "ok": True, "seconds": 11.0},  # 4 images: not the profile's counts
        {"stage": "evaluate-flux-dev", "card_gib": 24, "ok": True, "seconds": 95.0, "call": 3, "images": 240},  # cold
        {"stage": "evaluate-flux-dev", "card_gib": 24, "ok": True, "seconds": 48.0, "call": 3, "images": 240},  # warm
        {"stage": "evaluate-flux-dev", "card_gib": 24, "ok": True, "seconds": 20.0, "call": 4, "images": 8},  # 8 only
        {"stage": "evaluate-flux-dev", "card_gib": 8, "ok": True, "seconds": 300.0, "images": 240},  # another card
    ]
    ev = next((mins, how) for name, mins, how in bench.experiment(rows, 24, evaluate_s=30.0) if name == "evaluate")
    assert ev[0] == pytest.approx(48 / 60) and "240 images" in ev[1] and "call 3" in ev[1]
    ev = next((mins, how) for name, mins, how in bench.experiment(ROWS, 24, evaluate_s=30.0) if name == "evaluate")
    assert ev[0] == pytest.approx(0.5) and "4 images" in ev[1]


def test_a_train_rows_step_time_leaves_out_the_warm_up_and_the_last_step(bench):
    """The last step's time is what the GPU had left after the host launched it (call 20: 0.0217 s): not a
    step. Warm-up steps (compile) are not either."""
    call_20 = [5.79973, 0.302472, 0.303738, 0.315511, 0.323203, 0.319583, 0.303125, 0.0216701]
    assert bench.steady_step_time(call_20) == pytest.approx(0.316, abs=5e-4)  # was 0.310 with the last step
    assert bench.steady_step_time([9.0, 0.5]) == 0.5


def test_sample_rows_at_the_plans_images_per_call_are_preferred(bench):
    """The 80 GiB plan renders 8 images per call: a warm row with ``sbatch=8`` gives the rate even when a
    row at another batch came after it; without one the last warm row does."""
    from stages.models.memory import PLANS

    train = {"stage": "train", "card_gib": 80, "s_per_step": 0.3, "first_step_s": 6.0, "transformer_load_s": 3.0}

    def warm(batch, rate):
        return {"stage": f"sample-warm+ssteps=8+sbatch={batch}", "card_gib": 80, "s_per_denoise_step": rate,
                "seconds": 60.0, "denoise_s": 2.0, "denoise_calls_s": [1.0, 1.0], "ok": True}

    assert PLANS[80].sample_batch == 8

    def how(rows):
        return next(h for n, _, h in bench.experiment([train, *rows], 80, 30.0) if n.startswith("sample: 160"))

    assert "0.1048 s" in how([warm(8, 0.1048), warm(4, 0.1093)])
    assert "0.1093 s" in how([warm(2, 0.115), warm(4, 0.1093)])
