"""Untrusted text (captions, titles, artists, licences, the trigger, prompts, params) in the Markdown
we generate: the model card (stages/modelcard.py), reports/caption/preview.md, the sweep summary.

- :func:`text`: inline text; line breaks become spaces and every character with an inline Markdown
  or HTML meaning is backslash-escaped (CommonMark renders an escaped ASCII punctuation character
  as itself), so no raw HTML, entity, link, image, emphasis or table-cell break gets through.
- :func:`code`: a code span (backtick fence longer than any run inside; HTML in it is shown, not
  run); ``table=True`` escapes ``|`` as GFM tables need even inside code spans.
- :func:`py`: a Python string literal (``repr``) for code snippets: quotes cannot break out.
"""
from __future__ import annotations

import re
from typing import Any

SPECIAL = re.compile(r"([\\`*_\[\]<>!|&~])")  # inline meaning: escapes, code, emphasis, links, HTML, cells


def _one_line(value: Any) -> str:
    return " ".join(str(value).split())


def text(value: Any) -> str:
    """``value`` as literal inline Markdown text, inside a line or a table cell (not at a line's
    start, where ``#``, ``-`` or ``1.`` would open a block)."""
    return SPECIAL.sub(r"\\\1", _one_line(value))


def code(value: Any, table: bool = False) -> str:
    """``value`` as a code span, whatever backticks it holds."""
    s = _one_line(value)
    if table:
        s = s.replace("|", "\\|")
    fence = "`" * (max((len(r) for r in re.findall(r"`+", s)), default=0) + 1)
    pad = " " if not s or s[0] == "`" or s[-1] == "`" else ""  # CommonMark strips one space each side
    return f"{fence}{pad}{s}{pad}{fence}"


def py(value: Any) -> str:
    """A Python string literal that evaluates to ``str(value)`` exactly."""
    return repr(str(value))
