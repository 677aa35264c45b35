"""The download stage's report: ``reports/data/`` (DVC metric, plot data, figures).

- ``download.json``: totals, rejects by reason (every reason, zeros included), formats, and for
  the synthetic source the planted ground truth by kind;
- ``sizes.csv``: ``width,height`` of every stored image (DVC scatter plot);
- ``figures/resolution.png``: histograms of the shorter side and of the aspect ratio;
- ``figures/contact_sheet.png``: a seeded sample of stored images;
- ``figures/counts.png`` + ``figures/counts.json``: images per source, artist, style, genre.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stages.core.images import contact_sheet  # noqa: E402
from stages.core.io import atomic_dir, atomic_file, write_json  # noqa: E402
from stages.data.collect import Collector  # noqa: E402


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    path.write_bytes(buf.getvalue())


def _resolution_figure(sizes: list[tuple[int, int]], path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    arr = np.array(sizes or [(0, 0)], dtype=float)
    a.hist(arr.min(axis=1), bins=30, color="#4a7fd0")
    a.set(title="shorter side (px)", xlabel="px", ylabel="images")
    b.hist(arr[:, 0] / np.maximum(arr[:, 1], 1), bins=30, color="#e0a030")
    b.set(title="aspect ratio (width / height)", xlabel="ratio")
    fig.tight_layout()
    _save(fig, path)


def _counts_figure(counts: dict, path: Path, top: int = 15) -> None:
    keys = ["source", "artist", "style", "genre"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, key in zip(axes, keys):
        items = counts[key].most_common(top)[::-1]
        ax.barh([str(k)[:24] for k, _ in items], [v for _, v in items], color="#5a9a60")
        ax.set_title(f"images per {key}" + (f" (top {top})" if len(counts[key]) > top else ""))
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    _save(fig, path)


def write(collector: Collector, out: Path, extra: dict) -> dict:
    """Write every report file under ``out`` (reports/data); returns the metric dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {**collector.summary(), **extra}
    if collector.truth:
        kinds: dict = {}
        for t in collector.truth:
            kinds[t["kind"]] = kinds.get(t["kind"], 0) + 1
        metrics["truth"] = {k: kinds.get(k, 0) for k in ("good", "near_duplicate", "defect")}
    write_json(out / "download.json", metrics)
    with atomic_file(out / "sizes.csv", ".csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["width", "height"])
        w.writerows(collector.sizes)
    with atomic_dir(out / "figures") as tmp:
        tmp = Path(tmp)
        _resolution_figure(collector.sizes, tmp / "resolution.png")
        _counts_figure(collector.counts, tmp / "counts.png")
        write_json(tmp / "counts.json", {k: dict(c.most_common()) for k, c in collector.counts.items()})
        imgs = [im for im, _ in collector.sample]
        labels = [lab for _, lab in collector.sample]
        contact_sheet(imgs, labels, cols=8, cell=128,
                      title=f"{metrics['stored']} images stored, sample of {len(imgs)}").save(tmp / "contact_sheet.png")
    return metrics
