"""The Transcribe tab's handler: a generator whose outputs fill in as the service decodes.

The service is asked for progress (Gateway.transcribe's on_progress): once its VAD has found
the segments, the progress bar shows the segments decoded of their total, and the transcript,
the segment table and the words grow as each batch of segments finishes (segments finish in
time order). The last output is the whole result, as the `/transcribe` API returns it.

The call to the service runs on a thread of its own and hands its steps over a queue; the
generator holds a place at the front door for as long as that call runs. A page that leaves
(a cancel, a closed tab) ends the generator: the next step then raises ClientGone, which ends
the call (the worker still finishes the file; the service has no cancel).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from html import escape

import gradio as gr
import soundfile

from sensevoice_core.protocol import Progress, TranscribeReply
from sensevoice_core.result import Segment, join_text
from ui.downloads import SubtitleFiles
from ui.gateway import ClientGone, Gateway, RequestFailed
from ui.uploads import uploaded_file
from ui.views import progress_html, segment_rows, tags_html, word_rows, words_html

# transcript, tags, segment rows, subtitle file, words HTML, words as data
TranscribeOutputs = tuple[str, str, list[list[object]], str | None, str,
                          list[dict[str, object]]]
Step = Progress | TranscribeReply | RequestFailed | BaseException


def user_error(message: str) -> gr.Error:
    """A message for the page (shown as HTML, so escaped); expected, so no traceback logged."""
    return gr.Error(escape(message), print_exception=False)


def audio_seconds(path: str) -> float | None:
    try:
        return soundfile.info(path).duration
    except Exception:  # libsndfile cannot tell; the worker will say what is wrong
        return None


def transcribe_steps(gateway: Gateway, subtitles: SubtitleFiles, audio_path: str | None,
                     language: str, use_itn: bool, vad_threshold: float,
                     word_timestamps: bool, languages: list[str] | None,
                     progress: gr.Progress) -> Iterator[TranscribeOutputs]:
    """The outputs so far after each batch of decoded segments, then the whole result."""
    if not audio_path:
        raise user_error("Upload or record some audio first.")
    path = uploaded_file(audio_path)
    try:
        audio = path.read_bytes()
    except OSError as e:
        raise user_error(f"Cannot read the uploaded file {path.name}: {e.strerror}.") from None
    seconds = audio_seconds(str(path))
    progress(0.0, desc=f"Transcribing {seconds:.1f} s of audio…" if seconds else
             "Transcribing…")
    steps: queue.Queue[Step] = queue.Queue()
    gone = threading.Event()

    def on_progress(step: Progress) -> None:
        if gone.is_set():
            raise ClientGone()
        steps.put(step)

    def call_service() -> None:
        try:
            with gateway.door.hold():
                steps.put(gateway.transcribe(audio, path.name, language, use_itn, "ui",
                                             vad_threshold, bool(word_timestamps), languages,
                                             on_progress))
        except ClientGone:
            pass
        except BaseException as e:  # noqa: BLE001 - the handler raises it on its own thread
            steps.put(e)

    threading.Thread(target=call_service, name="page-transcribe", daemon=True).start()
    segments: list[Segment] = []
    try:
        while True:
            step = steps.get()
            while isinstance(step, Progress) and not steps.empty():
                segments += [step.segment] if step.segment is not None else []
                step = steps.get()  # a batch finishes at once: one update for all of it
            if isinstance(step, Progress):
                segments += [step.segment] if step.segment is not None else []
                yield (join_text(segments),
                       progress_html(step.done, step.total, segments[-1].end if segments else 0),
                       segment_rows(segments), None, words_html(segments), word_rows(segments))
                if step.total:  # after the outputs: the bar stays up while the next step runs
                    progress((step.done, step.total), desc="Transcribing", unit="segments")
            elif isinstance(step, TranscribeReply):
                yield final_outputs(gateway, subtitles, step, path.stem)
                return
            elif isinstance(step, RequestFailed):
                raise user_error(step.message)
            else:
                raise step
    finally:
        gone.set()


def final_outputs(gateway: Gateway, subtitles: SubtitleFiles, reply: TranscribeReply,
                  stem: str) -> TranscribeOutputs:
    # Cues are cut at words when there are words (SENSEVOICE_SUBTITLE_* limits).
    srt = subtitles.write(reply.segments, stem, gateway.settings.subtitle_options()
                          ) if reply.segments else None
    return (reply.text, tags_html(reply, gateway.settings.ui_is_loopback()),
            segment_rows(reply.segments), srt, words_html(reply.segments),
            word_rows(reply.segments))
