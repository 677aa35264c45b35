"""Which step, which strength (stages/metrics/operating_point.py, stages/operating_point.py): the Pareto
front and the constraint on constructed scores, honest intervals, ``best`` in the sample stage, and the
stage on a tiny model."""
import json
from pathlib import Path

import numpy as np
import pytest

from stages.metrics import operating_point as op


def pt(step, scale, style, content, style_ci=None, content_ci=None):
    return op.Point(step, scale, style, content, style_ci or (style - 0.001, style + 0.001),
                    content_ci or (content - 0.01, content + 0.01))


def test_front_drops_dominated_points_and_keeps_ties():
    pts = [pt(100, 1.0, 0.80, 0.85), pt(100, 0.5, 0.70, 0.95), pt(50, 0.5, 0.60, 0.90),  # dominated by 100/0.5
           pt(50, 1.0, 0.80, 0.85)]  # an exact tie of 100/1.0: both stay
    front = op.pareto_front(pts)
    assert [p.label for p in front] == ["50/1", "100/1", "100/0.5"]  # style desc, then earlier step


def test_recommends_the_highest_style_that_keeps_content():
    pts = [pt(100, 1.0, 0.90, 0.80), pt(100, 0.5, 0.75, 0.93), pt(50, 1.0, 0.70, 0.95), pt(50, 0.5, 0.60, 0.99)]
    best = op.recommend(pts, content_min=0.9, n_pairs=8)
    assert (best["step"], best["scale"]) == (100, 0.5)  # 100/1.0 has more style but loses content
    assert not best["fallback"] and "content >= 0.9" in best["reason"]
    assert best["indistinguishable"] == []
    assert [p.feasible for p in pts] == [False, True, True, True]
    assert best["front"] == ["100/1", "100/0.5", "50/1", "50/0.5"]


def test_ties_prefer_more_content_then_the_earlier_step():
    pts = [pt(100, 1.0, 0.8, 0.92), pt(50, 1.0, 0.8, 0.95)]
    assert op.recommend(pts, 0.9, 8)["step"] == 50  # same style, more content
    pts = [pt(100, 1.0, 0.8, 0.95), pt(50, 1.0, 0.8, 0.95)]
    assert op.recommend(pts, 0.9, 8)["step"] == 50  # identical: the earlier step


def test_nothing_meets_the_threshold_falls_back_explicitly():
    pts = [pt(100, 1.0, 0.9, 0.6), pt(100, 0.5, 0.8, 0.8), pt(50, 0.5, 0.5, 0.7)]
    best = op.recommend(pts, 0.9, 8)
    assert best["fallback"] and (best["step"], best["scale"]) == (100, 0.5)
    assert best["reason"].startswith("no point keeps content >= 0.9") and "fell back" in best["reason"]
    nan = float("nan")
    best = op.recommend([pt(100, 1.0, 0.9, nan, content_ci=(nan, nan)), pt(50, 1.0, 0.7, nan, content_ci=(nan, nan))],
                        0.9, 8)
    assert best["fallback"] and best["step"] == 100 and best["reason"].startswith("content is not measurable")


def test_overlapping_intervals_are_indistinguishable_with_the_pairs_to_separate_them():
    a = pt(100, 1.0, 0.80, 0.95, style_ci=(0.76, 0.84))
    b = pt(50, 1.0, 0.78, 0.96, style_ci=(0.74, 0.82))
    c = pt(50, 0.5, 0.60, 0.99, style_ci=(0.58, 0.62))  # on the front, clearly lower
    best = op.recommend([a, b, c], 0.9, n_pairs=8)
    assert (best["step"], best["scale"]) == (100, 1.0)
    assert [(t["step"], t["scale"]) for t in best["indistinguishable"]] == [(50, 1.0)]
    # half-widths 0.04 + 0.04 against a gap of 0.02: (0.08 / 0.02)^2 = 16 times the 8 pairs
    assert best["indistinguishable"][0]["pairs_to_separate"] == 128
    assert "indistinguishable at this sample size (8 prompt-seed pairs) from 50/1" in best["reason"]
    assert "about 128 pairs" in best["reason"]
    assert op.pairs_to_separate(a, pt(1, 1, 0.80, 0.9, style_ci=(0.7, 0.9)), 8) is None  # equal style


