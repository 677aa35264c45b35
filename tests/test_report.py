"""report.html renders, shows the numbers, and links only files that exist; plots from known data."""
import csv
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from stages.core import params
from stages.metrics import report, traits, vocab


def metrics() -> dict:
    m = {"n_holdout": 10, "n_base": 4, "n_lora": 4, "lora_scale": 1.0,
         "style_centroid_holdout": 0.9, "style_centroid_base": 0.5, "style_centroid_lora": 0.7,
         "style_centroid_delta": 0.2, "clip_score_base": 30.0, "clip_score_lora": 27.0,
         "clip_score_ratio": 0.9, "kid_base": 0.04, "kid_lora": 0.01, "kid_delta": -0.03}
    for i, t in enumerate(traits.NAMES):
        m.update({f"trait_{t}_holdout": 2.0 + i, f"trait_{t}_base": 1.0 + i, f"trait_{t}_lora": None})
    # stroke isotropy: the LoRA overshoots the held-out value (3.5 vs 2.0) yet ends closer than base
    m.update({"trait_stroke_isotropy_lora": 3.5, "trait_stroke_isotropy_dist_base": 2.0,
              "trait_stroke_isotropy_dist_lora": 1.5, "trait_stroke_isotropy_dist_delta": -0.5})
    return m


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.tags, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href")]

    def handle_data(self, data):
        self.text.append(data)


def project(tmp_path: Path, with_optional: bool) -> Path:
    (tmp_path / "reports/samples/grids").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "reports/samples/grids/seed-0.png")
    (tmp_path / "reports/eval").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "reports/eval/traits.png")
    if with_optional:
        (tmp_path / "reports/eval/abtest").mkdir()
        (tmp_path / "reports/eval/abtest/index.html").write_text("<html></html>")
        Image.new("RGB", (8, 8)).save(tmp_path / "reports/eval/loss.png")
        (tmp_path / "reports/mlflow_run.json").write_text(json.dumps({"run_id": "abc123runid"}))
        (tmp_path / "reports/curation.json").write_text(json.dumps({
            "kept": 200, "precision": 0.97, "by_split": {"holdout": 21},
            "filter": {"recall": 1.0, "recall_by_defect": {"blank": 1.0}},
            "per_stage": {"dedupe": {"in": 240, "out": 216}, "filter": {"in": 216, "out": 189}}}))
        for fig in ("reports/data/figures/counts.png", "reports/filter/figures/scores.png",
                    "reports/dedupe/largest_clusters.png"):
            (tmp_path / fig).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(tmp_path / fig)
        (tmp_path / "reports/plots").mkdir()
        (tmp_path / "reports/plots/sweep.csv").write_text("scale,style_centroid,kid\n0.0,0.5,0.04\n1.0,0.7,\n")
        (tmp_path / "reports/human.json").write_text(json.dumps({"questions": {"style": {
            "question": "Which looks more like an Impressionist painting?", "lora_wins": 8, "n": 10,
            "lora_win_rate": 0.8, "ci95_low": 0.49, "ci95_high": 0.94}}}))
    return tmp_path


INDEX = {"prompts": ["a", "b"], "seeds": [0, 1], "steps": 4, "guidance": 3.5, "resolution": 64,
         "trigger": "impressionism style", "adapter_sha256": "f" * 64,
         "grids": [{"file": "grids/seed-0.png", "seed": 0}, {"file": "grids/seed-1.png", "seed": 1}]}


@pytest.mark.parametrize("with_optional", [False, True])
def test_report_renders_and_links_only_existing_files(tmp_path, with_optional):
    root = project(tmp_path, with_optional)
    out = report.write_report(Path("reports/report.html"), metrics(), ["FID omitted: too few"], INDEX,
                              params.Params(), root=root)
    parser = Collector()
    parser.feed(out.read_text())
    text = " ".join(parser.text)
    assert parser.links, "the report links its images"
    for link in parser.links:
        assert (root / "reports" / link).exists(), link
    assert "samples/grids/seed-0.png" in parser.links
    assert "samples/grids/seed-1.png" not in parser.links  # listed in the index, but absent
    for section in ("Metrics", "Impressionism traits", "Samples", "Blind A/B test", "Training",
                    "Dataset", "Lineage"):
        assert section in text
    assert "FID omitted: too few" in text and "0.9" in text
    assert "git commit" not in text  # the tracked page reads the same on every run (issue 18)
    assert "impressionism style" in text and "f" * 64 in text
    html = out.read_text()
    assert params.Params().mlflow.experiment in text  # lineage: the MLflow experiment, and how to find the run
    assert f"tags.`adapter.sha256` = &#39;{'f' * 64}&#39;" in html
    if with_optional:
        assert "abc123runid" not in text and "eval/loss.png" in parser.links
        assert "eval/abtest/index.html" in parser.links
        assert "precision" in text and "0.97" in text and "LoRA win rate" in text
        assert "LoRA-scale sweep" in text
        assert re.search(r"<li><a href=\"[^\"]*sweep.csv\">LoRA-scale sweep \(CSV\)</a></li>", html)  # one link each
        for fig in ("data/figures/counts.png", "filter/figures/scores.png", "dedupe/largest_clusters.png"):
            assert fig in parser.links  # the curation figures are embedded
        assert "by_split.holdout" not in text  # the dataset JSON is tables, not flattened keys
    else:
        assert "No training curve" in text and "No dataset reports" in text


