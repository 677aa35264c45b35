"""Prompt files (``sample.prompts``, ``train.validation_prompts``) and the trigger word in prompts.

What a prompt file may be (prompts end up in samples/index.json, the A/B page and MLflow, so a wrong
path must not publish some other file's lines): a regular ``.txt`` file of UTF-8 text, at most
``MAX_BYTES``, one prompt per line. A relative path is read from the project and must stay inside it
(no ``..`` or symlink out of it); an absolute path is taken as the user's explicit choice, with the
same rules of kind, size and content. A FIFO, a device, a directory, a binary or a huge file is refused.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

SUFFIX = ".txt"
MAX_BYTES = 1 << 20  # 1 MiB: thousands of prompts


def prompt_file_problem(path: Path | str, root: Path | str = ".") -> str | None:
    """Why ``path`` is no prompt file (one sentence naming what works), or None when it is one."""
    path = Path(path)
    if path.suffix.lower() != SUFFIX:
        return f"is not a {SUFFIX} file: a prompt file is plain text, one prompt per line, e.g. conf/prompts/smoke.txt"
    if not path.is_absolute():
        root = Path(root).resolve()
        if not (root / path).resolve().is_relative_to(root):
            return (f"leads out of the project ({root}): keep prompt files in it (e.g. conf/prompts/), "
                    "or give an absolute path")
        path = root / path
    try:
        st = os.stat(path)
    except OSError:
        return "is no such file"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (a directory, FIFO or device): give a .txt file"
    if st.st_size > MAX_BYTES:
        return f"is {st.st_size} bytes, more than the {MAX_BYTES} a prompt file may have"
    return None


def read_prompts(path: Path | str, key: str = "prompt file") -> list[str]:
    """Non-empty lines of the prompt file, ``#`` comments skipped; duplicates are an error."""
    path = Path(path)
    problem = prompt_file_problem(path)
    if problem:
        raise SystemExit(f"{key} = {str(path)!r}: {problem}")
    data = path.read_bytes()[:MAX_BYTES + 1]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise SystemExit(f"{key} = {str(path)!r} is not UTF-8 text (binary?): give a .txt file of prompts")
    prompts = [ln.strip() for ln in text.splitlines()]
    prompts = [ln for ln in prompts if ln and not ln.startswith("#")]
    if not prompts:
        raise SystemExit(f"{key} = {str(path)!r}: no prompts in the file")
    dupes = {p for p in prompts if prompts.count(p) > 1}
    if dupes:
        raise SystemExit(f"{key} = {str(path)!r}: duplicate prompts {sorted(dupes)}")
    return prompts


def with_trigger(prompt: str, trigger: str) -> str:
    return f"{prompt}, {trigger}" if trigger and trigger not in prompt else prompt
