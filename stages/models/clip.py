"""CLIP image/text embeddings through open_clip, shared by the filter and evaluate stages.

``load_clip(params.clip, seed=params.seed)`` returns a :class:`ClipModel`:

- ``clip.model = "ViT-L-14"``, ``clip.pretrained = "openai"`` is the real one (the LAION aesthetic
  head expects exactly its 768-d embedding); any open_clip name, ``local-dir:/folder`` or
  ``hf-hub:org/repo`` works, and ``pretrained`` may be a tag or a local checkpoint file.
- ``clip.model = "tiny"`` is a small open_clip ViT built from :data:`TINY_CONFIG` with seeded random
  weights and open_clip's bundled tokenizer: no download, deterministic, meaningless scores (the
  filter switches its CLIP thresholds to percentiles for it). ``pretrained`` may still name a local
  checkpoint of that architecture (tests save one and load it by path).

Embeddings are float32 and L2-normalised. :func:`save_embeddings` / :func:`load_embeddings` are the
cache format (``data/interim/clip_embeddings.safetensors``): tensor ``embeddings`` (N x D) plus
metadata ``ids`` (JSON list, row order) and ``model``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from stages.core.device import default_device
from stages.core.log import progress as progress_bar

log = logging.getLogger(__name__)

TINY = "tiny"
TINY_NAME = "fluximp-tiny-vit"  # the name the tiny config is registered under in open_clip
TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _register_tiny(open_clip) -> None:
    if TINY_NAME in open_clip.list_models():
        return
    folder = Path(tempfile.mkdtemp(prefix="fluximp-clip-"))
    (folder / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder)


def on_float16_grid(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest float16 (kept as float32). Two machines' BLAS kernels
    differ in the last float32 bits; rounding to 11 significant bits makes most of those
    differences vanish (only a value within that noise of a rounding boundary still differs), so
    the saved embedding file agrees far more often across machines. It does not guarantee
    bit-identical files (that would need deterministic kernels). Cosines move by < 1e-3; the
    in-memory embeddings the filter scores are not rounded."""
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


@dataclass
class ClipModel:
    """An open_clip model in eval mode with its preprocessing and tokenizer."""

    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    device: str
    name: str           # what the cache records, e.g. "ViT-L-14/openai" or "tiny/seed=1234"
    batch_size: int = 32

    @property
    def dim(self) -> int:
        return int(self.model.visual.output_dim)

    def _autocast(self):
        """fp16 autocast on CUDA (as OpenAI's CLIP runs there), plain fp32 on CPU."""
        if str(self.device).startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _prep(self, img: Image.Image) -> torch.Tensor:
        return self.preprocess(img.convert("RGB"))

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image], batch_size: Optional[int] = None,
                     progress: bool = False) -> np.ndarray:
        """PIL images -> (N, D) float32, L2-normalised; batched on ``self.device``. Preprocessing
        runs in threads; on a GPU the next batch is prepared while the current one computes."""
        from stages.core.pool import threads

        bs = batch_size or self.batch_size
        out, running = [], None
        with threads("clip-prep") as pool:
            for i in progress_bar(range(0, len(images), bs), desc="clip images", unit="batch",
                                  disable=not progress):
                batch = torch.stack(list(pool.map(self._prep, images[i:i + bs])))
                if running is not None:  # wait for the previous batch only now
                    out.append(running.cpu().numpy())
                with self._autocast():
                    feats = self.model.encode_image(batch.to(self.device, non_blocking=True))
                running = torch.nn.functional.normalize(feats.float(), dim=-1)
        if running is not None:
            out.append(running.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> (N, D) float32, L2-normalised."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with self._autocast():
            feats = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()

    def zero_shot(self, image_embeddings: np.ndarray, positive: Sequence[str],
                  negative: Sequence[str]) -> np.ndarray:
        """Probability mass on the ``positive`` prompts in a softmax over all prompts (CLIP's
        zero-shot classifier with its learnt temperature): one score in [0, 1] per image."""
        if not positive or not negative:
            raise ValueError("zero_shot needs at least one positive and one negative prompt")
        text = torch.from_numpy(self.embed_texts(list(positive) + list(negative)))
        scale = float(self.model.logit_scale.detach().exp())
        # in torch, not numpy: numpy's matrix product runs OpenBLAS, whose kernel is chosen by the CPU
        # (SkylakeX on an AVX-512 Xeon, Haswell/Zen on an AMD EPYC: other last bits); torch's CPU
        # arithmetic is pinned (stages/core/numerics.py)
        emb = torch.from_numpy(np.ascontiguousarray(image_embeddings, dtype=np.float32))
        probs = torch.softmax(scale * emb @ text.T, dim=1)
        return probs[:, : len(positive)].sum(dim=1).numpy()


def load_clip(clip_params, device: Optional[str] = None, seed: int = 0) -> ClipModel:
    """Build the CLIP model that ``clip_params`` (the ``clip`` params section) names."""
    import open_clip

    device = device or str(default_device())
    name, pretrained = clip_params.model, clip_params.pretrained
    kwargs = {}
    if name == TINY:
        _register_tiny(open_clip)
        arch = TINY_NAME
        label = f"{TINY}/" + (str(pretrained) if pretrained else f"seed={seed}")
    else:
        arch = name
        label = f"{name}/{pretrained}" if pretrained else f"{name}/random"
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
        if tag_cfg.get("quick_gelu"):  # OpenAI's weights were trained with QuickGELU
            kwargs["force_quick_gelu"] = True
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # open_clip logs every step at INFO on the root
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random weights (tiny / pretrained=None) are reproducible
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained, device=device, **kwargs)
        tokenizer = open_clip.get_tokenizer(arch)
    finally:
        root.setLevel(level)
    model.eval()
    log.info("CLIP %s on %s", label, device)
    return ClipModel(model, preprocess, tokenizer, device, label, clip_params.batch_size)


def save_embeddings(path: Path | str, ids: Sequence[str], embeddings: np.ndarray, model: str) -> Path:
    """Write the embedding cache atomically (safetensors, values on the float16 grid; ids and model
    name in its one metadata key ``meta``, a JSON object: see stages/core/tensorfiles.py)."""
    from stages.core import tensorfiles
    from stages.core.io import atomic_file

    embeddings = np.ascontiguousarray(on_float16_grid(embeddings))
    if embeddings.ndim != 2 or len(ids) != embeddings.shape[0]:
        raise ValueError(f"{len(ids)} ids for embeddings of shape {embeddings.shape}")
    path = Path(path)
    with atomic_file(path, ".safetensors") as tmp:
        tensorfiles.save({"embeddings": embeddings}, tmp,
                         {"meta": json.dumps({"ids": list(ids), "model": model})})
    return path


def load_embeddings(path: Path | str) -> tuple[list[str], np.ndarray, str]:
    """Read the embedding cache: ``(ids, embeddings (N, D) float32, model name)``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata() or {}
        emb = fh.get_tensor("embeddings")
    if "meta" in meta:
        meta = json.loads(meta["meta"])
        return meta["ids"], emb, meta["model"]
    return json.loads(meta.get("ids", "[]")), emb, meta.get("model", "")  # files written before the one key
