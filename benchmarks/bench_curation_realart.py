"""Curation on real paintings: dedupe recall on generated copies and on real second scans, false
merges among distinct works, the keep decisions, and the heuristic filter's rejects.

    .venv/bin/python benchmarks/bench_curation_realart.py --corpus ../shared/realart [--folder]

From ``labels.csv`` (role ``corpus``: 126 paintings; role ``dupe``: 12 second scans or crops from
other sources, ``dup_of`` naming the corpus file) it builds, for ``--n`` corpus paintings drawn with
``--seed``, one copy of each kind (:data:`KINDS`: 50 % resize, JPEG q60, colour jitter, a 5 % crop at
a random offset, a horizontal flip; every copy except ``jpeg60`` is stored as JPEG q90, each from its
own seeded generator) and runs the project's own code: ``stages.dedupe.hash_rows`` + ``decide``
(what the dedupe stage calls) on corpus + dupes + copies, and ``stages.filter.measure`` (what the
filter stage calls) on corpus + dupes under the smoke and the flux-dev filter settings. With
``--folder`` the same images are also written to a temporary folder and run through the real
download -> dedupe stages (``data.source=folder``), and the recall is printed again.

The images stay in memory or in a temporary folder: nothing from the corpus is copied into the
project. Prints Markdown (reports/bench/curation_realart.md holds a run and its command).
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages import dedupe  # noqa: E402
from stages import filter as filter_stage  # noqa: E402
from stages.core import params, shards  # noqa: E402
from stages.curation import hashing, verify  # noqa: E402

KINDS = ("resize50", "jpeg60", "jitter", "crop5", "flip")
SERIES = (  # distinct works of one motif that must stay apart
    ("monet_haystacks-end-of-summer", "monet_meules-haystacks"),
    ("gogh_bedroom-in-arles", "gogh_the-artist-s-room-in-arles"),
    ("gogh_the-starry-night", "gogh_starry-night-over-the-rhone"),
    ("eyck_ghent-altarpiece-open", "eyck_ghent-altarpiece-closed"),
    ("renoir_ball-at-the-moulin-de-la-galette", "renoir_dance-at-the-moulin-de-la-galette"),
    ("degas_the-dance-class", "degas_the-dance-lesson"),
    ("grunewald_isenheim-altarpiece-the-crucifixion", "grunewald_isenheim-altarpiece-the-resurrection"),
)


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_copy(img: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    w, h = img.size
    if kind == "resize50":
        return jpeg(img.resize((w // 2, h // 2), Image.Resampling.LANCZOS))
    if kind == "jpeg60":
        return jpeg(img, 60)
    if kind == "jitter":  # brightness, contrast, saturation each by 5-12 %, up or down
        out = img
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            out = enhance(out).enhance(1 + rng.choice([-1, 1]) * rng.uniform(0.05, 0.12))
        return jpeg(out)
    if kind == "crop5":  # keep 95 % of each side at a random offset
        cw, ch = round(w * 0.95), round(h * 0.95)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return jpeg(img.crop((x, y, x + cw, y + ch)))
    if kind == "flip":
        return jpeg(ImageOps.mirror(img))
    raise ValueError(kind)


def load(corpus: Path, n: int, seed: int) -> tuple[dict, dict]:
    """name -> bytes, and name -> {family, kind, of}: corpus + dupes + the generated copies."""
    labels = list(csv.DictReader(open(corpus / "labels.csv", newline="", encoding="utf-8")))
    blobs, info = {}, {}
    for r in labels:
        name = Path(r["file"]).stem
        blobs[name] = (corpus / r["file"]).read_bytes()
        of = Path(r["dup_of"]).stem if r["role"] == "dupe" else None
        info[name] = {"family": of or name, "kind": "dupe" if of else "corpus", "of": of}
    chosen = sorted(np.random.default_rng(seed).choice(
        sorted(n for n, i in info.items() if i["kind"] == "corpus"), n, replace=False))
    for k, name in enumerate(chosen):
        img = Image.open(io.BytesIO(blobs[name])).convert("RGB")
        for j, kind in enumerate(KINDS):
            copy = f"{name}__{kind}"
            blobs[copy] = make_copy(img, kind, np.random.default_rng([seed, k, j]))
            info[copy] = {"family": name, "kind": kind, "of": name}
    return blobs, info


def rows_of(blobs: dict) -> tuple[list[dict], dict]:
    rows, name_of = [], {}
    for name, data in blobs.items():
        cid = shards.content_id(data)
        name_of.setdefault(cid, name)
        w, h = Image.open(io.BytesIO(data)).size
        rows.append({"id": cid, "image": data, "width": w, "height": h})
    return rows, name_of


def scores(cluster_of: dict, info: dict) -> dict:
    """Recall per kind (a copy found = in its original's cluster) and false merges (clusters
    holding more than one family)."""
    found = defaultdict(lambda: [0, 0])
    for name, i in info.items():
        if i["of"] and name in cluster_of and i["of"] in cluster_of:
            found[i["kind"]][0] += cluster_of[name] == cluster_of[i["of"]]
            found[i["kind"]][1] += 1
    families = defaultdict(set)
    for name, c in cluster_of.items():
        families[c].add(info[name]["family"])
    merged = [sorted(f) for f in families.values() if len(f) > 1]
    return {"recall": dict(found), "false_merges": merged}


def run_decide(blobs: dict, info: dict, cfg) -> tuple[dict, list[dict], dict, dict, float]:
    rows, name_of = rows_of(blobs)
    by_id = {r["id"]: r["image"] for r in rows}
    t0 = time.perf_counter()
    h = dedupe.hash_rows(rows, cfg)

    def signatures(ids):
        keys = sorted(ids)
        return dict(zip(keys, hashing.signatures_many((by_id[k] for k in keys), cfg.workers)))

    out, steps = dedupe.decide(h, cfg, signatures)
    secs = time.perf_counter() - t0
    named = {name_of[r["id"]]: r for r in out if r["reason"] != "exact_duplicate"}
    cluster_of = {n: name_of[r["cluster_id"]] for n, r in named.items() if r.get("cluster_id")}
    hashes = {name_of[i]: hv[0] for i, hv in zip(h["ids"], h["hashes"]) if hv is not None}
    return cluster_of, named, steps, hashes, secs


def run_folder(blobs: dict, info: dict, p) -> dict:
    """The same images through download -> dedupe on a folder source (in a temporary project)."""
    import yaml

    from stages import download
    from stages.core import params as params_mod

    old = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        for name, data in blobs.items():
            (tmp / "images" / f"{name}.jpg").write_bytes(data)
        raw = p.model_dump()
        raw["data"].update(source="folder", path=str(tmp / "images"))
        (tmp / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        os.environ["FLUXIMP_MLFLOW"] = "0"
        os.chdir(tmp)
        try:
            params_mod.load()  # validates
            download.main()
            dedupe.main()
            import pyarrow.parquet as pq

            table = pq.read_table(dedupe.OUT).to_pylist()
        finally:
            os.chdir(old)
    name_of = {shards.content_id(d): n for n, d in reversed(list(blobs.items()))}
    return {name_of[r["id"]]: name_of[r["cluster_id"]] for r in table
            if r.get("cluster_id") and r["reason"] != "exact_duplicate"}


def closest_distinct(hashes: dict, info: dict, sigs: dict, top: int = 8) -> list[tuple]:
    names = [n for n in hashes if info[n]["kind"] in ("corpus", "dupe")]
    out = []
    for a, b in itertools.combinations(names, 2):
        if info[a]["family"] != info[b]["family"]:
            out.append((dedupe.view_distance(hashes[a], hashes[b]), a, b))
    out.sort()
    return [(d, a, b, verify.match(sigs[a], sigs[b])) for d, a, b in out[:top]]


def match_margins(hashes: dict, info: dict, sigs: dict) -> tuple[list, list]:
    """(distinct pairs by detail match, best first; copy/source pairs, worst first)."""
    distinct, true = [], []
    for a, b in itertools.combinations(sorted(sigs), 2):
        if sigs[a] is None or sigs[b] is None:
            continue
        if info[a]["family"] != info[b]["family"]:
            if info[a]["kind"] in ("corpus", "dupe") and info[b]["kind"] in ("corpus", "dupe"):
                distinct.append((verify.match(sigs[a], sigs[b])[0], a, b))
        elif info[a]["of"] == b or info[b]["of"] == a:
            true.append((verify.match(sigs[a], sigs[b])[0], a, b))
    return sorted(distinct, reverse=True), sorted(true)


def filter_rows(blobs: dict, info: dict, f) -> list[dict]:
    out = []
    for name, data in blobs.items():
        if info[name]["kind"] in ("corpus", "dupe"):
            r, _ = filter_stage.measure({"id": name, "image": data}, f)
            out.append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="../shared/realart")
    ap.add_argument("--n", type=int, default=10, help="corpus paintings that get copies")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folder", action="store_true", help="also run download -> dedupe on a folder")
    args = ap.parse_args()
    corpus = Path(args.corpus)
    blobs, info = load(corpus, args.n, args.seed)
    smoke = params.Params()
    flux = params.Params(**params.compose(["profile=flux-dev"]))
    cfg = smoke.dedupe
    print(f"# Curation on real paintings\n\n`{' '.join(['.venv/bin/python', 'benchmarks/bench_curation_realart.py'] + sys.argv[1:])}`"
          f" — {sum(i['kind'] == 'corpus' for i in info.values())} corpus paintings, "
          f"{sum(i['kind'] == 'dupe' for i in info.values())} real dupes, {args.n} paintings x "
          f"{len(KINDS)} generated copies (seed {args.seed}); dedupe params {cfg.model_dump()}; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores\n")

    cluster_of, named, steps, hashes, secs = run_decide(blobs, info, cfg)
    s = scores(cluster_of, info)
    print(f"## Dedupe (`stages.dedupe.decide`, {secs:.1f} s for {len(blobs)} images)\n")
    print(f"pairs per step: {steps}\n")
    print("| kind | found |\n|---|---|")
    for kind in (*KINDS, "dupe"):
        f, t = s["recall"].get(kind, [0, 0])
        print(f"| {'real second scans / crops' if kind == 'dupe' else kind} | {f}/{t} |")
    print(f"\nfalse merges between distinct works: {len(s['false_merges'])} {s['false_merges'] or ''}\n")

    missed = [n for n, i in info.items() if i["of"] and cluster_of.get(n) != cluster_of.get(i["of"])]
    rows_by_name, need = named, set(missed) | {i["of"] for n, i in info.items() if n in missed}
    need |= set(hashes)
    by_name = dict(blobs)
    sigs = dict(zip(sorted(need), hashing.signatures_many((by_name[k] for k in sorted(need)), cfg.workers)))
    if missed:
        print("missed copies (pHash over the views, detail match):\n")
        for n in missed:
            o = info[n]["of"]
            m = verify.match(sigs[n], sigs[o])
            print(f"- {n}: pHash {dedupe.view_distance(hashes[n], hashes[o])}, match {m[0]:.2f} ({m[1]})")
        print()
    print("closest distinct works (pHash over the views; detail match, verify_min "
          f"{cfg.verify_min}):\n")
    for d, a, b, m in closest_distinct(hashes, info, sigs):
        print(f"- {d} bits: {a} / {b}; match {m[0]:.2f} ({m[1]})")
    distinct, true = match_margins(hashes, info, sigs)
    print(f"\nthe verifier's margin: highest detail match between distinct works (all "
          f"{len(distinct):,} pairs of corpus + dupes), then the lowest between a copy and its source:\n")
    for m, a, b in distinct[:5]:
        print(f"- distinct {m:.2f}: {a} / {b}")
    for m, a, b in true[:5]:
        print(f"- copy {m:.2f}: {a} / {b}")
    print("\nseries of one motif (must stay apart; the corpus holds one Rouen Cathedral and one Water "
          "Lilies, so those two are checked only against every other work, above):\n")
    for a, b in SERIES:
        if a in hashes and b in hashes:
            m = verify.match(sigs[a], sigs[b])
            print(f"- {a} / {b}: pHash {dedupe.view_distance(hashes[a], hashes[b])}, match {m[0]:.2f}, "
                  f"{'MERGED' if cluster_of[a] == cluster_of[b] else 'apart'}")

    print("\n## Keep decisions (clusters with more than one member)\n")
    print("| cluster | members | kept | why |\n|---|---|---|---|")
    clusters = defaultdict(list)
    for n, c in cluster_of.items():
        clusters[c].append(n)
    wrong = 0
    for c, members in sorted(clusters.items()):
        if len(members) < 2:
            continue
        kept = [m for m in members if rows_by_name[m]["kept"]][0]
        fam = Counter(info[m]["family"] for m in members).most_common(1)[0][0]
        source = [m for m in members if info[m]["kind"] == "corpus"]
        ok = kept in source or info[kept]["kind"] == "dupe" and _bigger(blobs, kept, source)
        wrong += not ok
        print(f"| {fam} | {len(members)} | {kept.replace(fam, '~')}{'' if ok else ' (NOT the source)'} | "
              f"{rows_by_name[kept]['keep_reason']} |")
    print(f"\nkept a generated copy over its source: {wrong}\n")

    if args.folder:
        t0 = time.perf_counter()
        folder = scores(run_folder(blobs, info, smoke), info)
        print(f"## The same through download -> dedupe on a folder source ({time.perf_counter() - t0:.1f} s)\n")
        print(" | ".join(f"{k}: {v[0]}/{v[1]}" for k, v in sorted(folder["recall"].items())),
              f"| false merges: {len(folder['false_merges'])}; the same as through decide: "
              f"{'yes' if folder == s else 'NO'}\n")

    print("## Heuristic filter (`stages.filter.measure`) on corpus + dupes\n")
    short = flux.model_copy(update={"filter": flux.filter.model_copy(update={"size_check": "short_side"})})
    for label, p in (("smoke", smoke), ("flux-dev", flux), ("flux-dev with size_check=short_side (before)", short)):
        f = p.filter
        rows = filter_rows(blobs, info, f)
        rejects = [(r["id"], r["reasons"]) for r in rows if r["reasons"]]
        by_reason = Counter(x for _, why in rejects for x in why)
        print(f"### {label}: {len(rejects)} of {len(rows)} rejected {dict(by_reason)}\n")
        for i, why in rejects:
            r = next(x for x in rows if x["id"] == i)
            print(f"- {i} {r['width']}x{r['height']} (bucket side {r['bucket_side']:.0f}): {why}")
        print("\nclosest to each cut-off:\n")
        for key, cut, worst in _margins(f):
            r = worst(rows, key)
            print(f"- {key}: {r['id']} at {r[key]:.4g} (cut-off {cut})")
        print()


def _bigger(blobs: dict, a: str, others: list[str]) -> bool:
    """A real dupe may rightly win: a larger scan."""
    size = lambda n: np.prod(Image.open(io.BytesIO(blobs[n])).size)  # noqa: E731
    return all(size(a) >= size(o) for o in others)


def _margins(f) -> list:
    low = lambda rows, k: min(rows, key=lambda r: r.get(k, np.inf))  # noqa: E731
    high = lambda rows, k: max(rows, key=lambda r: r.get(k, -np.inf))  # noqa: E731
    return [("texture", f.texture_min, low), ("entropy", f.entropy_min, low), ("std", f.std_min, low),
            ("blur", f.blur_min, low), ("clipped_inner", f.clipped_max, high), ("clipped", f.surround_max, high),
            ("bucket_side", f.min_side, low), ("min_side", f.min_side, low), ("aspect", f.aspect_max, high)]


if __name__ == "__main__":
    main()
