"""End to end in a real browser: Debian's Chromium driven by Playwright (never `playwright
install`), against `python -m ui` and a real supervisor serving a copy of the demo model."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import pytest

from model_factory import copy_demo_model, nudge_weights
from service import start_service
from ui_process import start_ui

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
EXAMPLES = Path(__file__).resolve().parent.parent / "ui" / "examples"

if not CHROMIUM.exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing; scripts/setup.sh installs it with apt-get")
    pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    demo_dir = copy_demo_model(tmp_path_factory.mktemp("models") / "demo")
    service = start_service(tmp_path_factory.mktemp("service"), demo_dir)
    ui = start_ui(tmp_path_factory.mktemp("ui"), service.address)
    yield service, ui, demo_dir
    ui.stop()
    service.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS,
                                             headless=True)
        yield browser
        browser.close()


def test_upload_transcribe_and_reload_in_the_browser(stack, browser):
    service, ui, demo_dir = stack
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    off_host: list[str] = []
    page.on("request", lambda request: off_host.append(request.url)
            if urlparse(request.url).hostname not in (None, "127.0.0.1") else None)
    page.goto(ui.url, wait_until="networkidle")
    status = page.locator("#model-status")
    old = service.status().model.fingerprint
    status.get_by_text(old[:12]).first.wait_for(timeout=20_000)

    page.locator("#audio-input input[type=file]").set_input_files(str(EXAMPLES / "zh_04.flac"))
    page.locator("#language").get_by_label("zh", exact=True).check()
    page.locator("#transcribe-btn").click()
    page.wait_for_function("document.querySelector('#transcript textarea').value !== ''",
                           timeout=30_000)
    assert page.locator("#transcript textarea").input_value() == "8975。"
    tags = page.locator("#tags")
    assert tags.locator("[data-language]").inner_text().endswith("Mandarin")
    assert tags.locator("[data-emotion]").count() == 1
    assert tags.locator("[data-event]").count() == 1
    page.wait_for_function("document.querySelector('#segments').innerText.includes('8975。')",
                           timeout=10_000)
    download = page.locator("#srt-download a").first
    download.wait_for(timeout=10_000)
    assert download.get_attribute("href").endswith(".srt")

    nudge_weights(demo_dir)
    page.locator("#reload-btn").click()
    status.get_by_text("Model updated, new requests use it").wait_for(timeout=30_000)
    new = service.status().model.fingerprint
    assert new != old
    assert f"{old[:12]} → {new[:12]}" in status.inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-after-reload.png"), full_page=True)

    # The page keeps working on the new model.
    page.locator("#transcribe-btn").click()
    page.locator("#tags").get_by_text(new[:12]).wait_for(timeout=30_000)
    assert off_host == [], f"the page reached off this machine: {off_host}"
    page.close()


def test_errors_show_as_messages_in_the_page(stack, browser):
    _, ui, _ = stack
    page = browser.new_page()
    page.goto(ui.url, wait_until="networkidle")
    page.locator("#transcribe-btn").click()
    page.get_by_text("Upload or record some audio first.").first.wait_for(timeout=20_000)
    page.close()