def test_trend_names_overtraining_when_the_best_step_is_not_the_last():
    pts = [pt(50, 1.0, 0.70, 0.95), pt(100, 1.0, 0.80, 0.85), pt(50, 0.5, 0.6, 0.99), pt(100, 0.5, 0.65, 0.97)]
    best = op.recommend(pts, 0.9, 8)
    assert (best["step"], best["scale"]) == (50, 1.0)
    assert best["trend"].startswith("overtraining shows: from step 50 to 100 at scale 1")
    assert "style still rises while content falls" in best["trend"]
    assert op.recommend([pt(50, 1.0, 0.9, 0.95), pt(100, 1.0, 0.8, 0.96)], 0.9, 8)["trend"].startswith(
        "style peaks at step 50")
    assert op.recommend([pt(100, 1.0, 0.8, 0.95)], 0.9, 8)["trend"] is None


def test_measure_bootstraps_pairs_with_a_seeded_generator():
    rng = np.random.default_rng(0)
    style, clip, base = rng.uniform(0.5, 0.9, 12), rng.uniform(20, 30, 12), rng.uniform(25, 30, 12)
    boot = op.resamples(12, 500, seed=7)
    a = op.measure(10, 1.0, style, clip, base, boot)
    assert a.style == pytest.approx(style.mean()) and a.content == pytest.approx(clip.mean() / base.mean())
    assert a.style_ci[0] < a.style < a.style_ci[1] and a.content_ci[0] < a.content < a.content_ci[1]
    b = op.measure(10, 1.0, style, clip, base, op.resamples(12, 500, seed=7))
    assert (a.style_ci, a.content_ci) == (b.style_ci, b.content_ci)
    with pytest.raises(ValueError):
        op.measure(10, 1.0, style[:3], clip, base, boot)


def test_table_and_figure(tmp_path):
    pts = [pt(100, 1.0, 0.9, 0.8), pt(100, 0.5, 0.75, 0.93)]
    best = op.recommend(pts, 0.9, 8)
    md = op.table(pts, best)
    assert "| **100** | **0.5** |" in md and md.count("\n") == 4
    op.plot(pts, tmp_path / "g.png", "t", 0.9, (100, 0.5), 0.5)
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_best_resolves_to_the_recorded_point(tmp_path):
    from stages.models import snapshots

    path = tmp_path / "operating_point.json"
    with pytest.raises(SystemExit, match="run the operating_point stage"):
        snapshots.resolve_best("best", None, path)
    path.write_text(json.dumps({"enabled": False, "reason": "off"}))
    with pytest.raises(SystemExit, match="holds no operating point"):
        snapshots.resolve_best(None, "best", path)
    assert snapshots.resolve_best(40, 0.5, path) == (40, 0.5)  # numbers never read the file
    path.write_text(json.dumps({"enabled": True, "final_step": 150, "recommended": {"step": 100, "scale": 0.75}}))
    assert snapshots.resolve_best("best", "best", path) == (100, 0.75)
    assert snapshots.resolve_best(None, "best", path) == (None, 0.75)
    path.write_text(json.dumps({"enabled": True, "final_step": 150, "recommended": {"step": 150, "scale": 1.0}}))
    assert snapshots.resolve_best("best", None, path) == (None, None)  # the final adapter itself


# ----------------------------------------------------------------------------- the stage on a tiny model
GRID = ["eval.grid.enabled=true", "eval.grid.prompts=2", "eval.grid.seeds=[0,1]", "eval.grid.scales=[0.5,1.0]",
        "eval.grid.bootstrap=200"]


def grid_project(root):
    """samplekit's project (2 prompts, a random LoRA as the final adapter, 2 sampling steps) with a held-out
    set and one snapshot (step 40, another random LoRA) beside the final adapter (step 150)."""
    from stages.models import snapshots
    from tests import samplekit
    from tests.stagerun import write_params
    from tests.test_evaluate import write_holdout

    samplekit.build_project(root)
    p = write_params(root, "sample.prompts=prompts.txt", "sample.seeds=[0,1]", "sample.steps=2",
                     "sample.lora_scales=[0.0,0.5,1.0]", "sample.batch_size=4", "data.holdout=0.2", *GRID)
    snap = snapshots.snapshot_dir(40, root / "models/snapshots")
    samplekit.make_adapter(p, snap)
    (snap / "adapter.json").write_text("{}")
    write_holdout(root)
    return p


