"""Blind A/B test: a static HTML page from the samples, and the scoring of the answers it saves.

The page shows, for each (prompt, seed), the base image and the LoRA image side by side in a random
left/right order, under neutral file names (``img/pair-003-a.jpg``), and asks "Which looks more like
an Impressionist painting?" and, optionally, "Which follows the prompt better?". Answers are kept
in the browser (localStorage) and downloaded as JSON with one click (page: templates/abtest.html.j2).
The key that says which side is the LoRA stays out of the page folder (``key.json`` next to it is
NOT shared with raters); the scorer joins answers with the key and turns them into LoRA win rates with 95% Wilson intervals.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import Iterable


from stages.core.images import load as load_image
from stages.core.io import atomic_file, write_json, write_text
from stages.core.pool import threads
from stages.metrics import pages

QUESTIONS = {
    "style": "Which looks more like an Impressionist painting?",
    "prompt": "Which follows the prompt better?",
}


def make_pairs(index: dict, lora_scale: float | None = None, seed: int = 0) -> list[dict]:
    """Base (scale 0) vs LoRA (``lora_scale``, default the largest) for every prompt and seed
    of the sample index, each with a random side for the LoRA image."""
    images = index["images"]
    scales = sorted({float(im["scale"]) for im in images if float(im["scale"]) > 0})
    if not scales:
        raise ValueError("the sample index has no LoRA images (scale > 0): nothing to compare")
    lora_scale = scales[-1] if lora_scale is None else float(lora_scale)
    by_key = {(im["prompt_index"], im["seed"], float(im["scale"])): im for im in images}
    rng = random.Random(seed)
    pairs = []
    for (p, s, scale), base in sorted(by_key.items()):
        lora = by_key.get((p, s, lora_scale))
        if scale != 0.0 or lora is None:
            continue
        pairs.append({"id": f"pair-{len(pairs):03d}", "prompt": base["prompt"], "seed": s,
                      "scale": lora_scale, "base": base["file"], "lora": lora["file"],
                      "lora_side": rng.choice(["left", "right"])})
    if not pairs:
        raise ValueError(f"no (prompt, seed) has both a base image and a LoRA image at scale {lora_scale}")
    rng.shuffle(pairs)
    return pairs


def build_page(samples_dir: Path | str, out_dir: Path | str, key_path: Path | str,
               lora_scale: float | None = None, seed: int = 0, max_side: int = 768,
               prompt_question: bool = True) -> dict:
    """Write ``out_dir/index.html`` + ``out_dir/img/*.jpg`` (what raters get) and ``key_path``
    (kept by the experimenter). Returns the key."""
    samples_dir, out_dir = Path(samples_dir), Path(out_dir)
    index = json.loads((samples_dir / "index.json").read_text())
    pairs = make_pairs(index, lora_scale, seed)
    page_id = hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()[:12]
    (out_dir / "img").mkdir(parents=True, exist_ok=True)

    def show(pair: dict) -> dict:  # its two images as the rater sees them (JPEGs, on threads)
        sides = {pair["lora_side"]: pair["lora"],
                 "right" if pair["lora_side"] == "left" else "left": pair["base"]}
        files = {}
        for side, letter in (("left", "a"), ("right", "b")):
            img = load_image(samples_dir / sides[side])
            img.thumbnail((max_side, max_side))
            name = f"img/{pair['id']}-{letter}.jpg"
            with atomic_file(out_dir / name, ".jpg") as tmp:
                img.save(tmp, format="JPEG", quality=92)
            files[side] = name
        return {"id": pair["id"], "prompt": pair["prompt"], **files}

    with threads("abtest") as ex:
        shown = list(ex.map(show, pairs))
    questions = {"style": QUESTIONS["style"]}
    if prompt_question:
        questions["prompt"] = QUESTIONS["prompt"]
    page = pages.render("abtest.html.j2", data={"page": page_id, "pairs": shown, "questions": questions})
    write_text(out_dir / "index.html", page)
    key = {"page": page_id, "lora_scale": pairs[0]["scale"], "pairs": pairs}
    write_json(key_path, key)
    return key


def wilson(wins: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (NaNs when n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = wins / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def score(key: dict, answer_files: Iterable[dict]) -> dict:
    """LoRA win rate per question over all raters' answers (ties and skips are counted apart)."""
    sides = {p["id"]: p["lora_side"] for p in key["pairs"]}
    result = {"page": key["page"], "lora_scale": key["lora_scale"], "raters": 0, "questions": {}}
    counts = {q: {"lora": 0, "base": 0, "same": 0} for q in QUESTIONS}
    for answers in answer_files:
        if answers.get("page") != key["page"]:
            raise ValueError(f"answers are for page {answers.get('page')!r}, the key is for {key['page']!r}")
        result["raters"] += 1
        for a in answers.get("answers", []):
            if a.get("pair") not in sides:
                raise ValueError(f"unknown pair {a.get('pair')!r} in the answers")
            for q in QUESTIONS:
                choice = a.get(q)
                if choice in ("left", "right"):
                    counts[q]["lora" if choice == sides[a["pair"]] else "base"] += 1
                elif choice == "same":
                    counts[q]["same"] += 1
    for q, c in counts.items():
        n = c["lora"] + c["base"]
        lo, hi = wilson(c["lora"], n)
        result["questions"][q] = {
            "question": QUESTIONS[q], "lora_wins": c["lora"], "base_wins": c["base"], "ties": c["same"],
            "n": n, "lora_win_rate": c["lora"] / n if n else float("nan"), "ci95_low": lo, "ci95_high": hi}
    return result
