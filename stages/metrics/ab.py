"""Blind A/B test: a static HTML page from the samples, and the scoring of the answers it saves.

The page shows, for each (prompt, seed), the base image and the LoRA image side by side in a random
left/right order, under neutral file names (``img/pair-003-a.jpg``), and asks "Which looks more like
an Impressionist painting?" and, optionally, "Which follows the prompt better?". Answers are kept
in the browser (localStorage) and downloaded as JSON with one click. The key that says which side
is the LoRA stays out of the page folder (``key.json`` next to it is NOT shared with raters); the
scorer joins answers with the key and turns them into LoRA win rates with 95% Wilson intervals.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import Iterable

from PIL import Image

from stages.core.io import write_json, write_text

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
    shown = []
    for pair in pairs:
        sides = {pair["lora_side"]: pair["lora"],
                 "right" if pair["lora_side"] == "left" else "left": pair["base"]}
        files = {}
        for side, letter in (("left", "a"), ("right", "b")):
            img = Image.open(samples_dir / sides[side]).convert("RGB")
            img.thumbnail((max_side, max_side))
            name = f"img/{pair['id']}-{letter}.jpg"
            img.save(out_dir / name, format="JPEG", quality=92)
            files[side] = name
        shown.append({"id": pair["id"], "prompt": pair["prompt"], **files})
    questions = {"style": QUESTIONS["style"]}
    if prompt_question:
        questions["prompt"] = QUESTIONS["prompt"]
    html = PAGE.replace("__DATA__", json.dumps({"page": page_id, "pairs": shown,
                                                 "questions": questions}))
    write_text(out_dir / "index.html", html)
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


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Blind A/B: which is more Impressionist?</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:.8em auto;max-width:1100px;color:#222}h1{font-size:1.4em;margin:.2em 0}p{margin:.4em 0}
.pair{display:flex;gap:1em;justify-content:center}.pair figure{margin:0;text-align:center}
.pair img{max-width:512px;width:min(42vw,50vh);border:4px solid transparent}.pair img.chosen{border-color:#2a7}
.q{margin:1em 0}.q button{font-size:1.05em;margin:0 .3em;padding:.4em 1em}
.q button.on{background:#2a7;color:#fff}#prompt{font-style:italic}#done{display:none}
</style></head><body>
<h1>Blind comparison</h1>
<p>Two images made from the same prompt and seed. Which is which is hidden and shuffled.
Answers stay in this browser until you press <b>Download answers</b>; send that file back.</p>
<p>Rater name (optional): <input id="rater" size="20"></p>
<p id="progress"></p><p>Prompt: <span id="prompt"></span></p>
<div class="pair"><figure><img id="left" alt="left image"><figcaption>Left</figcaption></figure>
<figure><img id="right" alt="right image"><figcaption>Right</figcaption></figure></div>
<div id="questions"></div>
<p><button id="prev">&larr; Previous</button> <button id="next">Next &rarr;</button>
<button id="download">Download answers</button></p>
<p id="done">All pairs answered &mdash; thank you! Press <b>Download answers</b>.</p>
<script>
const DATA = __DATA__;
const STORE = "fluximp-ab-" + DATA.page;
let state = JSON.parse(localStorage.getItem(STORE) || "null") || {page: DATA.page, rater: "", answers: {}};
let i = 0;
const $ = (id) => document.getElementById(id);
function save() { localStorage.setItem(STORE, JSON.stringify(state)); }
function render() {
  const p = DATA.pairs[i], a = state.answers[p.id] || {};
  $("progress").textContent = `Pair ${i + 1} of ${DATA.pairs.length} (${Object.keys(state.answers).length} answered)`;
  $("prompt").textContent = p.prompt;
  $("left").src = p.left; $("right").src = p.right;
  $("left").className = a.style === "left" ? "chosen" : "";
  $("right").className = a.style === "right" ? "chosen" : "";
  const qs = $("questions"); qs.innerHTML = "";
  for (const [q, text] of Object.entries(DATA.questions)) {
    const div = document.createElement("div"); div.className = "q";
    div.append(text + " ");
    const opts = q === "style" ? ["left", "right"] : ["left", "right", "same"];
    for (const o of opts) {
      const b = document.createElement("button");
      b.textContent = o === "same" ? "About the same" : o[0].toUpperCase() + o.slice(1);
      b.id = `${q}-${o}`; b.className = a[q] === o ? "on" : "";
      b.onclick = () => answer(q, o); div.append(b);
    }
    qs.append(div);
  }
  $("done").style.display = DATA.pairs.every((x) => (state.answers[x.id] || {}).style) ? "block" : "none";
}
function answer(q, o) {
  const p = DATA.pairs[i];
  state.answers[p.id] = Object.assign(state.answers[p.id] || {pair: p.id}, {[q]: o, time: new Date().toISOString()});
  save();
  const a = state.answers[p.id];
  const complete = Object.keys(DATA.questions).every((k) => a[k]);
  if (complete && i < DATA.pairs.length - 1) { i++; }
  render();
}
$("prev").onclick = () => { if (i > 0) { i--; render(); } };
$("next").onclick = () => { if (i < DATA.pairs.length - 1) { i++; render(); } };
$("rater").value = state.rater;
$("rater").oninput = (e) => { state.rater = e.target.value; save(); };
$("download").onclick = () => {
  const out = {page: state.page, rater: state.rater, saved: new Date().toISOString(),
               answers: Object.values(state.answers)};
  const url = URL.createObjectURL(new Blob([JSON.stringify(out, null, 2)], {type: "application/json"}));
  const link = document.createElement("a");
  link.href = url; link.download = `answers-${DATA.page}.json`;
  document.body.append(link); link.click(); link.remove();
};
render();
</script></body></html>
"""
