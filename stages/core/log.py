"""Stage logging: one format everywhere, progress that shows off a terminal, no third-party noise.

Environment switches (README "Logs and progress"):

- ``FLUXIMP_LOG``: log level of the stages (default ``INFO``; ``DEBUG`` logs every train step).
- ``FLUXIMP_PROGRESS``: ``auto`` (default: tqdm bars on a terminal, a log line every
  ``FLUXIMP_PROGRESS_EVERY`` seconds otherwise), ``bar``, ``log``, or ``0`` (none; the tests' default).
- ``FLUXIMP_PROGRESS_EVERY``: seconds between progress log lines (default 30).

``quiet()`` (run when the ``stages`` package is imported, before any third-party import) drops the
third-party warnings a user cannot act on; ``NOISE_LOGS`` and ``NOISE_WARNINGS`` list each one
with the reason. Anything not listed still shows.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings

log = logging.getLogger(__name__)


def _mode() -> str:
    flag = os.environ.get("FLUXIMP_PROGRESS", "auto").lower()
    if flag in ("0", "off", "none", "false"):
        return "off"
    if flag in ("bar", "log"):
        return flag
    return "bar" if sys.stderr.isatty() else "log"


if _mode() != "bar":  # other libraries' bars (diffusers' pipeline loading, ...) off a terminal.
    os.environ.setdefault("TQDM_DISABLE", "1")  # Before tqdm's import: it reads TQDM_* only then.
from tqdm import tqdm  # noqa: E402  (ours pass disable= explicitly, so this default is not theirs)


# (logger or warning module, message regex, why it is dropped). Loggers: the exact logger that
# emits (a filter on a logger sees only its own records); warnings: the module that calls warn().
NOISE_LOGS = [
    ("torchao", r"Failed to load .*torchao/_C_(mxfp8\.cpython-310|cutlass_90a)",
     "torchao 0.18's wheel ships a cp310 mxfp8 kernel and a CUDA sm90a one; neither can load on "
     "CPython 3.11 / a CPU torch, and nothing we run uses them"),
    ("torchao.kernel.intmm", r"Detected no triton",
     "no triton on CPU torch: torchao's int-matmul triton kernels are not used here"),
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported",
     "torchao 0.18 registers Enums the old way at import; a torchao matter, no effect on us"),
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community",
     "optional faster CPU nf4 kernel from the Hub; bitsandbytes falls back to its own"),
    ("diffusers.quantizers.torchao.torchao_quantizer", r"Unable to import `torchao` Tensor objects",
     "legacy torchao checkpoint classes; we never load torchao-serialized checkpoints"),
    ("diffusers.loaders.lora_base", r"No LoRA keys associated to (CLIPTextModel|NoneType) found with the "
     r"prefix='text_encoder'",
     "our adapters train the transformer only (and sample loads a pipeline without text encoders)"),
    ("diffusers.loaders.lora_pipeline", r"No LoRA keys associated to (CLIPTextModel|NoneType) found",
     "as above (the same message from the pipeline loader)"),
    ("transformers.tokenization_utils_base", r"Token indices sequence length is longer than the "
     r"specified maximum sequence length for this model \(\d+ > 77\)",
     "FLUX's CLIP prompt is cut at 77 tokens by design (T5 reads the whole caption); the caption "
     "stage reports how many captions exceed 77 (reports/caption)"),
    ("mlflow.utils.requirements_utils", r"Found torch(vision)? version \(.*\+cpu\) contains a local",
     "the CPU wheel's +cpu label; MLflow records torch==<version>, which is what we pin"),
    ("mlflow.diffusers", r"Could not resolve HuggingFace commit hash for ",
     "MLflow's own hub lookup when it saves the adapter; stages/core/registry.py replaces it with the "
     "pinned model.revision (the real profiles pin one: docs/training.md)"),
    ("root", r"No pretrained weights loaded for model 'fluximp-tiny",
     "the smoke profile's tiny CLIP is random on purpose (a real model without weights still warns)"),
]
NOISE_WARNINGS = [
    ("torchmetrics", r"Metric `Kernel Inception Distance` will save all extracted features",
     "KID keeps the features of the held-out set and the samples: a few thousand vectors at most"),
    ("peft.tuners.lora.torchao", r"TorchaoLoraLinear was instantiated without `get_apply_tensor_subclass`",
     "only merge()/unmerge() need it; training never merges the adapter into the int8 base (exports "
     "save the adapter alone)"),
]


class _Drop(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet() -> None:
    """Install the NOISE filters (idempotent) and keep third-party progress bars off a terminal."""
    for name, pattern, _why in NOISE_LOGS:
        logger = logging.getLogger(None if name == "root" else name)
        if not any(isinstance(f, _Drop) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_Drop(pattern))
    for module, pattern, _why in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, module=module)
    if _mode() != "bar":  # diffusers / transformers / hub loading bars garble piped logs
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class ScrubSecrets(logging.Filter):
    """Masks secrets in every record a handler emits (stages.core.secrets.scrub)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from stages.core.secrets import scrub

        msg = record.getMessage()
        clean = scrub(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


def _scrubbed_excepthook(kind, value, tb) -> None:
    """An uncaught exception's traceback with secrets masked (a URL with a token in an error)."""
    import traceback

    from stages.core.secrets import scrub

    sys.stderr.write(scrub("".join(traceback.format_exception(kind, value, tb))))


def setup(stage: str) -> logging.Logger:
    level = os.environ.get("FLUXIMP_LOG", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [{stage}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(ScrubSecrets())
    sys.excepthook = _scrubbed_excepthook
    for noisy in ("urllib3", "PIL", "matplotlib", "filelock", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet()
    from stages.core import lifecycle

    lifecycle.die_with_parent()  # run by DVC: the stage ends with DVC (no orphan writing outputs)
    return logging.getLogger(f"stages.{stage}")


# ----------------------------------------------------------------------------- progress
def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


class LogProgress(tqdm):
    """A tqdm that, instead of drawing, logs one line per ``every`` seconds (and a last one):
    ``train: 120/600 (20%) 2.10 it/s, elapsed 00:57, ETA 03:48, loss=0.31 lr=1.00e-04``."""

    def __init__(self, *args, every: float = 30.0, logger: logging.Logger | None = None, **kwargs):
        self._every, self._logger, self._last, self._logged_n = every, logger or log, None, None
        kwargs.update(mininterval=0, miniters=1, file=open(os.devnull, "w"), ascii=True, disable=False)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):  # tqdm calls it on every update, set_postfix and close
        now = time.monotonic()
        if self.n == self._logged_n or (self._last is None and self.n == self.initial):
            return True  # nothing new (or nothing done yet)
        if self._last is not None and now - self._last < self._every and not self.disable \
                and self.n != self.total:
            return True
        self._last, self._logged_n = now, self.n
        self._logger.info("%s", self.line())
        return True

    def line(self) -> str:
        d = self.format_dict
        n, total, rate = d["n"], d["total"], d["rate"]
        if rate is None and d["elapsed"]:
            rate = (n - self.initial) / d["elapsed"]
        done = f"{n}/{total} ({100 * n / total:.0f}%)" if total else f"{n}"
        eta = (total - n) / rate if total and rate else None
        unit = d.get("unit") or "it"
        postfix = f", {d['postfix']}" if d.get("postfix") else ""
        return (f"{d.get('prefix') or 'progress'}: {done} {rate or 0:.3g} {unit}/s, elapsed "
                f"{_clock(d['elapsed'])}, ETA {_clock(eta)}{postfix}")

    def close(self):  # logs the last line (tqdm's close displays once more), then closes devnull
        fp = self.fp
        super().close()
        fp.close()


def progress(iterable=None, *, desc: str, total: int | None = None, disable: bool = False,
             logger: logging.Logger | None = None, **kwargs) -> tqdm:
    """``tqdm(...)`` for the stages' long loops: a bar on a terminal, a log line every
    FLUXIMP_PROGRESS_EVERY s (step, total, rate, ETA, postfix) when stderr is not a terminal."""
    mode = _mode()
    if disable or mode == "off":
        return tqdm(iterable, total=total, desc=desc, disable=True, **kwargs)
    if mode == "bar":
        return tqdm(iterable, total=total, desc=desc, disable=False, **kwargs)
    every = float(os.environ.get("FLUXIMP_PROGRESS_EVERY", "30"))
    return LogProgress(iterable, total=total, desc=desc, every=every, logger=logger, **kwargs)
