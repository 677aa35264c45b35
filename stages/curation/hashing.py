"""Perceptual hashes and near-duplicate clustering (the dedupe stage's building blocks).

Hashes are imagehash's pHash / dHash, stored as packed bits: a ``uint8`` array of shape
(N, hash_size**2 / 8), or hex strings in tables. Distances are Hamming distances (popcount of XOR).

:func:`near_pairs` finds every pair within a distance ``r`` without comparing all pairs in Python:
multi-index hashing (Norouzi et al., 2012). The bits are split into ``m`` 16-bit chunks; if two hashes
differ in at most ``r`` bits, at least one chunk differs in at most ``r // m`` bits (pigeonhole). So
for every chunk we look up, in a bucket table of that chunk's 65,536 values, each hash's chunk XOR
every flip mask of weight <= ``r // m`` (137 masks for 16 bits and radius 2), and verify the
candidates with a vectorised popcount. Everything is numpy array work in blocks; 100,000 random
64-bit hashes at r=10 take a few seconds (``benchmarks/bench_dedupe.py``). Where the masks would
explode (large radius per chunk) it falls back to blocked brute force, still vectorised.

:func:`cluster` links the pairs transitively (connected components) and :func:`choose_keepers`
applies the documented keep rule.
"""
from __future__ import annotations

import io
import itertools
from typing import Iterable, Optional, Sequence

import numpy as np

from stages.core.pool import parallel_map

CHUNK_BITS = 16
MAX_MASKS = 1200  # above this many flip masks per chunk, brute force is faster


# ---- hashing ---------------------------------------------------------------------------------

def _bits_to_bytes(hash_obj) -> np.ndarray:
    return np.packbits(np.asarray(hash_obj.hash, dtype=bool).ravel())


def hash_image(img, hash_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """PIL image -> (pHash, dHash) as packed bits (uint8 arrays of hash_size**2/8 bytes)."""
    import imagehash

    img = img.convert("RGB")
    return (_bits_to_bytes(imagehash.phash(img, hash_size=hash_size)),
            _bits_to_bytes(imagehash.dhash(img, hash_size=hash_size)))


def decode_small(data: bytes, min_side: int = 256, with_size: bool = False):
    """Decode for measuring: a JPEG is decoded at a reduced DCT scale (both sides still >=
    ``min_side`` px, far more than the 32 px pHash or a 64 px signature use), several times faster
    on big files. ``with_size``: also return the full (width, height), EXIF rotation applied."""
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data))
    size = img.size
    if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that swap the sides
        size = size[::-1]
    if img.format == "JPEG":
        img.draft("RGB", (min_side, min_side))
    img = ImageOps.exif_transpose(img)
    img = img.convert("RGB") if img.mode != "RGB" else img
    return (img, size) if with_size else img


def _hash_bytes(args: tuple[bytes, int]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    data, hash_size = args
    try:
        return hash_image(decode_small(data), hash_size)
    except Exception:  # unreadable image: the caller records a reject
        return None


def _signature_bytes(data: bytes) -> Optional[np.ndarray]:
    try:
        return detail_signature(decode_small(data))
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
              progress=None) -> list[Optional[tuple[np.ndarray, np.ndarray]]]:
    """(pHash, dHash) of encoded images, in ``workers`` processes; ``None`` where one does not
    decode. ``progress``: optional callable(n_done), e.g. a tqdm bar's ``update``."""
    return _pool_map(_hash_bytes, ((b, hash_size) for b in blobs), workers, progress)


def signatures_many(blobs: Iterable[bytes], workers: int = 2) -> list[Optional[np.ndarray]]:
    """:func:`detail_signature` of encoded images, in ``workers`` processes."""
    return _pool_map(_signature_bytes, blobs, workers)


# ---- pixel verification of candidate pairs ---------------------------------------------------
# pHash keeps only the coarsest 8x8 DCT frequencies, so two different paintings of one composition
# (a series, a template) can fall within a few bits. A real copy (resized, re-encoded, slightly
# cropped, colour-shifted) keeps the fine detail too. The signature is the high-pass detail of a
# 64 px gray thumbnail (mean and colour removed), at a few centre crops to absorb small crops; two
# images are the same picture when the best normalised correlation over the crops is high.

VERIFY_SIDE = 64
VERIFY_CROPS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05)


def detail_signature(img) -> np.ndarray:
    """(len(VERIFY_CROPS), D) float32: unit-norm high-pass detail of centre crops of ``img``."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    gray = img.convert("L")
    w, h = gray.size
    out = []
    for c in VERIFY_CROPS:
        box = (w * c, h * c, w * (1 - c), h * (1 - c))
        t = np.asarray(gray.resize((VERIFY_SIDE, VERIFY_SIDE), Image.Resampling.BOX, box=box), np.float32)
        t = (t - gaussian_filter(t, 2.0))[4:-4, 4:-4].ravel()
        out.append(t / (np.linalg.norm(t) + 1e-6))
    return np.stack(out)


def pair_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Best correlation of one image's full view against the other's crops, both ways round."""
    return float(max((a[0] @ b.T).max(), (b[0] @ a.T).max()))


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


def choose_keepers(cluster_ids: np.ndarray, pixels: np.ndarray, ids: Sequence[str],
                   quality: Optional[np.ndarray] = None) -> np.ndarray:
    """The keep rule, one keeper per cluster: the largest pixel count; on a tie the higher
    ``quality`` (when given, NaN counts as worst); then the smallest id. Returns a bool mask."""
    n = len(cluster_ids)
    q = np.zeros(n) if quality is None else np.nan_to_num(np.asarray(quality, float), nan=-np.inf)
    id_rank = np.argsort(np.argsort(np.asarray(ids, dtype=object), kind="stable"), kind="stable")
    # lexsort: last key is primary -> cluster, then -pixels, then -quality, then id
    order = np.lexsort((id_rank, -q, -np.asarray(pixels, float), np.asarray(cluster_ids)))
    keep = np.zeros(n, bool)
    sorted_clusters = np.asarray(cluster_ids)[order]
    first = np.ones(n, bool)
    first[1:] = sorted_clusters[1:] != sorted_clusters[:-1]
    keep[order[first]] = True
    return keep



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