@pytest.fixture(scope="module")
def gridded(tmp_path_factory):
    from stages import operating_point
    from tests.stagerun import run_stage

    root = tmp_path_factory.mktemp("grid")
    grid_project(root)
    run_stage(operating_point.main, root)
    return root


def outputs(root):
    files = sorted((root / "reports/operating_point").iterdir()) + [root / "reports/plots/operating_point.csv"]
    return {f.name: f.read_bytes() for f in files}


def test_stage_writes_the_point_the_table_the_figure_and_the_plot(gridded):
    rec = json.loads((gridded / "reports/operating_point/operating_point.json").read_text())
    assert rec["enabled"] and rec["steps"] == [40, 150] and rec["final_step"] == 150 and rec["pairs"] == 4
    assert sorted((pt["step"], pt["scale"]) for pt in rec["points"]) == [(40, 0.5), (40, 1.0), (150, 0.5), (150, 1.0)]
    best = rec["recommended"]
    assert (best["step"], best["scale"]) in {(pt["step"], pt["scale"]) for pt in rec["points"] if pt["front"]}
    for pt in rec["points"]:
        assert pt["style_lo"] <= pt["style"] <= pt["style_hi"]
        if pt["content"] is not None:  # the tiny random CLIP may score every base image 0: content unmeasurable
            assert pt["content_lo"] <= pt["content"] <= pt["content_hi"]
    ok = [pt for pt in rec["points"] if pt["feasible"]]
    if ok:
        assert not best["fallback"] and best["style"] == max(pt["style"] for pt in ok)
    else:
        assert best["fallback"] and best["reason"].startswith(("no point keeps", "content is not measurable"))
    md = (gridded / "reports/operating_point/grid.md").read_text()
    assert md.count("\n| ") == 5 and best["reason"] in md
    assert (gridded / "reports/operating_point/grid.png").read_bytes()[:4] == b"\x89PNG"
    rows = (gridded / "reports/plots/operating_point.csv").read_text().splitlines()
    assert rows[0].startswith("label,step,scale,style") and len(rows) == 5


def test_a_second_run_gives_identical_files(gridded):
    from stages import operating_point
    from tests.stagerun import run_stage

    first = outputs(gridded)
    run_stage(operating_point.main, gridded)
    assert outputs(gridded) == first


def test_the_point_goes_to_the_run_that_trained_the_final_adapter(gridded, monkeypatch):
    """Like sample and evaluate, the stage's MLflow run is found by the final adapter's hash (not a run of
    its own with a warning)."""
    import contextlib

    from stages import operating_point
    from stages.core import lineage, tracking
    from tests.stagerun import run_stage

    seen = {}

    @contextlib.contextmanager
    def run(stage, p, **kwargs):
        seen[stage] = kwargs
        yield None

    monkeypatch.setattr(tracking, "run", run)
    run_stage(operating_point.main, gridded)
    sha = lineage.adapter_hash(gridded / "models/lora")
    assert sha and seen == {"operating_point": {"adapter_sha": sha}}


def test_sample_best_renders_the_recorded_point(gridded, monkeypatch):
    import hashlib

    from stages import sample
    from stages.models import snapshots
    from tests.stagerun import run_stage, write_params

    rec = json.loads((gridded / "reports/operating_point/operating_point.json").read_text())
    rec["recommended"].update(step=40, scale=0.75)  # a point the test chooses: best must follow the file
    (gridded / "reports/operating_point/operating_point.json").write_text(json.dumps(rec))
    write_params(gridded, "sample.prompts=prompts.txt", "sample.seeds=[0]", "sample.steps=1",
                 "sample.lora_scales=[0.0,1.0]", "sample.adapter_step=best", "sample.lora_scale=best", *GRID)
    run_stage(sample.main, gridded)
    index = json.loads((gridded / "reports/samples/index.json").read_text())
    assert index["adapter_step"] == 40 and index["lora_scale"] == 0.75 and index["scales"] == [0.0, 0.75, 1.0]
    assert index["best"] == ["adapter_step", "lora_scale"]
    snap = snapshots.snapshot_dir(40, gridded / "models/snapshots") / sample.LORA_FILE
    assert index["adapter_sha256"] == hashlib.sha256(snap.read_bytes()).hexdigest()


