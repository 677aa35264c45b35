"""torch.compile for the Flux transformer's repeated blocks, in the train and the sample stage.

``train.compile`` / ``sample.compile``: ``auto`` (the default) compiles on a CUDA GPU and runs eager
on the CPU (inductor's CPU code would take longer to build than the smoke profile takes to run, and
its vectorised kernels differ by CPU, which would break "same bytes on every machine"); ``true`` /
``false`` force it. diffusers' regional compilation (``compile_repeated_blocks``) compiles one double
and one single block and reuses them for all 57: about 35 s the first time on an H200
(reports/bench/speed.md).

The compiled graphs are cached on disk under :func:`cache_dir` (inductor's FX graph cache, its
AOTAutograd cache and Triton's kernels), beside the quantize-once cache: outside the repo, so every
``dvc exp run`` on the machine, ``--temp`` and queued ones included, reuses them and a second run
pays only dynamo's tracing. If compiling fails, one log line says so and the stage runs eager
(:func:`run_first`). ``FLUXIMP_COMPILE_MODE`` passes a ``torch.compile`` mode (benchmarks only).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterable, TypeVar, Union

import torch
import torch._functorch.config

log = logging.getLogger(__name__)
T = TypeVar("T")


def enabled(setting: Union[bool, str], device: torch.device) -> bool:
    """``train.compile`` / ``sample.compile`` for ``device``: ``auto`` = on CUDA only."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return bool(setting)


def cache_dir() -> Path:
    """``$FLUXIMP_COMPILE_CACHE``, else ``$FLUXIMP_CACHE/compiled``, else
    ``~/.cache/flux-impressionism/compiled`` (next to the quantize-once cache)."""
    if os.environ.get("FLUXIMP_COMPILE_CACHE"):
        return Path(os.environ["FLUXIMP_COMPILE_CACHE"])
    if os.environ.get("FLUXIMP_CACHE"):
        return Path(os.environ["FLUXIMP_CACHE"]) / "compiled"
    return Path.home() / ".cache" / "flux-impressionism" / "compiled"


def code_key() -> str:
    """What the compiled graphs' cache keys cannot see: the backward code of the autograd Functions
    inside the blocks (ours: stages.models.fp8 and .attention; bitsandbytes' nf4 matmul) and the
    versions of the libraries that trace into them."""
    import hashlib
    from importlib import metadata

    from stages.models import attention, fp8

    h = hashlib.sha256()
    for module in (fp8, attention):
        h.update(Path(module.__file__).read_bytes())
    for dist in ("bitsandbytes", "peft", "diffusers", "torchao"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            pass
    return h.hexdigest()[:16]


def configure_cache() -> Path:
    """Point inductor's and Triton's on-disk caches at :func:`cache_dir` (unless the user set them).

    In our own cache, inductor's folder is per :func:`code_key`, and AOTAutograd may cache graphs that
    hold custom autograd Functions (torch leaves them out by default because its key cannot see their
    backward code; ours can): without that, every run traced the fp8 and nf4 blocks' joint graphs again,
    about 4 of the 7 s that a warm first step spent compiling on an H200 (reports/bench/speed.md)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    root = cache_dir()
    ours = str(root / "inductor" / code_key())
    # importing diffusers already fills in torch's default (/tmp/torchinductor_<user>): that is not the user's
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = ours
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = \
        os.environ["TORCHINDUCTOR_CACHE_DIR"] == ours
    return root


def repeated_blocks(transformer) -> list[torch.nn.Module]:
    names = set(getattr(transformer, "_repeated_blocks", []) or [])
    return [m for m in transformer.modules() if type(m).__name__ in names]


def compile_blocks(transformer, backend: Union[str, Callable] = "inductor") -> None:
    """Compile the transformer's repeated blocks (lazily: the work happens at the first call)."""
    configure_cache()
    # one static graph per shape (few shapes: the buckets, the sampling batch) rather than a dynamic one
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    mode = os.environ.get("FLUXIMP_COMPILE_MODE") or None  # benchmarks: e.g. reduce-overhead (CUDA graphs)
    for block in repeated_blocks(transformer):
        block.compile(fullgraph=False, backend=backend, mode=mode)
    transformer._fluximp_compiled = True


def step_begin(transformer) -> None:
    """A new training step for CUDA graphs (``FLUXIMP_COMPILE_MODE=reduce-overhead``, benchmarks): torch's
    graph trees may then reuse the last step's output buffers. Nothing otherwise."""
    if is_compiled(transformer) and "reduce-overhead" in (os.environ.get("FLUXIMP_COMPILE_MODE") or ""):
        torch.compiler.cudagraph_mark_step_begin()


def same_layout(t):
    """``t`` with the strides of a contiguous tensor of its shape. dynamo guards on strides, and
    Flux's single blocks return slices of one tensor (text, image) while the double blocks return
    whole tensors: without this the first single block gets a graph of its own. Batch 1 (the usual
    case): a view, no copy (a size-1 dimension's stride is free); otherwise a contiguous copy."""
    if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.stride() == torch.empty(t.shape, device="meta").stride():
        return t
    if t.shape[0] == 1 and t[0].is_contiguous():
        return t[0].unsqueeze(0)
    return t.contiguous()


def checkpointing(compiled: bool, kept: Iterable[torch.nn.Module] = ()) -> Callable:
    """diffusers' gradient-checkpointing call for one block (``enable_gradient_checkpointing``'s
    ``gradient_checkpointing_func``). Blocks in ``kept`` run plainly: their activations stay on the
    GPU and nothing is recomputed for them in the backward (where the card has room: stages.models.memory
    ``kept_blocks``); the others are checkpointed as diffusers does. Compiled, every block's inputs get
    one layout (:func:`same_layout`), so every block of a kind runs one graph. (A forward hook cannot do
    this: dynamo traces it as a frame of its own, with its own guards on the strides.)"""
    kept_ids = {id(b) for b in kept}

    def call(block, *args):
        if compiled:
            args = tuple(map(same_layout, args))
        if id(block) in kept_ids:
            return block(*args)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    return call


def is_compiled(transformer) -> bool:
    return bool(getattr(transformer, "_fluximp_compiled", False))


def uncompile(transformer) -> None:
    """Back to eager: drop every block's compiled call and dynamo's caches."""
    for block in repeated_blocks(transformer):
        block._compiled_call_impl = None
    transformer._fluximp_compiled = False
    torch._dynamo.reset()


def is_compile_error(err: BaseException) -> bool:
    """Errors raised by dynamo, AOTAutograd or inductor while building a graph (not an OOM, not a
    bug in the model that eager would hit as well)."""
    from torch._dynamo import exc as dynamo_exc

    kinds: tuple = (dynamo_exc.TorchDynamoException,)
    try:
        from torch._inductor.exc import InductorError

        kinds += (InductorError,)
    except ImportError:  # older torch
        pass
    return isinstance(err, kinds) and not isinstance(err, torch.cuda.OutOfMemoryError)


def run_first(fn: Callable[[], T], transformer, on_fallback: Callable[[], None] = lambda: None) -> T:
    """``fn()``, the first call of a compiled transformer; if compiling fails, log one line, go
    back to eager (``on_fallback`` resets what the failed call left, e.g. gradients) and call again."""
    if not is_compiled(transformer):
        return fn()
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - filtered by is_compile_error
        if not is_compile_error(err):
            raise
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        log.warning("torch.compile failed (%s: %s): running eager", type(err).__name__, first)
        uncompile(transformer)
        on_fallback()
        return fn()
