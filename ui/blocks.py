"""The Gradio page: upload or record, transcribe, read the tags, reload the model; the Live
tab (ui.live) transcribes the microphone as you speak.

Handlers are plain functions over the ``Gateway``; every failure reaches the user as a
``gr.Error`` sentence, never a stack trace. API names are pinned: transcribe, reload, status.
"""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr

from sensevoice_core.vocab import LANGUAGE_CHOICES
from ui.downloads import KEEP_S, SubtitleFiles
from ui.gateway import Gateway, RequestFailed
from ui.gradio_guard import TRANSCRIBE_API, TRANSCRIBE_GROUP
from ui.live import build_live_tab
from ui.transcribe_tab import TranscribeOutputs, transcribe_steps, user_error
from ui.uploads import EXAMPLES_DIR
from ui.views import (
    SEGMENT_COLUMNS,
    WHITELIST_CHOICES,
    public_status,
    reload_summary,
    short_fingerprint,
    status_markdown,
)

STATUS_REFRESH_S = 5.0
TRANSCRIBE_THREADS = 32  # of Gradio's 40 worker threads; the rest stay free for status and reload
CSS = """
.sv-tags { display: flex; gap: .5rem; flex-wrap: wrap; margin: .25rem 0; }
.sv-badge { border-radius: 999px; padding: .2rem .75rem; font-weight: 600;
            background: var(--background-fill-secondary); border: 1px solid var(--border-color-primary); }
.sv-detail { color: var(--body-text-color-subdued); font-size: .85rem; margin-top: .25rem; }
.sv-words .sv-line { margin: 0 0 .4rem 0; line-height: 1.9; }
.sv-word { border-radius: .25rem; padding: 0 .1rem; cursor: help; }
.sv-word:hover { background: var(--background-fill-secondary); }
.sv-word.sv-low { background: rgba(245, 158, 11, .25); text-decoration: underline wavy #d97706; }
"""


def example_rows() -> list[list[object]]:
    return [[str(path), "auto", True] for path in sorted(EXAMPLES_DIR.glob("*.flac"))]


class PageHandlers:
    def __init__(self, gateway: Gateway, subtitles: SubtitleFiles):
        self.gateway = gateway
        self.subtitles = subtitles

    def transcribe(self, audio_path: str | None, language: str, use_itn: bool,
                   vad_threshold: float, word_timestamps: bool = True,
                   languages: list[str] | None = None, progress: gr.Progress = gr.Progress()
                   ) -> Iterator[TranscribeOutputs]:
        """The outputs as segments finish, then the whole result (ui.transcribe_tab).
        languages: what auto-detection may choose; none ticked: any (None, from an API
        caller who leaves it out: the service's SENSEVOICE_LANGUAGES)."""
        yield from transcribe_steps(self.gateway, self.subtitles, audio_path, language, use_itn,
                                    vad_threshold, word_timestamps, languages, progress)

    def status(self, admin_token: str | None = None) -> tuple[str, dict]:
        internals = self.gateway.shows_internals(admin_token)
        try:
            status = self.gateway.status(internals)
        except RequestFailed as e:
            return status_markdown(None, e.message), {}
        details = status.model_dump(mode="json") if internals else public_status(status)
        return status_markdown(status, full=internals), details

    def reload(self, admin_token: str | None) -> Iterator[tuple[str, dict]]:
        try:
            self.gateway.check_admin(admin_token)
            before = self.gateway.status(internals=True)
        except RequestFailed as e:
            raise user_error(e.message) from None
        serving = short_fingerprint(before.model.fingerprint if before.model else None)
        yield (status_markdown(before, note=f"⏳ Reloading… requests are still served by "
                                            f"`{serving}` until the new model is ready."),
               before.model_dump(mode="json"))
        try:
            outcome = self.gateway.reload(admin_token)
        except RequestFailed as e:
            raise user_error(f"Reload failed: {e}. The old model is still serving.") from None
        try:
            after = self.gateway.status(internals=True)
        except RequestFailed as e:
            yield status_markdown(None, e.message, note=reload_summary(outcome)), {}
            return
        yield (status_markdown(after, note=reload_summary(outcome)),
               after.model_dump(mode="json"))


