"""Which step, which strength: the style-content trade-off of one run and the point to recommend.

A *point* is one (snapshot step, LoRA scale) of the grid. For each the stage has, per (prompt, seed)
pair, the image's **style** (cosine of its style embedding to the held-out centroid: the per-image
terms of the headline ``style_centroid``) and its **CLIP score**, and the base image's CLIP score for the
same pair. Then:

- ``style`` = the mean style; ``content`` = mean CLIP score / the base's mean CLIP score on the same pairs
  (evaluate's ``clip_score_ratio``: 1 = the prompt is followed as well as without the LoRA);
- 95 % bootstrap intervals: the (prompt, seed) pairs resampled with replacement (seeded), the same
  resamples for every point;
- the Pareto front (maximise both; a point is dominated when another is at least as good on both and
  better on one; equal points are all on the front);
- the recommendation: the highest-style point with ``content >= content_min``; ties go to the higher
  content, then the earlier step, then the lower scale. No point reaching the threshold -> the point
  with the most content, and the reason says so;
- honesty: every other front point whose style interval overlaps the recommendation's is
  *indistinguishable at this sample size*, with the pairs that would separate them (an interval's
  width shrinks as 1/sqrt(n)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

LEVEL = 0.95


@dataclass
class Point:
    step: int
    scale: float
    style: float
    content: float
    style_ci: tuple[float, float] = (math.nan, math.nan)
    content_ci: tuple[float, float] = (math.nan, math.nan)
    front: bool = False
    feasible: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.step}/{self.scale:g}"

    @property
    def key(self) -> tuple[int, float]:
        return (self.step, self.scale)

    def record(self) -> dict:
        return {"step": self.step, "scale": self.scale, "style": _r(self.style), "style_lo": _r(self.style_ci[0]),
                "style_hi": _r(self.style_ci[1]), "content": _r(self.content), "content_lo": _r(self.content_ci[0]),
                "content_hi": _r(self.content_ci[1]), "front": self.front, "feasible": self.feasible}


def _r(x: float) -> float | None:
    return round(float(x), 6) if x is not None and math.isfinite(x) else None


def measure(step: int, scale: float, style: np.ndarray, clip: np.ndarray, base_clip: np.ndarray,
            resamples: np.ndarray) -> Point:
    """One point from per-pair arrays (aligned with ``base_clip``) and bootstrap indices (B, n)."""
    style, clip, base_clip = (np.asarray(a, np.float64) for a in (style, clip, base_clip))
    if not (len(style) == len(clip) == len(base_clip)):
        raise ValueError(f"{len(style)} style, {len(clip)} CLIP and {len(base_clip)} base values")
    content = clip.mean() / base_clip.mean() if base_clip.mean() > 0 else math.nan
    s_boot = style[resamples].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        c_boot = clip[resamples].mean(axis=1) / base_clip[resamples].mean(axis=1)
    q = [(1 - LEVEL) / 2 * 100, (1 + LEVEL) / 2 * 100]
    c_boot = c_boot[np.isfinite(c_boot)]
    return Point(step, float(scale), float(style.mean()), float(content),
                 tuple(float(v) for v in np.percentile(s_boot, q)),
                 tuple(float(v) for v in np.percentile(c_boot, q)) if len(c_boot) else (math.nan, math.nan))


def resamples(n: int, b: int, seed: int) -> np.ndarray:
    """(b, n) bootstrap indices of n pairs, from a seeded generator (the same for every point)."""
    if n < 1:
        raise ValueError("no (prompt, seed) pairs to bootstrap")
    return np.random.default_rng(seed).integers(0, n, size=(b, n))


def pareto_front(points: list[Point]) -> list[Point]:
    """The points no other point dominates (higher style and content both wanted), by style descending."""
    def dominated(a: Point) -> bool:
        return any(b.style >= a.style and b.content >= a.content and (b.style > a.style or b.content > a.content)
                   for b in points)
    front = [a for a in points if not dominated(a)]
    return sorted(front, key=lambda a: (-a.style, -a.content, a.step, a.scale))


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def pairs_to_separate(best: Point, other: Point, n: int) -> int | None:
    """Pairs (prompt x seed) at which the two style intervals would stop overlapping, if the gap stays
    and each half-width shrinks as 1/sqrt(n); None when the styles are equal (no sample size will do)."""
    gap = abs(best.style - other.style)
    half = (best.style_ci[1] - best.style_ci[0]) / 2 + (other.style_ci[1] - other.style_ci[0]) / 2
    if gap <= 0 or not math.isfinite(half):
        return None
    return max(n + 1, math.ceil(n * (half / gap) ** 2))


def trend(points: list[Point], best: Point) -> str | None:
    """What the steps after the recommended one do at its scale (None when it is the last step)."""
    later = sorted((p for p in points if p.scale == best.scale and p.step > best.step), key=lambda p: p.step)
    if not later:
        return None
    last = later[-1]
    ds, dc = last.style - best.style, last.content - best.content
    move = (f"from step {best.step} to {last.step} at scale {best.scale:g}, style {best.style:.4f} -> {last.style:.4f} "
            f"and content {best.content:.3f} -> {last.content:.3f}")
    if ds > 0 and dc < 0:
        return f"overtraining shows: {move} (style still rises while content falls)"
    if ds <= 0 and dc < 0:
        return f"overtraining shows: {move} (style and content both fall after step {best.step})"
    if ds <= 0:
        return f"style peaks at step {best.step}: {move}; later steps add nothing"
    return f"later steps are not better here: {move}"


def recommend(points: list[Point], content_min: float, n_pairs: int) -> dict:
    """The operating point: the front, the recommended point, the reason, indistinguishable neighbours."""
    if not points:
        raise ValueError("no grid points to choose from")
    front = pareto_front(points)
    on_front = {p.key for p in front}
    for p in points:
        p.front = p.key in on_front
        p.feasible = math.isfinite(p.content) and p.content >= content_min
    feasible = [p for p in front if p.feasible]
    if feasible:  # front sorted by style desc, content desc, step, scale: the first is the pick
        best, fallback = feasible[0], False
        reason = (f"the highest style ({best.style:.4f}) among the points that keep content >= {content_min:g} "
                  f"(CLIP-score ratio to the base: {best.content:.3f})")
    elif not any(math.isfinite(p.content) for p in points):
        best, fallback = front[0], True
        reason = ("content is not measurable (the base images' CLIP score is 0 on these pairs, as with a random "
                  "CLIP): fell back to the highest style alone")
    else:
        best = sorted(points, key=lambda p: (-(p.content if math.isfinite(p.content) else -math.inf),
                                             -p.style, p.step, p.scale))[0]
        fallback = True
        reason = (f"no point keeps content >= {content_min:g} (the best reaches {best.content:.3f}): fell back to "
                  "the point with the most content; try lower eval.grid.scales or earlier steps")
    ties = []
    for p in feasible if not fallback else front:
        if p is best or not overlaps(p.style_ci, best.style_ci):
            continue
        ties.append({"step": p.step, "scale": p.scale, "style": _r(p.style), "content": _r(p.content),
                     "pairs_to_separate": pairs_to_separate(best, p, n_pairs)})
    if ties:
        need = [t["pairs_to_separate"] for t in ties if t["pairs_to_separate"]]
        reason += (f"; indistinguishable at this sample size ({n_pairs} prompt-seed pairs) from "
                   + ", ".join(f"{t['step']}/{t['scale']:g}" for t in ties)
                   + (f": about {max(need)} pairs would separate them" if need else ""))
    note = trend(points, best)
    return {"step": best.step, "scale": best.scale, "style": _r(best.style), "content": _r(best.content),
            "style_ci": [_r(v) for v in best.style_ci], "content_ci": [_r(v) for v in best.content_ci],
            "fallback": fallback, "reason": reason, "indistinguishable": ties, "trend": note,
            "front": [p.label for p in front]}


def csv_text(points: list[Point]) -> str:
    """The DVC plot (``reports/plots/operating_point.csv``): one row per point, label = step/scale."""
    import csv
    import io

    cols = ["label", "step", "scale", "style", "style_lo", "style_hi", "content", "content_lo", "content_hi",
            "front", "feasible"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    writer.writerows({"label": p.label, **p.record()} for p in points)
    return buf.getvalue()


def table(points: list[Point], best: dict | None) -> str:
    """A Markdown table of every point, by step then scale; the recommendation in bold."""
    lines = ["| step | scale | style (95 % CI) | content (95 % CI) | front | content ok |",
             "|---:|---:|---|---|:-:|:-:|"]
    for p in sorted(points, key=lambda p: (p.step, p.scale)):
        row = [str(p.step), f"{p.scale:g}", f"{p.style:.4f} [{p.style_ci[0]:.4f}, {p.style_ci[1]:.4f}]",
               f"{p.content:.3f} [{p.content_ci[0]:.3f}, {p.content_ci[1]:.3f}]",
               "●" if p.front else "", "✓" if p.feasible else ""]
        if best and (p.step, p.scale) == (best["step"], best["scale"]):
            row = [f"**{c}**" if c else c for c in row]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(points: list[Point], path, title: str, content_min: float | None = None,
         best: tuple | None = None, base_style: float | None = None) -> None:
    """Style (y) against content (x), each point labelled (``extra['label']`` or step/scale) with its
    intervals, the Pareto front as a line, the content threshold and the base model as references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.core.io import atomic_file

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for p in points:
        err = [[max(p.content - p.content_ci[0], 0)], [max(p.content_ci[1] - p.content, 0)]]
        yerr = [[max(p.style - p.style_ci[0], 0)], [max(p.style_ci[1] - p.style, 0)]]
        mine = best is not None and p.key == tuple(best)
        ax.errorbar([p.content], [p.style], xerr=err if math.isfinite(p.content_ci[0]) else None,
                    yerr=yerr if math.isfinite(p.style_ci[0]) else None, fmt="*" if mine else "o",
                    ms=12 if mine else 5, color="tab:red" if mine else "tab:blue" if p.front else "tab:gray",
                    elinewidth=0.6, capsize=2, alpha=0.9)
        right = p.content > (min(q.content for q in points) + max(q.content for q in points)) / 2
        ax.annotate(p.extra.get("label", p.label), (p.content, p.style), fontsize=7, textcoords="offset points",
                    xytext=(-3 if right else 3, 3), ha="right" if right else "left")
    front = sorted((p for p in points if p.front), key=lambda p: p.content)
    if len(front) > 1:
        ax.plot([p.content for p in front], [p.style for p in front], "-", color="tab:blue", lw=1,
                label="Pareto front")
    if content_min is not None:
        ax.axvline(content_min, ls="--", color="tab:orange", lw=1, label=f"content ≥ {content_min:g}")
    if base_style is not None and math.isfinite(base_style):
        ax.plot([1.0], [base_style], "s", color="black", ms=6, label="base (no LoRA)")
    ax.set_xlabel("content: CLIP-score ratio to the base (→ keeps the prompt)")
    ax.set_ylabel("style: cosine to the held-out centroid (↑)")
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    ax.margins(x=0.2, y=0.1)  # room for the labels
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", metadata={"Software": None})
    plt.close(fig)


def strength_for(rec: dict, step: int) -> dict | None:
    """The scale to recommend for the adapter of ``step`` from a recorded grid (``operating_point.json``):
    the recommended point at its own step, else that step's highest-style point that keeps the content
    threshold (else its highest-content point); None when the grid did not run or did not try ``step``."""
    if not rec or not rec.get("enabled"):
        return None
    best = rec["recommended"]
    if best["step"] == step:
        return {"scale": best["scale"], "style": best["style"], "content": best["content"], "recommended": True}
    mine = [p for p in rec.get("points", []) if p["step"] == step]
    if not mine:
        return None
    ok = [p for p in mine if p["feasible"]]
    pick = max(ok, key=lambda p: (p["style"], p["content"])) if ok else \
        max(mine, key=lambda p: (p["content"] if p["content"] is not None else -math.inf))
    return {"scale": pick["scale"], "style": pick["style"], "content": pick["content"], "recommended": False}
