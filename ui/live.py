"""The page's Live tab: the microphone transcribed as you speak.

The browser itself talks to /v1/realtime (``ui.realtime``, OpenAI's Realtime transcription
session) from ``live.js``: audio goes out every 100 ms as 24 kHz PCM and events come back as
they happen, with no Gradio queue round trip per chunk (a streaming ``gr.Audio`` sends a chunk
every ``stream_every`` through the queue and its answers through another event). The partial
line shows the open turn's current hypothesis; each final line its times, text and tags. A
final line's ``data-latency-ms`` is the time from the capture of the turn's last audio to the
line appearing (it includes the silence the VAD waits for to end a turn).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from sensevoice_core.vocab import (
    EMOTION_EMOJI,
    EVENT_EMOJI,
    LANGUAGE_BY_TAG,
    LANGUAGE_CHOICES,
)

LIVE_JS = (Path(__file__).resolve().parent / "live.js").read_text()
LIVE_CSS = """
.sv-live-controls { display: flex; gap: .75rem; align-items: center; margin-bottom: .5rem; }
.sv-live-state[data-kind="error"] { color: #dc2626; }
.sv-live-partial { min-height: 1.6rem; font-style: italic; color: var(--body-text-color-subdued); }
.sv-live-final { display: flex; gap: .5rem; align-items: baseline; flex-wrap: wrap;
                 padding: .25rem 0; border-bottom: 1px solid var(--border-color-primary); }
.sv-live-time { font-variant-numeric: tabular-nums; color: var(--body-text-color-subdued); }
"""


def tag_labels() -> dict[str, dict[str, str]]:
    """What a final line shows for each tag the model emits."""
    return {
        "language": {tag: f"🌐 {language.label}" for tag, language in LANGUAGE_BY_TAG.items()},
        "emotion": {tag: f"{emoji} {tag.capitalize()}" for tag, emoji in EMOTION_EMOJI.items()},
        "event": {tag: f"{emoji} {tag.replace('_', ' ')}" for tag, emoji in EVENT_EMOJI.items()},
    }


def live_markup() -> str:
    options = "".join(f'<option value="{code}">{code}</option>' for code in LANGUAGE_CHOICES)
    return (
        '<div class="sv-live">'
        '<div class="sv-live-controls">'
        '<button class="lg primary" data-live="toggle" id="live-toggle">Start</button>'
        f'<label>Language <select data-live="language" id="live-language">{options}</select>'
        '</label>'
        '<span class="sv-live-state" data-live="state" id="live-state">'
        'Press Start and allow the microphone.</span>'
        '</div>'
        '<div class="sv-live-partial" data-live="partial" id="live-partial"></div>'
        '<div class="sv-live-finals" data-live="finals" id="live-finals"></div>'
        '</div>')


def build_live_tab() -> gr.HTML:
    """The Live tab's content (call inside a gr.Tab)."""
    gr.Markdown("Speak: the open turn's text updates as you talk, and each finished turn "
                "appears below with its times and tags. Clients can do the same through "
                "`/v1/realtime?intent=transcription` (OpenAI's Realtime API).")
    return gr.HTML(html_template=live_markup(), css_template=LIVE_CSS, js_on_load=LIVE_JS,
                   labels=tag_labels(), elem_id="live", apply_default_css=True)
