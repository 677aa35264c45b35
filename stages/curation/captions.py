"""Captions for the curated set: metadata templates, a VLM captioner, the trigger word, token
lengths and the held-out split. Used by ``stages/caption.py``.

- :func:`render` fills a template such as ``"{title}, a {genre} painting by {artist}, in the style of
  {trigger}"`` from a row's metadata. Missing fields never show up as "None": the template is cut into
  clauses at its commas/semicolons; a clause whose fields are all missing is dropped, and a clause
  with some missing fields loses them together with a dangling connector ("landscape by" -> "landscape").
- :class:`Captioner` wraps any transformers image-to-text model (BLIP, BLIP-2, Florence-2, GIT,
  VisionEncoderDecoder, chat VLMs) loaded by hub id or local folder, batched, on GPU when there is one.
- :class:`TokenCounter` measures captions against CLIP's 77 and T5's 512 tokens: with the base model's
  own tokenizers when they can be loaded, otherwise with CLIP's real BPE (bundled with open_clip, no
  download) and a T5 estimate (see :func:`t5_estimate`).
- :func:`split_holdout` draws the seeded, artist-stratified held-out set.
"""
from __future__ import annotations

import gzip
import importlib.util
import logging
import math
import re
import string
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

CLIP_MAX_TOKENS = 77
T5_MAX_TOKENS = 512
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


# ------------------------------------------------------------------------------------ token lengths
def t5_estimate(text: str) -> int:
    """Approximate T5 token count (sentencepiece, 32k vocab), used only when the base model's T5
    tokenizer is unavailable: one piece per punctuation mark and per digit, ceil(len/4) pieces per
    alphabetic word (common words are one piece in T5, so this over-estimates, the safe side for a
    truncation check), plus the end-of-sequence token."""
    pieces = re.findall(r"[^\W\d_]+|\d|[^\w\s]|_", text)
    return 1 + sum(max(1, math.ceil(len(p) / 4)) if p[0].isalpha() else 1 for p in pieces)


