"""The page at ``/`` in a real headless Chromium (Debian's, driven by Playwright for Python): upload an image,
see its score, verdict and overlay, explain it, mark it good and see the model id change; a screenshot is saved
(``PATCHCORE_SCREENSHOT=path`` keeps it, as for the README's)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import patchcore
from synthetic import _save, texture

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"
)


@pytest.fixture
def server(tmp_path):
    from patchcore.serve.app import create_app
    from patchcore.serve.service import Service

    rng = np.random.default_rng(11)
    for i in range(6):
        _save(texture(rng, size=96), tmp_path / "data" / "good" / f"{i}.png")
    _save(texture(rng, size=96, defect=True), tmp_path / "scratch.png")
    settings = {"resize": 96, "crop": None, "coreset_ratio": 0.25, "threshold_fpr": 0.2, "calibration_share": 0.35}
    model = patchcore.PatchCore(**settings).fit(
        sorted((tmp_path / "data" / "good").glob("*.png")), root=tmp_path / "data"
    )
    model.save(tmp_path / "model.safetensors")
    service = Service(tmp_path / "model.safetensors", data_roots=[tmp_path / "data"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning")
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", tmp_path
    web.should_exit = True
    thread.join(timeout=30)
    service.close()


def test_the_page_scores_explains_and_takes_feedback(server, tmp_path):
    url, folder = server
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 820})
            page.goto(url + "/")
            sync_api.expect(page.locator("#model-backbone")).to_have_text("efficientnet_lite0")
            first_id = page.locator("#model-id").inner_text()
            page.set_input_files("#files", str(folder / "scratch.png"))
            card = page.locator("#results button").first
            sync_api.expect(card).to_contain_text("ANOMALOUS", timeout=30_000)
            sync_api.expect(card).to_contain_text("score")
            assert page.locator("#results img").first.get_attribute("alt") == "Uploaded image scratch.png"
            sync_api.expect(page.locator("#count-scored")).to_have_text("1")
            sync_api.expect(page.locator("#count-flagged")).to_have_text("1")
            card.focus()
            page.keyboard.press("Enter")  # keyboard operable: the card opens the large view
            overlay = page.locator("#detail-overlay")
            sync_api.expect(overlay).to_be_visible()
            assert overlay.get_attribute("src").startswith("data:image/png;base64,")
            assert page.evaluate("document.getElementById('detail-overlay').naturalWidth") == 96
            page.locator("#opacity").fill("40")
            assert page.evaluate("document.getElementById('detail-overlay').style.opacity") == "0.4"
            page.click("#explain")
            sync_api.expect(page.locator("#explanation")).to_be_visible(timeout=30_000)
            sync_api.expect(page.locator("#explain-nearest-caption")).to_contain_text("good/")
            page.click("#mark-good")
            sync_api.expect(page.locator("#feedback-status")).to_contain_text("model updated", timeout=60_000)
            assert page.locator("#model-id").inner_text() != first_id
            sync_api.expect(page.locator("#model-updates")).to_have_text("1")
            shot = Path(os.environ.get("PATCHCORE_SCREENSHOT") or tmp_path / "page.png")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            if shot != tmp_path / "page.png":
                shutil.copy(tmp_path / "page.png", shot)
            assert (tmp_path / "page.png").stat().st_size > 10_000
        finally:
            browser.close()
