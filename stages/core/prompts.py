"""Prompt files (``sample.prompts``, ``train.validation_prompts``) and the trigger word in prompts."""
from __future__ import annotations

from pathlib import Path


def read_prompts(path: Path | str) -> list[str]:
    """Non-empty lines of the prompt file, ``#`` comments skipped; duplicates are an error."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"prompt file {str(path)!r}: no such file")
    prompts = [ln.strip() for ln in path.read_text().splitlines()]
    prompts = [ln for ln in prompts if ln and not ln.startswith("#")]
    if not prompts:
        raise SystemExit(f"{path}: no prompts in the file")
    dupes = {p for p in prompts if prompts.count(p) > 1}
    if dupes:
        raise SystemExit(f"{path}: duplicate prompts {sorted(dupes)}")
    return prompts


def with_trigger(prompt: str, trigger: str) -> str:
    return f"{prompt}, {trigger}" if trigger and trigger not in prompt else prompt
