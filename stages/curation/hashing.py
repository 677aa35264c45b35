"""Perceptual hashes and near-duplicate clustering (the dedupe stage's building blocks).

Hashes are imagehash's pHash / dHash of each of an image's :data:`VIEWS` (the image, its
mirror-invariant fold, the fold of its central 2:1 band), stored as packed bits: a ``uint8`` array
of shape (N, hash_size**2 / 8), or hex strings in tables. Distances are Hamming distances (popcount
of XOR). Candidate pairs are confirmed on fine pixel detail in :mod:`stages.curation.verify`.

:func:`near_pairs` finds every pair within a distance ``r`` without comparing all pairs in Python:
multi-index hashing (Norouzi et al., 2012). The bits are split into ``m`` 16-bit chunks; if two hashes
differ in at most ``r`` bits, at least one chunk differs in at most ``r // m`` bits (pigeonhole). So
for every chunk we look up, in a bucket table of that chunk's 65,536 values, each hash's chunk XOR
every flip mask of weight <= ``r // m`` (137 masks for 16 bits and radius 2), and verify the
candidates with a vectorised popcount. Everything is numpy array work in blocks; 100,000 random
64-bit hashes at r=10 take a few seconds (``benchmarks/bench_dedupe.py``). Where the masks would
explode (large radius per chunk) it falls back to blocked brute force, still vectorised.

:func:`cluster` links the pairs transitively (connected components) and :func:`choose_keepers`
applies the keep rule's criteria in order (``stages.dedupe.KEEP_RULE``), saying which decided.
"""
from __future__ import annotations

import io
import itertools
from typing import Iterable, Optional, Sequence

import numpy as np

from stages.core.images import decode
from stages.core.pool import parallel_map

CHUNK_BITS = 16
MAX_MASKS = 1200  # above this many flip masks per chunk, brute force is faster


# ---- hashing ---------------------------------------------------------------------------------

# The views of an image that are hashed (each with pHash and dHash) and searched: the image itself;
# its fold, the left half of the image averaged with its mirror image, which a horizontally flipped
# copy shares; and the fold of its central 2:1 band, which a copy cropped to another aspect (a
# landscape trimmed at top and bottom) shares, flipped or not.
VIEWS = ("full", "fold", "band_fold")
BAND_ASPECT = 2.0


def _bits_to_bytes(hash_obj) -> np.ndarray:
    return np.packbits(np.asarray(hash_obj.hash, dtype=bool).ravel())


