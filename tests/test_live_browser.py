"""The Live tab in a real browser: Debian's Chromium (driven by Playwright) with a fake
microphone that plays a demo clip, against `python -m ui` and a real supervisor."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile
from model_factory import copy_demo_model
from service import REPO, start_service
from test_ui_browser import CHROMIUM, CHROMIUM_FLAGS, EXAMPLES
from ui_process import start_ui

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    demo_dir = copy_demo_model(tmp_path_factory.mktemp("models") / "demo")
    service = start_service(tmp_path_factory.mktemp("service"), demo_dir)
    ui = start_ui(tmp_path_factory.mktemp("ui"), service.address)
    yield service, ui
    ui.stop()
    service.stop()


def microphone_clip(target: Path) -> Path:
    """zh_04 ("8975。") between 0.5 s and 2 s of silence, as Chromium's fake microphone wants
    it: 16-bit WAV. The fake device plays it in a loop."""
    clip, rate = soundfile.read(EXAMPLES / "zh_04.flac", dtype="float32")
    audio = np.concatenate([np.zeros(rate // 2, np.float32), clip, np.zeros(2 * rate, np.float32)])
    soundfile.write(target, audio, rate, subtype="PCM_16")
    return target


# Firefox's refusal, in Chromium: a microphone may not feed a context of another rate than
# the browser's own, so the page must capture at that rate and resample itself.
LIKE_FIREFOX = """(() => {
    const Native = window.AudioContext;
    window.AudioContext = class extends Native {
        createMediaStreamSource(stream) {
            const probe = new Native();
            const own = probe.sampleRate;
            probe.close();
            if (this.sampleRate !== own) {
                throw new DOMException("Connecting AudioNodes from AudioContexts with "
                    + "different sample-rate is currently not supported.", "NotSupportedError");
            }
            return super.createMediaStreamSource(stream);
        }
    };
})();"""
RATE = 24000


@pytest.mark.parametrize("like_firefox", [False, True], ids=["chromium", "like-firefox"])
def test_the_live_tab_transcribes_the_microphone(stack, tmp_path, like_firefox):
    from playwright.sync_api import sync_playwright

    _, ui = stack
    clip = microphone_clip(tmp_path / "mic.wav")
    flags = [*CHROMIUM_FLAGS, "--use-fake-ui-for-media-stream",
             "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={clip}",
             "--autoplay-policy=no-user-gesture-required"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=flags,
                                             headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            if like_firefox:
                page.add_init_script(LIKE_FIREFOX)
            page.goto(ui.url, wait_until="networkidle")
            page.get_by_role("tab", name="Live").click()
            toggle = page.locator("#live-toggle")
            toggle.wait_for(timeout=10_000)
            # Every text the partial line shows, from before the first audio.
            page.evaluate("""() => { window.partials = [];
                new MutationObserver(() => {
                    const text = document.querySelector('#live-partial').textContent;
                    if (text) window.partials.push(text);
                }).observe(document.querySelector('#live-partial'),
                           {childList: true, characterData: true, subtree: true}); }""")
            toggle.click()
            final = page.locator("#live-finals .sv-live-final").first
            final.wait_for(timeout=60_000)
            assert page.locator("#live-state").inner_text() == "Listening…"
            rate = int(page.locator("[data-capture-rate]").get_attribute("data-capture-rate"))
            assert (rate != RATE) if like_firefox else (rate == RATE)
            text = final.locator(".sv-live-text").inner_text()
            assert re.fullmatch(r"\d+。", text), text  # the demo model's digits
            times = final.locator(".sv-live-time").inner_text()
            start, end = (float(t) for t in re.fullmatch(r"(\d+\.\d\d)–(\d+\.\d\d) s",
                                                          times).groups())
            assert 0.0 <= start < end <= start + 5.0
            assert final.locator("[data-language]").get_attribute("data-language") == "zh"
            assert final.locator("[data-language]").inner_text().endswith("Mandarin")
            assert final.locator("[data-emotion]").count() == 1
            assert final.locator("[data-event]").count() == 1
            assert page.evaluate("window.partials").count("…") >= 1  # speech_started showed
            latency_ms = int(final.get_attribute("data-latency-ms"))
            print(f"end of the turn's audio to its final line: {latency_ms} ms")
            assert 0 < latency_ms < 10_000
            toggle.click()  # Stop: the open turn is finished, then a normal close
            page.wait_for_function("document.querySelector('#live-state').textContent "
                                   "=== 'Stopped.'", timeout=30_000)
            assert toggle.inner_text() == "Start"
        finally:
            browser.close()


def page_resampler() -> str:
    """live.js's resampler and what it needs, to run on its own."""
    source = (REPO / "ui" / "live.js").read_text()
    return f"const RATE = {RATE};\n" + \
        source[source.index("function toInt16("):source.index("const WORKLET")]


def test_the_pages_resampler_keeps_time_across_blocks_and_filters_what_would_alias():
    """10 s of a 440 Hz tone plus a 15 kHz one (above 24 kHz audio's 12 kHz), in the 128-sample
    blocks an AudioWorklet gets: exactly 10 s comes out, the 440 Hz tone where it was, the
    15 kHz one gone."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS,
                                             headless=True)
        try:
            page = browser.new_page()
            results = page.evaluate(page_resampler() + """
                [44100, 48000, 16000, 24000].map((from) => {
                    const resampler = new Resampler(from), n = from * 10, out = [];
                    for (let i = 0; i < n; i += 128) {
                        const block = new Float32Array(Math.min(128, n - i));
                        for (let k = 0; k < block.length; k++) {
                            const t = (i + k) / from;
                            block[k] = 0.5 * Math.sin(2 * Math.PI * 440 * t)
                                + (from > RATE ? 0.3 * Math.sin(2 * Math.PI * 15000 * t) : 0);
                        }
                        out.push(...resampler.push(block));
                    }
                    return {from, out};
                });""")
        finally:
            browser.close()
    for result in results:
        from_rate, out = result["from"], np.array(result["out"], np.float64) / 32767
        assert abs(len(out) - RATE * 10) <= 1, (from_rate, len(out))
        delay = 15 / from_rate if from_rate > RATE else 0.0  # the low-pass's half length
        t = np.arange(len(out)) / RATE - delay
        error = out[1000:] - 0.5 * np.sin(2 * np.pi * 440 * t[1000:])
        assert np.sqrt(np.mean(error ** 2)) < 0.002, from_rate
