"""The Gradio app on the tiny random Flux + a real tiny LoRA: served on 127.0.0.1, called through
gradio_client (images come back; scale 0 = base; the LoRA changes the image), then driven in a
real headless Chromium (generate once, screenshot).

The screenshot goes to the test's temp dir; set FLUXIMP_APP_SCREENSHOT=reports/app.png to refresh
the one the README shows."""
import importlib.util
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import pubkit
from tests.servers import free_port

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a bowl of pears on a table"


def load_app():
    spec = importlib.util.spec_from_file_location("fluximp_app", ROOT / "app" / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    lora_dir = tmp_path_factory.mktemp("app") / "lora"
    pubkit.make_adapter(lora_dir)
    app = load_app()
    gen = app.Generator("tiny-random", str(lora_dir), device="cpu")
    demo = app.build_demo(gen)
    port = free_port()
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", gen, app
    demo.close()


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.slow  # ~15 s alone (imports + tiny pipeline + LoRA), longer on busy cores
def test_client_gets_lora_and_base_images(server):
    from gradio_client import Client

    url, gen, _ = server
    client = Client(url, verbose=False)
    lora, base, note = client.predict(PROMPT, 3, 2, 3.5, 1.0, True, True, 64, api_name="/generate")
    assert Image.open(lora).size == (64, 64) and Image.open(base).size == (64, 64)
    assert f"{PROMPT}, {gen.trigger}" in note
    assert np.abs(pixels(lora) - pixels(base)).mean() > 1.0, "the LoRA should change the image"
    # LoRA scale 0 without comparison: the base image again, same seed -> same pixels
    zero, none, _ = client.predict(PROMPT, 3, 2, 3.5, 0.0, True, False, 64, api_name="/generate")
    assert none is None
    assert np.abs(pixels(zero) - pixels(base)).max() <= 1
    # no trigger toggle: the prompt is sent as typed
    _, _, note = client.predict(PROMPT, 3, 2, 3.5, 0.5, False, False, 64, api_name="/generate")
    assert f"`{PROMPT}`" in note and gen.trigger not in note


def test_with_trigger_does_not_repeat_it():
    app = load_app()
    assert app.with_trigger("a pond.", "impressionism style") == "a pond, impressionism style"
    assert app.with_trigger("a pond in impressionism style", "impressionism style") == "a pond in impressionism style"


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("Debian packages chromium + chromium-driver not installed (see .ci/run)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--window-size=1400,900",
                 f"--user-data-dir={Path(os.environ.get('TMPDIR', '/tmp')) / f'chromium-app-{os.getpid()}'}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.mark.slow
def test_chromium_generates_and_screenshots(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, _ = server
    browser = chromium()
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
        box.clear()
        box.send_keys("a city boulevard in the rain")
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        done = lambda b: [i for i in b.find_elements(By.CSS_SELECTOR, "#lora-image img, #base-image img")
                          if b.execute_script("return arguments[0].naturalWidth", i) > 0]
        imgs = wait.until(lambda b: len(done(b)) == 2 and done(b))
        assert all(browser.execute_script("return arguments[0].naturalWidth", i) == 64 for i in imgs)
        info = browser.find_element(By.CSS_SELECTOR, "#info").text
        assert "a city boulevard in the rain, impressionism style" in info
        time.sleep(0.5)  # let the fade-in finish before the screenshot
        shot = Path(os.environ.get("FLUXIMP_APP_SCREENSHOT") or tmp_path / "app.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(shot))
        assert Image.open(shot).size[0] >= 1000
    finally:
        browser.quit()
