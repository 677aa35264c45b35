"""Caption lengths in tokens for Flux's two text encoders: CLIP-L (77 tokens) and T5-XXL (512).

:class:`TokenCounter` uses the base model's own tokenizers when they can be loaded; otherwise CLIP
counts come from open_clip's tokenizer (the same BPE, bundled with open_clip, no download) and T5
counts from :func:`t5_estimate`. The caption stage reports truncations with :func:`truncation_counts`.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Iterable, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

CLIP_MAX_TOKENS = 77
T5_MAX_TOKENS = 512


def t5_estimate(text: str) -> int:
    """Approximate T5 token count (sentencepiece, 32k vocab), used only when the base model's T5
    tokenizer is unavailable: one piece per punctuation mark and per digit, ceil(len/4) pieces per
    alphabetic word (common words are one piece in T5, so this over-estimates, the safe side for a
    truncation check), plus the end-of-sequence token."""
    pieces = re.findall(r"[^\W\d_]+|\d|[^\w\s]|_", text)
    return 1 + sum(max(1, math.ceil(len(p) / 4)) if p[0].isalpha() else 1 for p in pieces)


def open_clip_tokenizer():
    """open_clip's own CLIP BPE tokenizer (its vocabulary ships with the package: no download)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class TokenCounter:
    """Token lengths of captions for Flux's two text encoders (CLIP-L: 77, T5-XXL: 512), special
    tokens included. ``base`` is a diffusers model folder or hub id with ``tokenizer/`` (CLIP) and
    ``tokenizer_2/`` (T5); when those cannot be loaded (the smoke profile's ``tiny-random``, offline,
    gated), CLIP counts come from :func:`open_clip_tokenizer` and T5 counts from :func:`t5_estimate`."""

    def __init__(self, base: Optional[str] = None, revision: Optional[str] = None):
        self.clip = self.t5 = None
        self.method = {"clip": "open_clip SimpleTokenizer", "t5": "estimate (t5_estimate)"}
        if base and base != "tiny-random":
            try:
                from transformers import AutoTokenizer

                self.clip = AutoTokenizer.from_pretrained(base, subfolder="tokenizer", revision=revision)
                self.t5 = AutoTokenizer.from_pretrained(base, subfolder="tokenizer_2", revision=revision)
                self.method = {"clip": f"{base}/tokenizer", "t5": f"{base}/tokenizer_2"}
            except Exception as err:  # noqa: BLE001 - any failure means: fall back, and say so
                log.warning("tokenizers of %s not available (%s); using open_clip's CLIP BPE and a T5 "
                            "estimate", base, str(err).splitlines()[0][:200])
                self.clip = self.t5 = None
        if self.clip is None:
            self._open_clip = open_clip_tokenizer()

    def count(self, captions: Sequence[str]) -> tuple[list[int], list[int]]:
        if not captions:
            return [], []
        if self.clip is None:
            clip = [len(self._open_clip.encode(c)) + 2 for c in captions]  # + start/end of text
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