def test_grid_off_records_that_and_best_then_refuses(tmp_path):
    from stages import operating_point
    from stages.core import params
    from stages.core.paths import OperatingPoint
    from tests.stagerun import write_params

    p = write_params(tmp_path, "eval.grid.enabled=false")
    rec = operating_point.run(p, OperatingPoint().under(tmp_path))
    assert rec == {"enabled": False, "reason": "eval.grid.enabled is false: no grid rendered, no operating point"}
    assert (tmp_path / "reports/plots/operating_point.csv").read_text().startswith("label,step")
    with pytest.raises(params.ParamsError, match="sample.adapter_step=best reads the operating point"):
        write_params(tmp_path, "eval.grid.enabled=false", "sample.adapter_step=best")


def test_grid_steps_must_be_saved_snapshots(tmp_path):
    from stages import operating_point
    from stages.models import snapshots

    root = tmp_path / "snaps"
    for step, data in ((20, "a"), (40, "b")):
        d = snapshots.snapshot_dir(step, root)
        d.mkdir(parents=True)
        (d / "adapter.json").write_text(json.dumps({"data_hash": data, "steps": step}))
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora/adapter.json").write_text(json.dumps({"data_hash": "b", "steps": 60}))
    got = operating_point.grid_adapters("all", tmp_path / "lora", root, 150)
    assert [s for s, _ in got] == [40, 60]  # step 20 is another run's (other data): left out
    assert [s for s, _ in operating_point.grid_adapters([60, 40], tmp_path / "lora", root, 150)] == [40, 60]
    with pytest.raises(SystemExit, match=r"no snapshot of this run for steps \[20\].*saved: \[40\]"):
        operating_point.grid_adapters([20], tmp_path / "lora", root, 150)


def test_publish_best_ships_the_snapshot_and_the_card_carries_the_strength(tmp_path, monkeypatch):
    """``make publish ADAPTER=best``: the operating point's snapshot, its recommended scale in the card's
    diffusers and ComfyUI snippets; the final adapter gets its own step's best scale from the grid."""
    from stages import publish
    from stages.models import snapshots
    from tests import pubkit

    root = tmp_path / "project"
    pubkit.make_project(root, base="black-forest-labs/FLUX.1-dev")
    snap = snapshots.snapshot_dir(40, root / "models/snapshots")
    pubkit.make_adapter(snap, base="black-forest-labs/FLUX.1-dev", seed=1)
    info = json.loads((snap / "adapter.json").read_text())
    (snap / "adapter.json").write_text(json.dumps({**info, "steps": 40}))
    points = [{"step": s, "scale": c, "style": st, "content": ct, "feasible": ct >= 0.9, "front": True}
              for s, c, st, ct in ((40, 0.7, 0.81, 0.93), (40, 1.0, 0.85, 0.8), (60, 0.7, 0.80, 0.95),
                                   (60, 1.0, 0.82, 0.91))]
    rec = {"enabled": True, "final_step": 60, "pairs": 8, "points": points,
           "recommended": {"step": 40, "scale": 0.7, "style": 0.81, "content": 0.93, "reason": "the highest style",
                           "trend": "overtraining shows: style and content both fall", "fallback": False}}
    (root / "reports/eval").mkdir(parents=True, exist_ok=True)
    (root / "reports/eval/operating_point.json").write_text(json.dumps(rec))
    monkeypatch.chdir(root)
    assert publish.main(["--adapter", "best"]) == 0
    hub = root / "models/hub"
    assert json.loads((hub / "adapter.json").read_text())["steps"] == 40
    assert (hub / "pytorch_lora_weights.safetensors").read_bytes() == (snap / "pytorch_lora_weights.safetensors").read_bytes()
    card = (hub / "README.md").read_text()
    assert 'joint_attention_kwargs={"scale": 0.7}' in card and "`strength_model` 0.7." in card
    assert "Recommended strength **0.7**" in card and "this adapter at scale **0.7**" in card
    assert "Overtraining shows" in card
    assert publish.main([]) == 0  # the final adapter (step 60): the grid's best scale at step 60 keeping content
    card = (hub / "README.md").read_text()
    assert 'joint_attention_kwargs={"scale": 1.0}' in card and "step 40 (this adapter is step 60)" in card
    with pytest.raises(SystemExit, match="use final, best or a step number"):
        publish.main(["--adapter", "latest"])


