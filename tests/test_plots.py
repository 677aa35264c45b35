"""`dvc plots show/diff` pages render offline: the HTML template (.dvc/config -> plots/offline.html)
inlines vega, vega-lite and vega-embed, so nothing is fetched from a CDN; the filter scores chart is
one small histogram per score (.dvc/plots/histograms.json)."""
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.tinydvc import env

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    """`dvc plots show` of the committed plot files, as a user runs it from the repo."""
    out = tmp_path_factory.mktemp("plots") / "out"
    proc = subprocess.run(["dvc", "plots", "show", "-o", str(out)], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out / "index.html"


def specs(html: str) -> list[dict]:
    return [json.loads(s) for s in re.findall(r"var spec = (\{.*?\});\s*vegaEmbed", html, re.S)]


def test_the_page_loads_nothing_from_the_network(page):
    html = page.read_text()
    assert not re.search(r"<script[^>]+src=", html), "a script is loaded from outside the page"
    for lib in ("vega@5.20.2", "vega-lite@5.2.0", "vega-embed@6.18.2"):
        assert f"<!-- {lib}" in html
    declared = [next(iter(p)) for s in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
                for p in s.get("plots", [])]
    assert len(specs(html)) == len([p for p in declared if (REPO / p).exists()]) >= 4


def test_filter_scores_are_one_histogram_per_score(page):
    scores = next(s for s in specs(page.read_text()) if s.get("facet"))
    assert scores["facet"]["row"]["field"] == "score"
    assert scores["resolve"]["scale"] == {"x": "independent", "y": "independent"}
    assert scores["spec"]["encoding"]["y"]["field"] == "count"
    assert {r["score"] for r in scores["data"]["values"]} == {
        ln.split(",")[0] for ln in (REPO / "reports/filter/scores.csv").read_text().splitlines()[1:]}


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian chromium + chromium-driver")
def test_every_plot_renders_in_a_browser_without_network(page, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        driver.get(page.as_uri())
        n = len(specs(page.read_text()))
        drawn = 0
        for _ in range(100):
            drawn = driver.execute_script(
                "return document.querySelectorAll('.vega-embed canvas, .vega-embed svg.marks').length")
            if drawn >= n:
                break
            time.sleep(0.1)
        assert drawn == n, f"{drawn} of {n} plots drawn"

        # the filter-score histograms draw their bars: one rect mark with a width per row of the data
        scores = next(s for s in specs(page.read_text()) if s.get("facet"))
        driver.set_script_timeout(30)
        widths = driver.execute_async_script(BAR_WIDTHS, scores)
        assert isinstance(widths, list), widths
        assert len(widths) == len(scores["data"]["values"]) and min(widths) > 0, widths
        # `dvc plots diff` of two revisions: grouped bars (xOffset by rev), each drawn
        two = {**scores, "data": {"values": scores["data"]["values"] + [
            {**r, "rev": "exp-r32"} for r in scores["data"]["values"]]}}
        widths = driver.execute_async_script(BAR_WIDTHS, two)
        assert len(widths) == 2 * len(scores["data"]["values"]) and min(widths) > 0, widths
    finally:
        driver.quit()


# Renders ``spec`` with the page's vega-embed into a fresh div and returns the width of every rect mark
# in vega's scenegraph (bars; a bar that is not drawn has width 0 or none).
BAR_WIDTHS = """
const spec = arguments[0], done = arguments[arguments.length - 1];
const div = document.createElement('div');
document.body.appendChild(div);
vegaEmbed(div, spec, {renderer: 'svg', actions: false}).then(result => {
  const widths = [];
  const walk = node => {
    if (!node) return;
    if (node.marktype === 'rect') for (const item of node.items || []) widths.push(item.width || 0);
    for (const child of node.items || []) if (child.items) walk(child);
  };
  walk(result.view.scenegraph().root);
  done(widths);
}).catch(err => done('vega error: ' + err));
"""
