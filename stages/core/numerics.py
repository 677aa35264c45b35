"""The same float arithmetic on every x86-64 CPU, so the CPU pipeline's outputs do not depend on the machine.

The code, the params and requirements.lock fix what is computed, but on the CPU three more things decide
the last bits of a float result, and through the filter's cut-offs, the training steps and the samples
they reach every later output:

- ATen picks its elementwise and reduction kernels by the CPU's vector width (AVX2 or AVX-512), and a
  wider vector sums in another order;
- MKL (matrix products) and oneDNN (convolutions) pick their kernels by the CPU model, its instruction
  set and its cache sizes;
- reductions split across threads differently with another core count;
- numpy's matrix products run OpenBLAS, which picks its kernel by CPU (SkylakeX on an AVX-512 Xeon,
  Haswell/Zen on an AMD EPYC). Not pinned here (some machines set ``OPENBLAS_CORETYPE`` themselves, to
  work around OpenBLAS bugs): code whose results are stored does its matrix products in torch instead
  (the filter's zero-shot scores, stages/models/clip.py; tests/test_numerics.py emulates an AMD EPYC).

Measured with `benchmarks/bench_determinism.py` (reports/bench/determinism.md): two `dvc repro` on one
machine, the second emulating another CPU (AVX2 instead of AVX-512, one core instead of two), gave
different filter embeddings and cut-offs and metrics up to 5e-6 apart; a oneDNN instruction set alone
changed the filter's embeddings. With :func:`pin` they are identical, every stage.

:func:`pin` runs when the ``stages`` package is imported, before anything imports torch. It sets, where the
environment does not set them already:

``ATEN_CPU_CAPABILITY=default``
    ATen's kernels without AVX2/AVX-512 (the same machine code on every x86-64 CPU).
``MKL_CBWR=COMPATIBLE``
    MKL's conditional numerical reproducibility: the same code path on every Intel and AMD CPU.
``OMP_NUM_THREADS=1``
    one thread for torch, MKL and numpy's BLAS: no reduction split by the core count.

and, once torch is imported, ``torch.backends.mkldnn.enabled = False`` (convolutions without oneDNN).

It costs little on the smoke profile (tiny models) and nothing on the GPU, where the models run; the
CPU part of a GPU run (decoding, resizing) is small. ``FLUXIMP_REPRODUCIBLE_CPU=0`` turns it all off, for
CPU-heavy runs on many cores, at the price of outputs that depend on the machine. Bits are not promised
across operating systems or CPU architectures (an Arm Mac runs other kernels), nor between GPU models.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

SWITCH = "FLUXIMP_REPRODUCIBLE_CPU"
ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}


def enabled() -> bool:
    return os.environ.get(SWITCH, "1") != "0"


def configure_torch(torch) -> None:
    """The settings that need the torch module: no oneDNN, and the thread count of ``OMP_NUM_THREADS``."""
    torch.backends.mkldnn.enabled = False
    threads = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # OpenMP also allows "4,2"
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    """An import hook that finds torch the normal way and calls :func:`configure_torch` once the module
    has run (once per process; it removes itself first)."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterTorchImport)]
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            configure_torch(module)

        spec.loader.exec_module = exec_module
        return spec


def pin() -> None:
    """Pin the CPU arithmetic for this process and its children (see the module docstring)."""
    if not enabled():
        return
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    if "torch" in sys.modules:  # too late for the kernels torch chose already; the rest still holds
        configure_torch(sys.modules["torch"])
    elif not any(isinstance(f, _AfterTorchImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTorchImport())
