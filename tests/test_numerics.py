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
KNOBS = (*numerics.ENV, numerics.SWITCH, "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "NPY_DISABLE_CPU_FEATURES")


def probe(extra: dict | None = None, one_core: bool = False, code: str = PROBE) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    env.update(PYTHONPATH=str(params.ROOT), **(extra or {}))
    cmd = (["taskset", "-c", "0"] if one_core and shutil.which("taskset") else []) + [sys.executable, "-c", code]
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


# The filter stage's numbers, as stages/filter.py computes them: the tiny CLIP's image embeddings (stored
# as data/interim/clip_embeddings.safetensors), the aesthetic and zero-shot scores and the heuristics
# (filter.parquet). Printed: a hash of each, and which OpenBLAS kernel numpy ran.
FILTER_PROBE = r"""
import hashlib, json, tempfile, types
from pathlib import Path
import stages
import numpy as np, threadpoolctl
from PIL import Image
from stages.curation import quality
from stages.models import aesthetic, clip
rng = np.random.default_rng(0)
ims = [Image.fromarray(rng.integers(0, 256, (64 + 9 * i, 80, 3), dtype=np.uint8)) for i in range(12)]
model = clip.load_clip(types.SimpleNamespace(model="tiny", pretrained=None, batch_size=8), device="cpu", seed=1234)
emb = model.embed_images(ims)
with tempfile.TemporaryDirectory() as d:
    stored = clip.save_embeddings(Path(d) / "e.safetensors", [str(i) for i in range(12)], emb, model.name).read_bytes()
head = aesthetic.load_aesthetic_head(None, model.dim, seed=1234, device="cpu")
out = {"embeddings file": stored, "aesthetic": head.score(emb).tobytes(),
       "zero-shot": model.zero_shot(emb, ["a painting"], ["a photo", "text"]).tobytes(),
       "heuristics": json.dumps([quality.heuristics(im, 64) for im in ims], sort_keys=True).encode()}
blas = [i.get("architecture") for i in threadpoolctl.threadpool_info() if i.get("internal_api") == "openblas"]
print(json.dumps({**{k: hashlib.sha256(v).hexdigest() for k, v in out.items()}, "openblas": blas[:1]}))
"""
# What an AMD EPYC (Zen 2/3) does differently from this AVX-512 Xeon: numpy's OpenBLAS runs its Haswell/Zen
# kernels, not SkylakeX; numpy's own loops their AVX2 (x86-64-v3) versions; MKL and oneDNN at most AVX2; and
# another core count. (MKL's vendor check cannot be emulated: MKL_CBWR=COMPATIBLE, pinned, is documented as
# one code path on Intel and AMD.)
AVX2_MACHINE = {"OPENBLAS_CORETYPE": "Zen", "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
                "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.mark.slow
def test_the_filters_stored_bytes_are_the_same_on_an_emulated_amd_cpu():
    """Issue 25: data/interim/clip_embeddings.safetensors and filter.parquet differed on an AMD EPYC. The
    zero-shot scores were a numpy matrix product (OpenBLAS picks its kernel by CPU): now torch, pinned."""
    if os.environ.get("OPENBLAS_CORETYPE"):  # never changed where the machine sets it
        pytest.skip(f"OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} is set here (this machine's OpenBLAS "
                    "workaround): the kernel cannot be varied")
    here = probe(code=FILTER_PROBE)
    amd = probe(AVX2_MACHINE, one_core=True, code=FILTER_PROBE)
    assert amd["openblas"] != here["openblas"] or here["openblas"] == ["Haswell"]  # the emulation took hold
    assert {k: v for k, v in amd.items() if k != "openblas"} == {k: v for k, v in here.items() if k != "openblas"}


def torch_default_threads() -> int:
    """What torch picks with no OMP_NUM_THREADS: the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        pytest.skip("no sched_getaffinity")
