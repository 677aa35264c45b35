"""Stage logging: one format everywhere, naming the stage that speaks."""
from __future__ import annotations

import logging
import os
import sys


def setup(stage: str) -> logging.Logger:
    level = os.environ.get("FLUXIMP_LOG", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [{stage}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("urllib3", "PIL", "matplotlib", "filelock", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(f"stages.{stage}")


def progress_disabled() -> bool:
    """tqdm bars off when not on a terminal unless FLUXIMP_PROGRESS=1 (CI logs stay short)."""
    flag = os.environ.get("FLUXIMP_PROGRESS")
    if flag is not None:
        return flag == "0"
    return not sys.stderr.isatty()
