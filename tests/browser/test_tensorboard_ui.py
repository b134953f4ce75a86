"""`make test-browser` (not part of `make test`): a short DiT run's TensorBoard, opened in headless Chromium
(Debian's chromium and chromium-driver, through selenium), shows `train/loss` on its scalars and the DiT preview
GIF on its images. Screenshots of both go to docs/screenshots/ (VIDIFF_SCREENSHOTS), where the README shows them."""

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, free_port, latent_root, launch

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SHOTS = Path(os.environ.get("VIDIFF_SCREENSHOTS", REPO / "docs" / "screenshots"))


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """A 2-rank DiT run with previews, and `tensorboard --logdir` on it at 127.0.0.1."""
    root = latent_root(tmp_path_factory, "browser", samples=16, per_shard=8)
    launch(REPO / "configs/demo.yaml", [
        f"out_dir={root / 'run'}", f"data.shards={root / 'latents'}", "data.buckets=[[9,32,32]]",
        f"vae.checkpoint={root / 'vae'}", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
        "text.max_tokens=8", "train.steps=8", "train.log_every=1", "train.preview_every=4", "train.ema_decay=0.9",
        "parallel.micro_batch=2"], 2, root)
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("tensorboard")), "--logdir", str(root / "run"),
                               "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/data/runs", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "tensorboard did not start"
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")),
                              options=options)
    yield driver
    driver.quit()


def _text(element) -> str:
    """An element's visible text; TensorBoard breaks tag names into lines at each "/"."""
    return element.text.replace("\n", "")


def _filtered(browser, url: str, regex: str):
    """The time-series dashboard with its tag filter set to regex."""
    browser.get(f"{url}/#timeseries")
    box = WebDriverWait(browser, 60).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder='Filter tags (regex)']"))
    box.send_keys(regex)
    box.send_keys(Keys.ESCAPE)                      # close the tag suggestions


def test_the_scalars_show_train_loss(board, browser):
    _filtered(browser, board, "^train/loss$")
    card = WebDriverWait(browser, 60).until(
        lambda d: next((c for c in d.find_elements(By.CSS_SELECTOR, "scalar-card") if "train/loss" in _text(c)),
                       None))
    WebDriverWait(browser, 60).until(lambda d: "Step" in card.text)            # the chart and its value table
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SHOTS / "tensorboard_scalars.png"))
    assert (SHOTS / "tensorboard_scalars.png").stat().st_size > 20_000


def test_the_images_show_the_preview_gif(board, browser):
    _filtered(browser, board, "^preview/")
    card = WebDriverWait(browser, 60).until(
        lambda d: next((c for c in d.find_elements(By.CSS_SELECTOR, "image-card")
                        if "preview/samples" in _text(c)), None))
    image = WebDriverWait(browser, 60).until(
        lambda d: next((i for i in card.find_elements(By.TAG_NAME, "img")
                        if int(i.get_attribute("naturalWidth") or 0) > 0), None))
    assert int(image.get_attribute("naturalWidth")) == 32 * 3 and int(image.get_attribute("naturalHeight")) == 32
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SHOTS / "tensorboard_images.png"))
    assert (SHOTS / "tensorboard_images.png").stat().st_size > 20_000