def bundled_clip_tokenizer():
    """CLIP's BPE from the vocabulary file that ships inside open_clip (no download), rebuilt with
    ``tokenizers`` the way transformers converts CLIPTokenizer (lower-case, CLIP's split regex,
    byte-level BPE with ``</w>`` word ends). Token ids differ from OpenAI's; counts are the same."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ImportError("open_clip is not installed (its bundled CLIP vocabulary is needed)")
    bpe = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab_list = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    tk = Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                              unk_token="<|endoftext|>", fuse_unk=False))
    tk.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                          normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tk.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return tk


class TokenCounter:
    """Token lengths of captions for Flux's two text encoders (CLIP-L: 77, T5-XXL: 512), special
    tokens included. ``base`` is a diffusers model folder or hub id with ``tokenizer/`` (CLIP) and
    ``tokenizer_2/`` (T5); when those cannot be loaded (the smoke profile's ``tiny-random``, offline,
    gated), CLIP counts come from :func:`bundled_clip_tokenizer` and T5 counts from :func:`t5_estimate`."""

    def __init__(self, base: Optional[str] = None, revision: Optional[str] = None):
        self.clip = self.t5 = None
        self.method = {"clip": "open_clip bundled BPE", "t5": "estimate (t5_estimate)"}
        if base and base != "tiny-random":
            try:
                from transformers import AutoTokenizer

                self.clip = AutoTokenizer.from_pretrained(base, subfolder="tokenizer", revision=revision)
                self.t5 = AutoTokenizer.from_pretrained(base, subfolder="tokenizer_2", revision=revision)
                self.method = {"clip": f"{base}/tokenizer", "t5": f"{base}/tokenizer_2"}
            except Exception as err:  # noqa: BLE001 - any failure means: fall back, and say so
                log.warning("tokenizers of %s not available (%s); using the bundled CLIP BPE and a T5 "
                            "estimate", base, str(err).splitlines()[0][:200])
                self.clip = self.t5 = None
        if self.clip is None:
            self._bundled = bundled_clip_tokenizer()

    def count(self, captions: Sequence[str]) -> tuple[list[int], list[int]]:
        if not captions:
            return [], []
        if self.clip is None:
            clip = [len(e.ids) for e in self._bundled.encode_batch(list(captions))]
            return clip, [t5_estimate(c) for c in captions]
        clip = [len(ids) for ids in self.clip(list(captions), truncation=False)["input_ids"]]
        t5 = [len(ids) for ids in self.t5(list(captions), truncation=False)["input_ids"]]
        return clip, t5


def truncation_counts(clip_lengths: Iterable[int], t5_lengths: Iterable[int]) -> dict:
    clip_lengths, t5_lengths = list(clip_lengths), list(t5_lengths)
    return {"clip_max_tokens": CLIP_MAX_TOKENS, "t5_max_tokens": T5_MAX_TOKENS,
            "clip_truncated": sum(n > CLIP_MAX_TOKENS for n in clip_lengths),
            "t5_truncated": sum(n > T5_MAX_TOKENS for n in t5_lengths),
            "clip_tokens_max": max(clip_lengths, default=0), "t5_tokens_max": max(t5_lengths, default=0),
            "clip_tokens_mean": float(np.mean(clip_lengths)) if clip_lengths else 0.0}


# ------------------------------------------------------------------------------------------- VLM
class Captioner:
    """A transformers image-to-text model, by hub id or local folder, that describes what a picture
    shows. ``prompt``: for chat models (a processor with a chat template) the user instruction; for
    prefix models such as BLIP the text the caption continues (e.g. "a picture of"); "" for none.
    The prompt is stripped from the answers."""

    def __init__(self, model: str, prompt: str = "", max_new_tokens: int = 40, batch_size: int = 8,
                 device: Optional[str] = None):
        from stages.core import compat

        compat.ensure_torchvision()
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.processor = AutoProcessor.from_pretrained(model)
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(self.device).eval()
        self.prompt, self.max_new_tokens, self.batch_size = prompt.strip(), max_new_tokens, batch_size
        self.chat = bool(getattr(self.processor, "chat_template", None)) and bool(self.prompt)
        log.info("captioner %s (%s) on %s, prompt %r", model, type(self.model).__name__, self.device, prompt)
        if self.prompt and not self.chat and self.prompt[-1] in ".?!:":
            log.warning("caption.prompt %r reads like an instruction, but %s has no chat template: the "
                        "caption continues it as a prefix (for BLIP-like models use e.g. 'a picture of')",
                        self.prompt, model)

    def _inputs(self, images: list):
        if self.chat:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            text = self.processor.apply_chat_template(msgs, add_generation_prompt=True)
            return self.processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
        if self.prompt:
            return self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt",
                                  padding=True)
        return self.processor(images=images, return_tensors="pt")

    def _clean(self, text: str) -> str:
        text = " ".join(text.split())
        if self.prompt and text.lower().startswith(self.prompt.lower()):
            text = text[len(self.prompt):]
        return text.strip(" ,;:.")

    def __call__(self, images: Sequence) -> list[str]:
        """One content description per PIL image, in batches of ``batch_size``."""
        import torch

        out: list[str] = []
        for i in range(0, len(images), self.batch_size):
            batch = [img.convert("RGB") for img in images[i:i + self.batch_size]]
            inputs = self._inputs(batch).to(self.device)
            inputs.pop("token_type_ids", None)  # BERT-tokenizer output that generate() may refuse (GIT)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            prompt_ids = inputs.get("input_ids")
            if (prompt_ids is not None and not self.model.config.is_encoder_decoder
                    and ids.shape[1] > prompt_ids.shape[1] and torch.equal(ids[:, :prompt_ids.shape[1]], prompt_ids)):
                ids = ids[:, prompt_ids.shape[1]:]  # decoder-only models echo the prompt
            out.extend(self._clean(t) for t in self.processor.batch_decode(ids, skip_special_tokens=True))
        return out


# ----------------------------------------------------------------------------------- held-out split
def split_holdout(ids: Sequence[str], artists: Sequence[Optional[str]], fraction: float,
                  seed: int) -> dict[str, str]:
    """``{id: "train" | "holdout"}``. About ``fraction`` of the images (at least one when
    ``fraction > 0`` and there are two or more, never all) are held out, spread over artists in
    proportion to their counts (largest remainders, seeded tie-breaks); images without an artist form
    one stratum. The result depends only on the set of (id, artist) pairs, the fraction and the seed,
    not on the input order."""
    pairs = sorted(set(zip(ids, [clean_value("artist", a) or "" for a in artists])))
    if len({i for i, _ in pairs}) != len(pairs):
        raise ValueError("split_holdout: an id appears with two different artists")
    n = len(pairs)
    target = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(fraction * n)))
    rng = np.random.default_rng(seed)
    strata: dict[str, list[str]] = {}
    for i, artist in pairs:
        strata.setdefault(artist, []).append(i)
    names = sorted(strata)
    quota = {a: target * len(strata[a]) / n for a in names}
    take = {a: int(math.floor(quota[a])) for a in names}
    tiebreak = rng.random(len(names))
    by_remainder = sorted(range(len(names)), key=lambda k: (-(quota[names[k]] - take[names[k]]), tiebreak[k]))
    for k in by_remainder[: target - sum(take.values())]:
        take[names[k]] += 1
    split = {}
    for a in names:
        members = list(strata[a])
        rng.shuffle(members)
        split.update({i: ("holdout" if j < take[a] else "train") for j, i in enumerate(members)})
    return split


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