def test_grid_base_images_come_from_the_cache(tmp_path, monkeypatch):
    """A second experiment's grid renders LoRA images only: its base images (and their bytes) come from
    the base-image cache the sample stage shares (stages.models.base_cache); counted transformer calls.
    Its held-out reference comes from the stage cache evaluate shares (stages.metrics.refcache)."""
    import shutil

    from stages.metrics import traits

    from stages import operating_point
    from tests import samplekit
    from tests.stagerun import run_stage

    monkeypatch.setenv("FLUXIMP_STAGE_CACHE", str(tmp_path / "stage-cache"))
    counts = samplekit.count_renders(monkeypatch)

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    grid_project(first)
    shutil.copytree(first, second)  # another experiment of the same adapters (a fresh checkout)
    run_stage(operating_point.main, first)  # cold: 4 base + 2 steps x 2 scales x 4 LoRA images
    # one pipeline call per 4 images (sample.batch_size 4), 2 transformer calls each (sample.steps 2)
    assert counts["images"] == 4 + 16 and counts["forward"] == 2 * 5
    from stages.metrics import refcache, reference

    # the held-out set was measured once, into the entry evaluate reads too (traits included)
    entries = list((tmp_path / "stage-cache" / refcache.KIND).rglob("*.bin"))
    assert len(entries) == 1 and set(refcache.unpack(entries[0].read_bytes())[3]) == set(traits.NAMES)
    counts.update(images=0, forward=0)
    monkeypatch.setattr(reference, "load_holdout", lambda *a: pytest.fail("held-out paintings decoded"))
    run_stage(operating_point.main, second)  # warm: the LoRA images only, the held-out set from the cache
    assert counts["images"] == 16 and counts["forward"] == 2 * 4
    assert outputs(first) == outputs(second)  # the same numbers from cached base images and reference


# ----------------------------------------------------------------------------- across experiments
def op_rows():
    return [
        {"Experiment": None, "rev": "workspace", "lora.rank": 4.0, "style_centroid_lora": 0.8},
        {"Experiment": None, "rev": "main", "lora.rank": 4.0, "style_centroid_lora": 0.8, "op_step": 150.0,
         "op_scale": 1.0, "op_style": 0.80, "op_content": 0.95},
        {"Experiment": "rank8", "rev": "abc1234", "lora.rank": 8.0, "style_centroid_lora": 0.85, "op_step": 100.0,
         "op_scale": 0.5, "op_style": 0.84, "op_content": 0.91},
        {"Experiment": "rank2", "rev": "def5678", "lora.rank": 2.0, "style_centroid_lora": 0.7, "op_step": 150.0,
         "op_scale": 1.0, "op_style": 0.70, "op_content": 0.90},  # dominated by main
    ]


def test_sweep_summary_draws_each_experiments_point_and_names_the_gpus(tmp_path, monkeypatch):
    import dvc.api
    import yaml

    from stages import sweep

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"lora": {"rank": 4}}))
    claims = tmp_path / ".cache/gpu-claims"
    claims.mkdir(parents=True)
    (claims / "claims.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [
        {"devices": ["1"], "stage": "train", "experiment": "rank8"}, {"devices": ["1"], "stage": "sample",
                                                                      "experiment": "rank8"},
        {"devices": ["0"], "stage": "train", "experiment": "rank2"}]))
    monkeypatch.setattr(dvc.api, "exp_show", lambda repo=None: op_rows())
    monkeypatch.chdir(tmp_path)
    sweep.main(["--param", "lora.rank", "--repo", str(tmp_path), "--out", str(tmp_path / "out")])
    table = (tmp_path / "out/summary.md").read_text().splitlines()
    assert table[0] == "| experiment | rev | lora.rank | style ↑ | op step | op scale | op style ↑ | op content ↑ | gpus |"
    assert table[2] == "| rank2 | def5678 | 2 | 0.7000 | 150 | 1 | 0.7000 | 0.900 | train:0 |"
    assert table[4].endswith("| train:1 sample:1 |") and table[3].endswith("|  |")  # main ran on no claimed GPU
    assert (tmp_path / "out/operating_points.png").read_bytes()[:4] == b"\x89PNG"
    pts = [op.Point(int(r["op_step"]), r["op_scale"], r["op_style"], r["op_content"]) for r in op_rows()[1:]]
    assert [p.label for p in op.pareto_front(pts)] == ["100/0.5", "150/1"]  # rank8 and main; rank2 dominated


