"""stages/core/numerics.py: importing the stages package pins the CPU arithmetic (ATen's kernels, MKL, one
thread, no oneDNN); the pinned bits stay the same when the CPU looks like another machine's, the
environment can override each setting, and FLUXIMP_REPRODUCIBLE_CPU=0 turns the pin off. Each case runs
in a fresh interpreter: the settings only take hold before torch is imported."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from stages.core import numerics, params

# a convolution, a matrix product and reductions: the kernels oneDNN, MKL and ATen's vector code run
PROBE = r"""
import hashlib, json
import stages, torch
torch.manual_seed(0)
x = torch.randn(16, 3, 40, 40)
conv, lin = torch.nn.Conv2d(3, 16, 3), torch.nn.Linear(16 * 38 * 38, 64)
y = lin(torch.nn.functional.gelu(conv(x)).flatten(1)).softmax(-1).cumsum(-1).sum(0)
print(json.dumps({"bits": hashlib.sha256(y.detach().numpy().tobytes()).hexdigest(),
                  "mkldnn": torch.backends.mkldnn.enabled, "threads": torch.get_num_threads(),
                  "capability": torch.backends.cpu.get_cpu_capability()}))
"""
KNOBS = (*numerics.ENV, numerics.SWITCH, "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def probe(extra: dict | None = None, one_core: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    env.update(PYTHONPATH=str(params.ROOT), **(extra or {}))
    cmd = (["taskset", "-c", "0"] if one_core and shutil.which("taskset") else []) + [sys.executable, "-c", PROBE]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_importing_stages_pins_the_cpu_arithmetic():
    pinned = probe()
    assert (pinned["mkldnn"], pinned["threads"], pinned["capability"]) == (False, 1, "DEFAULT")
    assert probe({"OMP_NUM_THREADS": "2"})["threads"] == 2  # the environment wins over the pin
    assert probe({"OMP_NUM_THREADS": "2,1"})["threads"] == 2  # OpenMP's nested form does not break torch's import
    free = probe({numerics.SWITCH: "0"})
    assert free["mkldnn"] is True and free["threads"] == torch_default_threads()


def test_pinned_bits_do_not_depend_on_what_the_cpu_offers():
    """Another machine's MKL and oneDNN instruction sets and core count give the same bits."""
    here = probe()
    other = probe({"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "SSE41"}, one_core=True)
    assert other["bits"] == here["bits"]


def torch_default_threads() -> int:
    """What torch picks with no OMP_NUM_THREADS: the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        pytest.skip("no sched_getaffinity")
