"""A VLM captioner: any transformers image-to-text model that describes what a picture shows.

Used by the caption stage's ``vlm`` and ``combined`` backends (``caption.model``): BLIP, BLIP-2,
Florence-2, GIT, VisionEncoderDecoder, chat VLMs, loaded by hub id or local folder, batched, on GPU
when there is one.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

log = logging.getLogger(__name__)


class Captioner:
    """A transformers image-to-text model, by hub id or local folder, that describes what a picture
    shows. ``prompt``: for chat models (a processor with a chat template) the user instruction; for
    prefix models such as BLIP the text the caption continues (e.g. "a picture of"); "" for none.
    The prompt is stripped from the answers."""

    def __init__(self, model: str, prompt: str = "", max_new_tokens: int = 40, batch_size: int = 8,
                 device: Optional[str] = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from stages.core.device import default_device, default_dtype

        self.device = device or str(default_device())
        dtype = default_dtype(self.device)
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