def test_make_exps_adds_each_experiments_operating_point():
    from stages import experiments

    header, cells, notes = experiments.operating_points(op_rows(), sort="style_centroid_lora")
    assert header == ["Experiment", "step", "scale", "op style ↑", "op content ↑"]
    assert cells == [["rank8 (abc1234)", "100", "0.5", "0.8400", "0.910"], ["main", "150", "1", "0.8000", "0.950"],
                     ["rank2 (def5678)", "150", "1", "0.7000", "0.900"]]
    assert "content_min" in notes[0]
    assert experiments.operating_points(op_rows()[:1])[1] == []  # no grid ran: no second table


def test_params_check_the_grid_before_any_stage_runs():
    """Caught by the schema (the validate stage), before DVC removes any output."""
    from stages.core import params

    assert params.validate({"eval": {"grid": {"steps": [50, 150]}}}).eval.grid.steps == [50, 150]
    for raw, msg in [({"eval": {"grid": {"steps": [60]}}}, r"eval.grid.steps \[60\]: training keeps no adapter.*"
                                                           r"kept: \[50, 100, 150\]"),
                     ({"eval": {"grid": {"steps": [50]}}, "train": {"keep_last": 1}}, r"kept: \[150\]"),
                     ({"eval": {"grid": {"steps": "some"}}}, "must be all .* or a non-empty list of steps"),
                     ({"eval": {"grid": {"scales": [0.0]}}}, "greater than 0"),
                     ({"sample": {"lora_scale": "max"}}, "must be a scale > 0, 'best'"),
                     ({"sample": {"lora_scale": "best"}, "eval": {"grid": {"enabled": False}}},
                      "sample.lora_scale=best reads the operating point")]:
        with pytest.raises(params.ParamsError, match=msg):
            params.validate(raw)


def test_evaluate_and_the_report_carry_the_recorded_point(tmp_path):
    """evaluate's op_* keys (headline, so dvc exp show, make exps and the registry tags get them) and the
    report's section: recommendation, intervals, reason, trend, figure, all escaped by jinja2."""
    from stages import evaluate
    from stages.core import params
    from stages.metrics import report, vocab

    rec = {"enabled": True, "final_step": 150, "pairs": 8, "prompts": 4, "seeds": [0, 1], "content_min": 0.9,
           "style_metric": "style_centroid", "content_metric": "clip_score_ratio <b>",
           "points": [{"step": 100, "scale": 1.0, "style": 0.8, "style_lo": 0.79, "style_hi": 0.81, "content": 0.95,
                       "content_lo": 0.9, "content_hi": 1.0, "front": True, "feasible": True}],
           "recommended": {"step": 100, "scale": 1.0, "style": 0.8, "content": 0.95, "style_ci": [0.79, 0.81],
                           "content_ci": [0.9, 1.0], "reason": "the highest style", "fallback": False,
                           "trend": "overtraining shows: from step 100 to 150", "indistinguishable": []}}
    path = tmp_path / "reports/operating_point/operating_point.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    (path.parent / "grid.png").write_bytes(b"\x89PNG")
    got = evaluate.operating_point_metrics(path)
    assert got == {"op_step": 100, "op_scale": 1.0, "op_style": 0.8, "op_content": 0.95}
    assert list(vocab.headline({"style_centroid_lora": 0.9, **got})) == ["style_centroid_lora", *got]
    assert evaluate.operating_point_metrics(tmp_path / "missing.json") == {}
    index = {"prompts": ["a"], "seeds": [0], "grids": []}
    html = report.write_report(Path("reports/report.html"), {"n_holdout": 2}, [], index, params.Params(),
                               root=tmp_path).read_text()
    assert "Recommended: step 100, LoRA scale 1" in html and "[0.79, 0.81]" in html
    assert "The highest style. Overtraining shows: from step 100 to 150." in html
    assert 'src="operating_point/grid.png"' in html and "clip_score_ratio &lt;b&gt;" in html
    path.write_text(json.dumps({"enabled": False, "reason": "eval.grid.enabled is false"}))
    html = report.write_report(Path("reports/report.html"), {"n_holdout": 2}, [], index, params.Params(),
                               root=tmp_path).read_text()
    assert "eval.grid.enabled is false" in html and "Recommended" not in html