def build_blocks(gateway: Gateway, subtitles: SubtitleFiles) -> gr.Blocks:
    handlers = PageHandlers(gateway, subtitles)
    needs_token = gateway.settings.reload_needs_token()
    with gr.Blocks(title="SenseVoice Serve", delete_cache=(3600, KEEP_S)) as page:
        gr.Markdown("## SenseVoice Serve\nSpeech recognition with language, emotion and "
                    "audio-event tags. Upload or record audio, then Transcribe; or speak in "
                    "the Live tab.")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Transcribe", id="transcribe", elem_id="tab-transcribe"):
                with gr.Row():
                    with gr.Column():
                        audio = gr.Audio(sources=["upload", "microphone"], type="filepath",
                                         label="Audio", elem_id="audio-input")
                        language = gr.Radio(list(LANGUAGE_CHOICES), value="auto",
                                            label="Language", elem_id="language")
                        languages = gr.CheckboxGroup(
                            WHITELIST_CHOICES, value=list(gateway.settings.languages),
                            label="Auto-detect only among (none ticked: any language)",
                            elem_id="languages")
                        itn = gr.Checkbox(value=True, label="Punctuation and numerals (ITN)",
                                          elem_id="itn")
                        word_timestamps = gr.Checkbox(
                            value=True,
                            label="Word timestamps (timed words; subtitle cues cut at words)",
                            elem_id="word-timestamps")
                        with gr.Accordion("Long audio", open=False):
                            vad_threshold = gr.Slider(
                                0.05, 0.95, value=gateway.settings.vad_threshold, step=0.05,
                                label="Speech threshold (higher: less counts as speech)",
                                elem_id="vad-threshold")
                        transcribe_button = gr.Button("Transcribe", variant="primary",
                                                      elem_id="transcribe-btn")
                    with gr.Column():
                        transcript = gr.Textbox(label="Transcript", lines=6, interactive=False,
                                                elem_id="transcript")
                        tags = gr.HTML(elem_id="tags")
                        with gr.Accordion("Words", open=True):
                            words = gr.HTML(elem_id="words")
                            with gr.Accordion("Words as JSON", open=False):
                                word_data = gr.JSON(elem_id="word-data")
                        with gr.Accordion("Segments", open=True):
                            segments = gr.Dataframe(headers=list(SEGMENT_COLUMNS),
                                                    interactive=False, wrap=True,
                                                    elem_id="segments")
                            subtitle_file = gr.File(label="Subtitles (SRT)", interactive=False,
                                                    elem_id="srt-download")
                examples = example_rows()
                if examples:
                    gr.Examples(examples, inputs=[audio, language, itn],
                                label="Examples (demo clips)")
            with gr.Tab("Live", id="live", elem_id="tab-live"):
                build_live_tab()
        with gr.Group():
            model_status = gr.Markdown("Loading status…", elem_id="model-status")
            with gr.Row():
                admin_token = gr.Textbox(label="Admin token", type="password",
                                         visible=needs_token, elem_id="admin-token", scale=3)
                reload_button = gr.Button("Reload model", elem_id="reload-btn", scale=1)
            with gr.Accordion("Status details", open=False):
                details = gr.JSON(elem_id="status-details")

        transcribe_button.click(handlers.transcribe,
                                [audio, language, itn, vad_threshold, word_timestamps, languages],
                                [transcript, tags, segments, subtitle_file, words, word_data],
                                api_name=TRANSCRIBE_API, concurrency_id=TRANSCRIBE_GROUP,
                                concurrency_limit=min(gateway.door.capacity, TRANSCRIBE_THREADS))
        reload_button.click(handlers.reload, [admin_token], [model_status, details],
                            api_name="reload", concurrency_limit=1)
        # The token (when typed in) shows the operator's view: paths, pids, reload errors.
        page.load(handlers.status, [admin_token], [model_status, details], api_name="status",
                  concurrency_limit=None)
        gr.Timer(STATUS_REFRESH_S).tick(handlers.status, [admin_token], [model_status, details],
                                        api_visibility="private", show_progress="hidden",
                                        concurrency_limit=None)
    # Every call goes through the queue, where the front door counts it: no direct /run/ route.
    return page.queue(api_open=False)
