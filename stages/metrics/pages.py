"""The jinja2 environment for the static pages the project writes (report.html, the A/B page).

Templates live in ``stages/metrics/templates/``; autoescaping is on, so every value a page shows is
HTML-escaped unless a template says otherwise.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).parent / "templates"


def fmt(v) -> str:
    """A number for a table cell: 4 significant digits; missing or non-finite values as a dash."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "\u2013"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    return env


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)