def hash_image(img, hash_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """PIL image -> (pHash, dHash) as packed bits (uint8 arrays of hash_size**2/8 bytes)."""
    import imagehash

    img = img.convert("RGB")
    return (_bits_to_bytes(imagehash.phash(img, hash_size=hash_size)),
            _bits_to_bytes(imagehash.dhash(img, hash_size=hash_size)))


def band(img, aspect: float = BAND_ASPECT):
    """The centred crop of ``img`` with width / height = ``aspect``."""
    w, h = img.size
    if w / h < aspect:
        bh = w / aspect
        return img.crop((0, round((h - bh) / 2), w, round((h + bh) / 2)))
    bw = h * aspect
    return img.crop((round((w - bw) / 2), 0, round((w + bw) / 2), h))


def fold(img):
    """The left half of ``img`` averaged with its mirror image: the same for a flipped copy. (The
    whole symmetrised image would not do: half its DCT coefficients vanish and pHash, which compares
    them with their median, turns those bits into noise.)"""
    from PIL import Image, ImageOps

    img = img.convert("RGB")
    sym = Image.blend(img, ImageOps.mirror(img), 0.5)
    return sym.crop((0, 0, (sym.width + 1) // 2, sym.height))


def views(img) -> dict:
    """{view name: PIL image} for :data:`VIEWS`."""
    img = img.convert("RGB")
    return {"full": img, "fold": fold(img), "band_fold": fold(band(img))}


def hash_views(img, hash_size: int = 8) -> np.ndarray:
    """(len(VIEWS), 2, hash_size**2/8) uint8: (pHash, dHash) of every view of ``img``."""
    return np.stack([np.stack(hash_image(v, hash_size)) for v in views(img).values()])


def quant_step(data: bytes) -> float:
    """Mean step of a JPEG's luminance quantisation table (1 = lossless: not a JPEG). Of two
    encodings of one picture the smaller step kept more of it; a copy re-encoded at a finer step
    still carries its source's losses, so the keep rule asks this only after pixels and consensus."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))  # reads the header only
    tables = getattr(img, "quantization", None) or {}
    return float(np.mean(tables[0])) if img.format == "JPEG" and 0 in tables else 1.0


MEASURE_SIDE = 256  # decode side for hashing: far more than the 32 px pHash or a 64 px signature use


def _hash_bytes(args: tuple[bytes, int]) -> Optional[tuple[np.ndarray, float]]:
    data, hash_size = args
    try:
        return hash_views(decode(data, MEASURE_SIDE), hash_size), quant_step(data)
    except Exception:  # unreadable image: the caller records a reject
        return None


def _signature_bytes(data: bytes) -> Optional[dict]:
    from stages.curation import verify

    try:
        return verify.signature(decode(data, MEASURE_SIDE))
    except Exception:
        return None


def _pool_map(func, items: Iterable, workers: int, progress=None) -> list:
    """``func`` over ``items`` in ``workers`` processes (stages.core.pool), as a list."""
    out = []
    for res in parallel_map(func, items, workers):
        out.append(res)
        if progress:
            progress(1)
    return out


def hash_many(blobs: Iterable[bytes], hash_size: int = 8, workers: int = 2,
              progress=None) -> list[Optional[tuple[np.ndarray, float]]]:
    """(:func:`hash_views`, :func:`quant_step`) of encoded images, in ``workers`` processes;
    ``None`` where one does not decode. ``progress``: optional callable(n_done), e.g. a tqdm bar's ``update``."""
    return _pool_map(_hash_bytes, ((b, hash_size) for b in blobs), workers, progress)


def signatures_many(blobs: Iterable[bytes], workers: int = 2) -> list[Optional[dict]]:
    """``verify.signature`` of encoded images, in ``workers`` processes."""
    return _pool_map(_signature_bytes, blobs, workers)


def to_hex(bits: np.ndarray) -> str:
    return bytes(bits).hex()


def from_hex(values: Sequence[str]) -> np.ndarray:
    """Hex strings (equal length) -> packed bits, shape (N, bytes)."""
    if len(values) == 0:
        return np.zeros((0, 0), np.uint8)
    return np.frombuffer(bytes.fromhex("".join(values)), np.uint8).reshape(len(values), -1).copy()


# ---- distances -------------------------------------------------------------------------------

def _as_words(bits: np.ndarray, dtype, width: int) -> np.ndarray:
    """Packed bits (N, B) -> (N, W) big-endian words of ``width`` bytes (zero-padded)."""
    bits = np.ascontiguousarray(bits, dtype=np.uint8)
    pad = -bits.shape[1] % width
    if pad:
        bits = np.pad(bits, ((0, 0), (0, pad)))
    return bits.view(np.dtype(dtype).newbyteorder(">")).astype(dtype)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distance between packed-bit arrays of equal shape (broadcasts)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=-1, dtype=np.int64)


def _flip_masks(bits: int, radius: int) -> np.ndarray:
    masks = [0]
    for k in range(1, radius + 1):
        for pos in itertools.combinations(range(bits), k):
            masks.append(sum(1 << p for p in pos))
    return np.array(masks, dtype=np.uint16)


def _brute_pairs(bits: np.ndarray, radius: int) -> np.ndarray:
    """Blocked all-pairs popcount (vectorised; ~16 MB of XOR per block)."""
    n = len(bits)
    block = max(1, (1 << 24) // max(1, n * bits.shape[1]))
    out = []
    for s in range(0, n, block):
        d = hamming(bits[s:s + block, None, :], bits[None, :, :])
        i, j = np.nonzero(d <= radius)
        i += s
        keep = i < j
        out.append(np.stack([i[keep], j[keep]], 1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def _chunk_pairs(keys: np.ndarray, words: np.ndarray, masks: np.ndarray, radius: int) -> np.ndarray:
    """Codes ``i * n + j`` (i < j) of the pairs within ``radius`` whose 16-bit ``keys`` differ by
    one of ``masks``. Bucket table over the 65,536 key values; candidates verified on ``words``
    (1-D uint64 for 64-bit hashes, else (N, W))."""
    n = len(keys)
    order = np.argsort(keys, kind="stable")
    sorted_words = words[order]
    counts_tab = np.bincount(keys, minlength=1 << CHUNK_BITS)
    starts_tab = np.cumsum(counts_tab) - counts_tab
    found = []
    for mask in masks:
        probe = keys ^ mask
        # A pair whose keys differ by a non-zero mask is seen from both ends: probe from the
        # smaller key only. Equal keys (mask 0) meet themselves: keep i < j below.
        rows = np.flatnonzero(probe > keys) if mask else np.arange(n)
        cnt = counts_tab[probe[rows]]
        first = starts_tab[probe[rows]] - (np.cumsum(cnt) - cnt)
        q = np.repeat(rows, cnt)
        pos = np.arange(len(q)) + np.repeat(first, cnt)
        dist = np.bitwise_count(words[q] ^ sorted_words[pos])
        if dist.ndim > 1:
            dist = dist.sum(axis=1, dtype=np.int32)
        close = np.flatnonzero(dist <= radius)
        i, j = q[close], order[pos[close]]
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        keep = lo < hi
        found.append(lo[keep] * n + hi[keep])
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def near_pairs(bits: np.ndarray, radius: int, workers: int = 2) -> np.ndarray:
    """All pairs (i < j) with Hamming distance <= ``radius``: an (P, 2) int64 array, sorted.
    The chunks are searched in ``workers`` threads (numpy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    bits = np.ascontiguousarray(bits, dtype=np.uint8)
    n = len(bits)
    if n < 2:
        return np.zeros((0, 2), np.int64)
    chunks = _as_words(bits, np.uint16, 2)
    m = chunks.shape[1]
    masks = _flip_masks(CHUNK_BITS, radius // m) if radius // m <= 3 else None
    if masks is None or len(masks) > MAX_MASKS or n < 2048:
        return _brute_pairs(bits, radius)
    words = _as_words(bits, np.uint64, 8)
    if words.shape[1] == 1:
        words = words[:, 0]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        parts = list(pool.map(lambda c: _chunk_pairs(chunks[:, c], words, masks, radius), range(m)))
    codes = np.unique(np.concatenate(parts))
    return np.stack([codes // n, codes % n], 1)


# ---- clusters and the keep rule --------------------------------------------------------------

def cluster(n: int, pairs: np.ndarray) -> np.ndarray:
    """Transitive clusters (connected components) of ``n`` items linked by ``pairs``: one label
    per item, numbered by each cluster's first member (so labels are stable for equal input)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.zeros(0, np.int64)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1, n, np.int64)
    np.minimum.at(first, labels, np.arange(n))
    return first[labels]


def choose_keepers(cluster_ids: np.ndarray, ids: Sequence[str],
                   criteria: Sequence[np.ndarray] = ()) -> tuple[np.ndarray, np.ndarray]:
    """The keep rule, one keeper per cluster: the highest value of the first of ``criteria``
    (arrays, one value per item; NaN counts as worst), ties broken by the next, then the smallest
    id. Returns (bool keep mask, ``why``: (N, 2) int, per item the index of the criterion that
    separated its cluster's keeper from the runner-up (``len(criteria)`` = the id) and the
    runner-up's index; -1, -1 in clusters of one)."""
    n = len(cluster_ids)
    crit = [np.nan_to_num(np.asarray(c, float), nan=-np.inf) for c in criteria]
    id_rank = np.argsort(np.argsort(np.asarray(ids, dtype=object), kind="stable"), kind="stable")
    # lexsort: the last key is primary -> cluster, then each criterion (descending), then the id
    order = np.lexsort((id_rank, *[-c for c in reversed(crit)], np.asarray(cluster_ids)))
    keep = np.zeros(n, bool)
    why = np.full((n, 2), -1, np.int64)
    sorted_clusters = np.asarray(cluster_ids)[order]
    first = np.ones(n, bool)
    first[1:] = sorted_clusters[1:] != sorted_clusters[:-1]
    keep[order[first]] = True
    starts = np.flatnonzero(first)
    sizes = np.diff(np.append(starts, n))
    per_cluster = np.full((len(starts), 2), -1, np.int64)
    for k in np.flatnonzero(sizes > 1):
        best, runner = order[starts[k]], order[starts[k] + 1]
        per_cluster[k] = (next((c for c, v in enumerate(crit) if v[best] != v[runner]), len(crit)), runner)
    why[order] = np.repeat(per_cluster, sizes, axis=0)
    return keep, why



def dedupe_scores(rows: list[dict], truth: dict[str, dict]) -> dict:
    """Precision/recall of near-duplicate removal against planted ground truth.

    ``rows``: dedupe rows (``id``, ``cluster_id``, ``reason``); ``truth``: id -> {kind, dup_of}.
    Recall: share of planted near-duplicates (both copy and original present) that share a cluster
    with their original. Precision: share of the images removed as ``near_duplicate`` whose cluster
    holds a true relative (its original, a copy of it, or a sibling copy); which member is kept does
    not matter."""
    cluster_of = {r["id"]: r["cluster_id"] for r in rows if r.get("cluster_id") is not None}
    family = {i: (t.get("dup_of") or i) for i, t in truth.items()}
    families: dict[str, dict[str, int]] = {}  # cluster -> family -> members
    for i, c in cluster_of.items():
        fam = families.setdefault(c, {})
        key = family.get(i, i)
        fam[key] = fam.get(key, 0) + 1
    removed = [r["id"] for r in rows if r["reason"] == "near_duplicate"]
    correct = sum(families[cluster_of[i]].get(family.get(i, i), 0) > 1 for i in removed)
    planted = [i for i, t in truth.items() if t.get("kind") == "near_duplicate"]
    present = [i for i in planted if i in cluster_of and truth[i].get("dup_of") in cluster_of]
    found = sum(cluster_of[i] == cluster_of[truth[i]["dup_of"]] for i in present)
    return {
        "precision": correct / len(removed) if removed else 1.0,
        "recall": found / len(present) if present else 1.0,
        "removed": len(removed), "true_removed": correct,
        "planted": len(planted), "planted_present": len(present), "found": found,
    }
