"""The held-out split: which curated images are kept out of training (for evaluation)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from stages.curation.captions import clean_value


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
