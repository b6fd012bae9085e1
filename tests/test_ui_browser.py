"""End to end in a real browser: Debian's Chromium driven by Playwright (never `playwright
install`), against `python -m ui` and a real supervisor serving a copy of the demo model."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import soundfile

from model_factory import copy_demo_model, nudge_weights
from sensevoice_core.result import Segment, Word
from service import start_service
from ui.views import LOW_CONFIDENCE, words_html
from ui_process import start_ui

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
EXAMPLES = Path(__file__).resolve().parent.parent / "ui" / "examples"
HELD_OUT = Path(__file__).resolve().parent / "data" / "demo_heldout"

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


def slowed(clip: Path, factor: float, target: Path) -> Path:
    """clip played at 1/factor speed (every sample repeated or skipped: deterministic)."""
    samples, rate = soundfile.read(clip, dtype="float32")
    soundfile.write(target, samples[np.arange(0, len(samples) - 1, factor).astype(int)], rate)
    return target


WORD_TITLE = re.compile(r"\d+\.\d\d–\d+\.\d\d s · p=[01]\.\d\d")


def test_the_word_panel_times_words_and_marks_the_unsure_ones(stack, browser, tmp_path):
    _, ui, _ = stack
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(ui.url, wait_until="networkidle")
    # "play some music" (a held-out flite voice) at 0.8x speed: the demo model hears "play
    # some music six" and is unsure of the "six" it adds (p = 0.35 when this was written),
    # sure of the rest (p >= 0.95).
    clip = slowed(HELD_OUT / "en_21.flac", 0.8, tmp_path / "slow_music.wav")
    page.locator("#audio-input input[type=file]").set_input_files(str(clip))
    assert page.locator("#word-timestamps input").is_checked()  # on by default
    page.locator("#transcribe-btn").click()
    words = page.locator("#words .sv-word")
    words.first.wait_for(timeout=30_000)
    texts = words.all_inner_texts()
    transcript = page.locator("#transcript textarea").input_value()
    assert " ".join(texts) == transcript, (texts, transcript)
    titles = [words.nth(i).get_attribute("title") for i in range(words.count())]
    assert all(WORD_TITLE.fullmatch(title) for title in titles), titles
    probabilities = [float(title.rsplit("=", 1)[1]) for title in titles]
    low = page.locator("#words .sv-word.sv-low")
    assert low.count() == sum(p < LOW_CONFIDENCE for p in probabilities) >= 1, titles
    assert low.count() < len(texts), titles  # and the sure words are not marked

    def look(locator) -> dict:
        return locator.evaluate("e => { const s = getComputedStyle(e); return "
                                "{decoration: s.textDecorationStyle, "
                                "background: s.backgroundColor}; }")

    sure = page.locator("#words .sv-word:not(.sv-low)").first
    assert look(low.first) == {"decoration": "wavy", "background": "rgba(245, 158, 11, 0.25)"}
    assert look(sure)["decoration"] != "wavy" and look(sure)["background"] == "rgba(0, 0, 0, 0)"

    # Off: no words are shown (once the answer is in: each has a new subtitle file).
    download = page.locator("#srt-download a").first
    download.wait_for(timeout=10_000)
    first_srt = download.get_attribute("href")
    page.locator("#word-timestamps input").uncheck()
    page.locator("#transcribe-btn").click()
    page.wait_for_function("h => { const a = document.querySelector('#srt-download a'); "
                           "return a && a.getAttribute('href') !== h; }", arg=first_srt,
                           timeout=30_000)
    assert page.locator("#words .sv-word").count() == 0
    # Hand-made words, as the page renders them: escaped, and only the unsure one marked
    # (written over the panel's own nodes: last).
    made = Segment(start=0.0, end=1.0, text="<b>bold</b> x", raw="", language="en",
                   emotion=None, event=None,
                   words=(Word(word="<b>bold</b>", start=0.0, end=0.5, probability=0.9),
                          Word(word="x", start=0.5, end=1.0, probability=0.1)))
    page.locator("#words").evaluate("(e, html) => { e.innerHTML = html; }", words_html([made]))
    assert page.locator("#words b").count() == 0
    assert page.locator("#words .sv-word").all_inner_texts() == ["<b>bold</b>", "x"]
    assert page.locator("#words .sv-low").all_inner_texts() == ["x"]

    page.close()


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
    assert page.locator("#words .sv-word").count() >= 1
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
