"""Captions for the curated set: metadata templates, the trigger word and captioning a batch of rows
(user captions, templates, VLM descriptions). Used by ``stages/caption.py``; the VLM itself is
``stages/models/captioner.py``, token lengths are ``stages/models/tokens.py`` and the held-out split
is ``stages/data/holdout.py``.

- :func:`render` fills a template such as ``"{title}, a {genre} painting by {artist}, in the style of
  {trigger}"`` from a row's metadata. Missing fields never show up as "None": the template is cut into
  clauses at its commas/semicolons; a clause whose fields are all missing is dropped, and a clause
  with some missing fields loses them together with a dangling connector ("landscape by" -> "landscape").
- :func:`caption_batch` gives each row its caption: the user's own (kept, with the trigger added where
  missing) unless ``keep_existing`` is off, a template, a VLM description, or both combined.
"""
from __future__ import annotations

import logging
import math
import re
import string
from typing import Any, Callable, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

# Fields a template may use: the metadata columns of core.shards.IMAGE_SCHEMA, the VLM's content
# description and the trigger.
TEMPLATE_FIELDS = ("artist", "title", "style", "genre", "date", "description", "source", "license",
                   "content", "trigger")
_LABEL_FIELDS = ("artist", "style", "genre")  # WikiArt class labels such as "claude-monet", "genre_painting"
_MISSING = {"", "none", "null", "nan", "n/a", "unknown", "unknown artist", "unknown genre", "unknown style"}
_DANGLING = {"a", "an", "the", "by", "of", "in", "with", "and", "or", "from", "at", "on", "for", "to"}
_SEP = re.compile(r"(\s*[,;]\s*)")


# ---------------------------------------------------------------------------------------- templates
def clean_value(field: str, value: Any) -> Optional[str]:
    """A metadata value as caption text, or None when it is missing ("None", "nan", "Unknown Artist")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = " ".join(str(value).split()).strip(" ,;.")
    if text.lower() in _MISSING:
        return None
    if field in _LABEL_FIELDS and " " not in text and re.search(r"[_-]", text):
        text = re.sub(r"[_-]+", " ", text)
        if field == "artist" and text.islower():
            text = text.title()
    return text


def template_fields(template: str) -> list[str]:
    """Field names used by ``template``; a clear error for unknown names or broken braces."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"caption.template {template!r} is not a valid template: {err}") from None
    unknown = sorted({n for n in names if n not in TEMPLATE_FIELDS})
    if unknown or "" in names:
        raise ValueError(f"caption.template {template!r} uses unknown fields {unknown or ['{}']}; "
                         f"allowed: {', '.join(TEMPLATE_FIELDS)}")
    return names


def with_trigger(template: str) -> str:
    """The template with ``{trigger}`` appended as a last clause when it does not place it itself."""
    return template if "trigger" in template_fields(template) else template.rstrip(" ,;.") + ", {trigger}"


def _render_clause(clause: str, values: Mapping[str, Optional[str]]) -> str:
    names = template_fields(clause)
    if names and all(values.get(n) is None for n in names):
        return ""
    words = clause.format(**{n: values.get(n) or "\0" for n in names}).split()  # \0 marks a missing value
    keep = []
    for i, w in enumerate(words):
        if "\0" in w:  # drop the gap and punctuation around it: "(\0)" -> nothing
            w = w.replace("\0", "")
            if not any(ch.isalnum() for ch in w):
                continue
        elif w.lower() in _DANGLING and i + 1 < len(words) and "\0" in words[i + 1]:
            if w.lower() in ("a", "an", "the") and i + 2 < len(words):  # "a \0 painting" -> "a painting"
                nxt = words[i + 2].lstrip("(\"'")
                w = w if w.lower() == "the" else ("an" if nxt[:1].lower() in "aeiou" and nxt else "a")
            else:
                continue  # a connector before a gap dangles: "by \0" -> nothing
        keep.append(w)
    while keep and keep[-1].lower() in _DANGLING:
        keep.pop()
    while keep and keep[0].lower() in ("and", "or"):
        keep.pop(0)
    return re.sub(r"\s+([.!?)])", r"\1", re.sub(r"\(\s*\)", "", " ".join(keep))).strip()


def render(template: str, fields: Mapping[str, Any], trigger: Optional[str] = None) -> str:
    """Fill ``template`` from ``fields`` (a metadata row); ``trigger`` is placed by ``{trigger}`` or
    appended. Missing fields leave no "None", double commas or dangling separators."""
    values = {f: clean_value(f, fields.get(f)) for f in TEMPLATE_FIELDS if f != "trigger"}
    values["trigger"] = clean_value("trigger", trigger)
    parts = _SEP.split(with_trigger(template))  # [clause, sep, clause, sep, ...]
    out: list[str] = []
    for i in range(0, len(parts), 2):
        text = _render_clause(parts[i], values)
        if text:
            out.extend([parts[i - 1] if i and out else "", text])
    return "".join(out).strip(" ,;")


def add_trigger(caption: str, trigger: Optional[str]) -> str:
    """An existing caption with the trigger appended unless it already contains it."""
    caption = " ".join(caption.split()).strip(" ,;")
    trig = clean_value("trigger", trigger)
    if not trig or trig.lower() in caption.lower():
        return caption
    return f"{caption.rstrip('.')}, {trig}" if caption else trig


# ------------------------------------------------------------------------------- caption a batch
def combined_template(template: str) -> str:
    """The template for the ``combined`` backend: the VLM's ``{content}`` first unless placed."""
    return template if "content" in template_fields(template) else "{content}, " + template


def caption_batch(rows: Sequence[Mapping[str, Any]], backend: str, template: str, trigger: Optional[str],
                  keep_existing: bool = True,
                  describe: Optional[Callable[[list], list[str]]] = None) -> list[tuple[str, str]]:
    """``(caption, how)`` for each row (a shard row with metadata and ``image`` bytes). ``how`` is
    ``existing``, ``template``, ``vlm``, ``combined``, or ``template (vlm failed: <why>)`` when an
    image cannot be decoded or the VLM returns nothing. ``describe`` maps PIL images to content
    descriptions (a :class:`Captioner`), needed by the ``vlm`` and ``combined`` backends."""
    from stages.core.images import decode

    out: list[Optional[tuple[str, str]]] = [None] * len(rows)
    todo, pics = [], []
    for k, row in enumerate(rows):
        existing = clean_value("caption", row.get("caption"))
        if keep_existing and existing:
            out[k] = (add_trigger(existing, trigger), "existing")
        elif backend == "template":
            out[k] = (render(template, row, trigger), "template")
        else:
            try:
                pics.append(decode(row["image"]))
                todo.append(k)
            except Exception as err:  # noqa: BLE001 - recorded, the row falls back to its metadata
                log.warning("image %s cannot be decoded for the VLM (%s): template caption", row.get("id"), err)
                out[k] = (render(template, row, trigger), "template (vlm failed: undecodable image)")
    if todo:
        if describe is None:
            raise ValueError(f"caption.backend={backend} needs an image-to-text model (caption.model)")
        contents = describe(pics)
        if len(contents) != len(todo):
            raise RuntimeError(f"the captioner returned {len(contents)} captions for {len(todo)} images")
        for k, content in zip(todo, contents):
            content = clean_value("content", content)
            if not content:
                out[k] = (render(template, rows[k], trigger), "template (vlm failed: empty output)")
            elif backend == "vlm":
                out[k] = (add_trigger(content, trigger), "vlm")
            else:
                out[k] = (render(combined_template(template), {**rows[k], "content": content}, trigger), "combined")
    return out  # type: ignore[return-value]