def cells(html: str) -> list[list[str]]:
    return [re.findall(r"<t[dh]>(.*?)</t[dh]>", r) for r in re.findall(r"<tr>(.*?)</tr>", html, re.S)]


def test_metrics_table_rows_and_directions():
    rows = cells(report.metrics_table(metrics()))
    labels = [r[0] for r in rows[1:]]
    assert labels[0] == vocab.FAMILIES["style_centroid"].label
    assert not any(lab.startswith("FID") for lab in labels)  # absent metrics: no row
    assert not any(lab.startswith("trait") for lab in labels)  # traits have their own table
    kid = next(r for r in rows if r[0].startswith("KID"))
    assert kid[-1] == "lower" and kid[-2] == "-0.03"
    clip = next(r for r in rows if r[0] == vocab.FAMILIES["clip_score"].label)
    assert clip[-2] == "-3"  # LoRA - base, never the ratio
    ratio = next(r for r in rows if r[0] == "CLIP score ratio (LoRA / base)")
    assert ratio[1:4] == ["\u2013", "\u2013", "0.9"] and ratio[4] == "\u2013"


def test_trait_rows_are_distances_to_the_holdout_set():
    rows = {r["label"]: r for r in report.trait_rows(metrics())}
    assert set(rows) == {t.replace("_", " ") for t in traits.NAMES}
    stroke = rows["stroke isotropy"]
    assert stroke["change"] == pytest.approx(-0.5) and stroke["verdict"] == "closer"
    score = rows["impressionism"]
    assert score["direction"] == "higher" and score["verdict"] == "" and score["values"][2] is None


def test_report_escapes_what_it_shows(tmp_path):
    root = project(tmp_path, False)
    out = report.write_report(Path("reports/report.html"), metrics(), ["<script>alert(1)</script>"], INDEX,
                              params.Params(), root=root)
    page = out.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_json_tables_keep_structure():
    tables = report.json_tables({"kept": 3, "rejects": {"blank": 1, "tiny": 2},
                                 "per_stage": {"dedupe": {"in": 4, "out": 3}, "filter": {"in": 3}},
                                 "items": [{"id": "a", "n": 1}, {"id": "b"}]})
    by_title = {t["title"]: t for t in tables}
    assert by_title[""]["rows"] == [["kept", 3]]
    assert by_title["rejects"]["rows"] == [["blank", 1], ["tiny", 2]]
    assert by_title["per_stage"]["columns"] == ["", "in", "out"]
    assert by_title["per_stage"]["rows"] == [["dedupe", 4, 3], ["filter", 3, None]]
    assert by_title["items"]["rows"] == [["a", 1], ["b", None]]


def test_trait_plot_csv_relative_to_holdout(tmp_path):
    report.write_trait_plot(metrics(), tmp_path / "plots/traits.csv", tmp_path / "traits.png")
    with open(tmp_path / "plots/traits.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * len(traits.NAMES)
    first = {r["set"]: r for r in rows if r["trait"] == traits.NAMES[0]}
    assert float(first["holdout"]["relative_to_holdout"]) == 1.0
    assert float(first["base"]["relative_to_holdout"]) == pytest.approx(0.5)
    assert float(first["lora"]["relative_to_holdout"]) == pytest.approx(1.75)
    assert float(first["holdout"]["distance_to_holdout"]) == 0.0
    assert float(first["lora"]["distance_to_holdout"]) == pytest.approx(1.5)
    second = {r["set"]: r for r in rows if r["trait"] == traits.NAMES[1]}
    assert second["lora"]["relative_to_holdout"] == ""
    assert Image.open(tmp_path / "traits.png").format == "PNG"


def test_loss_plot(tmp_path):
    tsv = tmp_path / "loss.tsv"
    assert not report.write_loss_plot(tsv, tmp_path / "loss.png")
    tsv.write_text("step\tloss\tlr\n1\t0.9\t1e-4\n2\t0.7\t1e-4\n3\t0.6\t1e-4\n")
    assert report.write_loss_plot(tsv, tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").size[0] > 300
    tsv.write_text("epoch\tvalue\n1\t2\n")
    assert not report.write_loss_plot(tsv, tmp_path / "other.png")


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="needs Debian chromium + chromium-driver")
def test_report_in_headless_chromium(tmp_path):
    """The page loads in a real browser and every image on it decodes."""
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    root = project(tmp_path, True)
    out = report.write_report(Path("reports/report.html"), metrics(), [], INDEX, params.Params(), root=root)
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(out.as_uri())
        broken = driver.execute_script(
            "return [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)")
        assert broken == []
        assert driver.execute_script("return document.images.length") == 6  # + 3 curation figures
        if os.environ.get("FLUXIMP_SCREENSHOT_REPORT"):
            driver.save_screenshot(os.environ["FLUXIMP_SCREENSHOT_REPORT"])
    finally:
        driver.quit()


def test_report_params_table_holds_no_secret(tmp_path):
    root = project(tmp_path, False)
    p = params.Params(filter={"aesthetic": {"head": "https://al:PLANTED-pw-42@h.example/head.pt?token=PLANTED-t-43"}})
    page = report.write_report(Path("reports/report.html"), metrics(), [], INDEX, p, root=root).read_text()
    assert "PLANTED" not in page and "https://***@h.example/head.pt?token=***" in page
