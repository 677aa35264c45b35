"""Blind A/B test of base vs LoRA samples (human evaluation; not a DVC stage).

    python -m stages.abtest build                 # page from reports/samples (evaluate also does it)
    python -m stages.abtest score answers*.json   # -> reports/human.json

``build`` writes ``reports/eval/abtest/`` (index.html + neutral-named images: the folder to send
to raters) and ``reports/eval/abtest-key.json`` (which side is the LoRA: keep it). Raters open
index.html in any browser, answer, press "Download answers" and send the JSON back. ``score``
joins all answer files with the key and writes LoRA win rates with 95% Wilson intervals.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stages.core import log, params
from stages.core.io import read_json, write_json
from stages.metrics import ab

SAMPLES = Path("reports/samples")
PAGE_DIR = Path("reports/eval/abtest")
KEY = Path("reports/eval/abtest-key.json")
HUMAN = Path("reports/human.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.abtest", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the blind A/B page from the samples")
    b.add_argument("--samples", type=Path, default=SAMPLES)
    b.add_argument("--out", type=Path, default=PAGE_DIR)
    b.add_argument("--key", type=Path, default=KEY)
    b.add_argument("--scale", type=float, default=None, help="LoRA scale to compare (default: largest)")
    b.add_argument("--no-prompt-question", action="store_true")
    s = sub.add_parser("score", help="answers JSON files -> reports/human.json")
    s.add_argument("answers", type=Path, nargs="+")
    s.add_argument("--key", type=Path, default=KEY)
    s.add_argument("--out", type=Path, default=HUMAN)
    args = parser.parse_args(argv)
    logger = log.setup("abtest")

    if args.cmd == "build":
        p = params.load()
        key = ab.build_page(args.samples, args.out, args.key, args.scale, seed=p.seed,
                            prompt_question=not args.no_prompt_question)
        logger.info("A/B page with %d pairs: %s (key: %s; do not share the key)",
                    len(key["pairs"]), args.out / "index.html", args.key)
        return 0
    if not args.key.exists():
        logger.error("no key at %s: build the page first (python -m stages.abtest build)", args.key)
        return 2
    try:
        answers = [json.loads(f.read_text()) for f in args.answers]
        result = ab.score(read_json(args.key), answers)
    except (OSError, ValueError) as err:
        logger.error("cannot score: %s", err)
        return 2
    write_json(args.out, result)
    for q, r in result["questions"].items():
        logger.info("%s: LoRA wins %d of %d (%.0f%%, 95%% CI %.0f-%.0f%%), %d ties", q, r["lora_wins"],
                    r["n"], 100 * r["lora_win_rate"] if r["n"] else float("nan"),
                    100 * r["ci95_low"] if r["n"] else float("nan"),
                    100 * r["ci95_high"] if r["n"] else float("nan"), r["ties"])
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
