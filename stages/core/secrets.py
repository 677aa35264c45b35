"""The one secret scrubber: used wherever a value leaves the process — MLflow params, tags,
registered version descriptions and artifacts (stages.core.tracking, stages.core.registry), the Hub
folder (stages/publish.py), the evaluation report, and every log line (a filter that
stages.core.log.setup puts on the stage's log handler).

:func:`scrub` masks as ``***``:

- the values of environment variables named like credentials (:func:`secret_values`: ``HF_TOKEN``,
  ``MLFLOW_TRACKING_PASSWORD``, ``AWS_SECRET_ACCESS_KEY``, ...), and the password of a URL with
  ``user:password@`` held in any variable (``MLFLOW_TRACKING_URI``);
- a URL's ``user:password@`` part, wherever it appears;
- query parameters named like credentials (``?token=``, ``&X-Amz-Signature=``, ``api_key=``, ``sig=``);
- token shapes: Hugging Face ``hf_...`` tokens, AWS access key ids.

:func:`masked` applies it to a param (or a nested params dict) and masks a whole string whose key
names a credential (``hub.token``); :func:`scrub_file` scrubs a text file in place.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|API_?KEY|ACCESS_?KEY|_KEY$|^KEY$|AUTH",
                         re.IGNORECASE)
MASK = "***"
URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@?#]+@")
SECRET_QUERY = re.compile(r"(?i)([?&;](?:[^=&\s#?]*(?:token|key|secret|signature|password|passwd|auth|credential)"
                          r"[^=&\s#?]*|sig|pwd)=)[^&\s#'\"<>]+")
TOKEN_SHAPES = re.compile(r"\bhf_[A-Za-z0-9]{20,}|\bAKIA[0-9A-Z]{16}\b")


def secret_values() -> list[str]:
    """Values of environment variables named like credentials (long enough to be one), and the
    password of a URL with ``user:password@`` in any variable (``MLFLOW_TRACKING_URI``)."""
    vals = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 6}
    for v in os.environ.values():
        for m in re.finditer(r"://([^/\s@?#:]*):([^/\s@?#]+)@", v):
            if len(m[2]) >= 4:
                vals.update({m[2], f"{m[1]}:{m[2]}"})
    return sorted(vals, key=len, reverse=True)


def scrub(value: Any, secrets: list[str] | None = None) -> str:
    """``str(value)`` with every secret masked (see the module's docstring for what counts)."""
    text = str(value)
    for s in secret_values() if secrets is None else secrets:
        text = text.replace(s, MASK)
    text = URL_USERINFO.sub(rf"\1{MASK}@", text)
    text = SECRET_QUERY.sub(rf"\1{MASK}", text)
    return TOKEN_SHAPES.sub(MASK, text)


def masked(key: str, value: Any, secrets: list[str] | None = None) -> Any:
    """A param (or a nested params dict) as it may leave the process: a string under a key that
    names a credential (``hub.token``) becomes ``***``, every other string is scrubbed; numbers,
    booleans and None stay as they are."""
    if isinstance(value, dict):
        return {k: masked(k, v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [masked(key, v, secrets) for v in value]
    if isinstance(value, str):
        return MASK if value and SECRET_NAME.search(str(key).split(".")[-1]) else scrub(value, secrets)
    return value


def scrub_file(path: Path, secrets: list[str] | None = None) -> bool:
    """Scrub a UTF-8 text file in place; return False (file untouched) for a binary file that holds
    a secret (the caller drops it or refuses to publish it)."""
    secrets = secret_values() if secrets is None else secrets
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        loose = data.decode("latin-1")
        return scrub(loose, secrets) == loose
    clean = scrub(text, secrets)
    if clean != text:
        tmp = path.with_name(f".{path.name}.scrub.tmp")
        tmp.write_text(clean, encoding="utf-8")
        os.replace(tmp, path)
    return True
