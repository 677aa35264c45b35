"""Blind A/B page: pairing, blinding, scoring, and a real headless Chromium clicking through it."""
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from stages import abtest
from stages.metrics import ab

BASE, LORA = (40, 40, 40), (250, 200, 60)


def fake_samples(folder: Path, prompts=("a harbour at dawn", "a bowl of pears"), seeds=(0, 1),
                 scales=(0.0, 0.5, 1.0)) -> Path:
    (folder / "images").mkdir(parents=True)
    images = []
    for p, prompt in enumerate(prompts):
        for s in seeds:
            for scale in scales:
                name = f"images/p{p:02d}-s{s}-l{scale:.2f}.png"
                colour = BASE if scale == 0 else LORA
                Image.new("RGB", (32, 32), colour).save(folder / name)
                images.append({"file": name, "prompt_index": p, "prompt": prompt, "seed": s,
                               "scale": scale})
    (folder / "index.json").write_text(json.dumps({"images": images}))
    return folder


def test_pairs_cover_every_prompt_and_seed_with_random_sides(tmp_path):
    index = json.loads((fake_samples(tmp_path / "s") / "index.json").read_text())
    pairs = ab.make_pairs(index, seed=3)
    assert len(pairs) == 4
    assert {(p["prompt"], p["seed"]) for p in pairs} == {(pr, s) for pr in ("a harbour at dawn",
                                                          "a bowl of pears") for s in (0, 1)}
    assert all(p["scale"] == 1.0 and "l0.00" in p["base"] and "l1.00" in p["lora"] for p in pairs)
    sides = {p["lora_side"] for seed in range(10) for p in ab.make_pairs(index, seed=seed)}
    assert sides == {"left", "right"}
    assert ab.make_pairs(index, 0.5, seed=3)[0]["scale"] == 0.5
    with pytest.raises(ValueError, match="no LoRA images"):
        ab.make_pairs({"images": [im for im in index["images"] if im["scale"] == 0]})


def test_page_is_blind_and_scoring_joins_the_key(tmp_path):
    samples = fake_samples(tmp_path / "s")
    key = ab.build_page(samples, tmp_path / "page", tmp_path / "key.json", seed=1)
    html = (tmp_path / "page" / "index.html").read_text()
    assert "lora" not in html.lower() and "base" not in html.lower()  # nothing gives the side away
    assert ab.QUESTIONS["style"] in html and ab.QUESTIONS["prompt"] in html
    assert sorted(p.name for p in (tmp_path / "page" / "img").iterdir()) == sorted(
        f"{p['id']}-{x}.jpg" for p in key["pairs"] for x in "ab")
    assert not (tmp_path / "page" / "key.json").exists()
    # a rater who always picks the LoRA for style and always the base for the prompt
    other = {"left": "right", "right": "left"}
    answers = {"page": key["page"], "answers": [
        {"pair": p["id"], "style": p["lora_side"], "prompt": other[p["lora_side"]]} for p in key["pairs"]]}
    second = {"page": key["page"], "answers": [{"pair": key["pairs"][0]["id"], "style": "same"}]}
    result = ab.score(key, [answers, second])
    assert result["raters"] == 2
    st, pr = result["questions"]["style"], result["questions"]["prompt"]
    assert (st["lora_wins"], st["n"], st["ties"], st["lora_win_rate"]) == (4, 4, 1, 1.0)
    assert (pr["lora_wins"], pr["base_wins"], pr["lora_win_rate"]) == (0, 4, 0.0)
    assert st["ci95_low"] == pytest.approx(0.5101, abs=1e-3) and st["ci95_high"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="page"):
        ab.score(key, [{"page": "other", "answers": []}])


def test_page_embeds_prompts_safely(tmp_path):
    """A prompt that looks like markup stays data: the page's script block is not closed early."""
    samples = fake_samples(tmp_path / "s", prompts=("a </script><b>bold</b> harbour & 'dawn'", "pears"))
    ab.build_page(samples, tmp_path / "page", tmp_path / "key.json", seed=1)
    page = (tmp_path / "page" / "index.html").read_text()
    assert page.count("</script>") == 1 and "<b>bold" not in page
    data = page.split("const DATA = ", 1)[1].split(";\n", 1)[0]
    prompts = {p["prompt"] for p in json.loads(data)["pairs"]}
    assert prompts == {"a </script><b>bold</b> harbour & 'dawn'", "pears"}


def test_wilson_interval_known_values():
    lo, hi = ab.wilson(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-3), pytest.approx(0.9433, abs=1e-3))
    lo, hi = ab.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert all(v != v for v in ab.wilson(0, 0))


def test_cli_build_and_score(tmp_path, monkeypatch):
    samples = fake_samples(tmp_path / "s")
    page, key_path, out = tmp_path / "page", tmp_path / "key.json", tmp_path / "human.json"
    assert abtest.main(["build", "--samples", str(samples), "--out", str(page), "--key", str(key_path)]) == 0
    key = json.loads(key_path.read_text())
    ans = tmp_path / "answers.json"
    ans.write_text(json.dumps({"page": key["page"], "answers": [
        {"pair": p["id"], "style": p["lora_side"]} for p in key["pairs"]]}))
    assert abtest.main(["score", str(ans), "--key", str(key_path), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["questions"]["style"]["lora_wins"] == 4
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert abtest.main(["score", str(bad), "--key", str(key_path), "--out", str(out)]) == 2
    assert abtest.main(["score", str(ans), "--key", str(tmp_path / "none.json")]) == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and DRIVER),
                    reason="needs Debian chromium + chromium-driver "
                           "(apt-get install -y chromium chromium-driver)")
def test_page_in_headless_chromium(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    samples = fake_samples(tmp_path / "s")
    key = ab.build_page(samples, tmp_path / "page", tmp_path / "key.json", seed=1)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"):
        opts.add_argument(flag)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        driver.get((tmp_path / "page" / "index.html").as_uri())
        assert "Pair 1 of 4" in driver.find_element(By.ID, "progress").text
        # images load (naturalWidth > 0) from the page folder
        assert driver.execute_script("return document.getElementById('left').naturalWidth") > 0
        # rater always picks the yellow (LoRA) image: read the pixel colour from the file name
        for n in range(3):
            pair = key["pairs"][n]
            driver.find_element(By.ID, f"style-{pair['lora_side']}").click()
            driver.find_element(By.ID, "prompt-same").click()
            assert f"Pair {n + 2} of 4" in driver.find_element(By.ID, "progress").text
        driver.find_element(By.ID, "style-left").click()  # 4th pair: style only, stays there
        driver.refresh()  # answers survive a reload (localStorage)
        assert "(4 answered)" in driver.find_element(By.ID, "progress").text
        driver.find_element(By.ID, "download").click()
        target = downloads / f"answers-{key['page']}.json"
        for _ in range(50):
            if target.exists():
                break
            time.sleep(0.1)
        shot = tmp_path / "abtest.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("FLUXIMP_SCREENSHOT"):
            shutil.copy(shot, os.environ["FLUXIMP_SCREENSHOT"])
    finally:
        driver.quit()
    answers = json.loads(target.read_text())
    assert answers["page"] == key["page"] and len(answers["answers"]) == 4
    result = ab.score(key, [answers])
    style = result["questions"]["style"]
    assert style["n"] == 4 and style["lora_wins"] >= 3
    assert result["questions"]["prompt"]["ties"] == 3
    assert shot.stat().st_size > 1000
