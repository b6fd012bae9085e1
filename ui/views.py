"""What the page shows: tag badges and timed words for a transcription (and its progress while
it runs), and the model status panel."""

from __future__ import annotations

import re
from collections.abc import Sequence
from html import escape

from sensevoice_core.protocol import (
    CACHE_LEVEL_WORDS,
    ReloadOutcome,
    ServiceStatus,
    TranscribeReply,
)
from sensevoice_core.result import Segment, Word
from sensevoice_core.vocab import (
    EMOTION_EMOJI,
    EVENT_EMOJI,
    LANGUAGE_BY_TAG,
    LANGUAGE_CHOICES,
    UNSPACED_LANGUAGES,
    Language,
)

# A word the model gives less probability than this is marked on the page (class sv-low): at
# one half the model was as likely to have heard something else there.
LOW_CONFIDENCE = 0.5
MAX_SHOWN_WORDS = 3000  # in the word panel (about 20 minutes of speech)
# What the language whitelist offers: (label, code), every language but auto.
WHITELIST_CHOICES = [(f"{LANGUAGE_BY_TAG[code].label} ({code})", code)
                     for code in LANGUAGE_CHOICES if code != Language.AUTO.value]


def badge(kind: str, label: str) -> str:
    return f'<span class="sv-badge sv-{kind}" data-{kind}="{escape(label)}">{escape(label)}</span>'


def tags_html(reply: TranscribeReply, show_worker: bool) -> str:
    """Language, emotion and event as readable badges, plus where and how fast it ran (the
    worker's pid only for callers who may see internals)."""
    badges = [] if reply.segments else [badge("nospeech", "🔇 No speech found")]
    if reply.language:
        language = LANGUAGE_BY_TAG.get(reply.language)
        badges.append(badge("language", f"🌐 {language.label if language else reply.language}"))
    if reply.emotion:
        emoji = EMOTION_EMOJI.get(reply.emotion, "😐")
        badges.append(badge("emotion", f"{emoji} {reply.emotion.capitalize()}"))
    if reply.event:
        emoji = EVENT_EMOJI.get(reply.event, "🗣️")
        badges.append(badge("event", f"{emoji} {reply.event.replace('_', ' ')}"))
    detail = (f"{reply.duration_s:.1f} s of audio in {reply.inference_s * 1000:.0f} ms · "
              f"model {short_fingerprint(reply.fingerprint)}"
              + (f" · worker pid {reply.worker_pid}" if show_worker else ""))
    return (f'<div class="sv-tags">{" ".join(badges)}</div>'
            f'<div class="sv-detail">{escape(detail)}</div>')


def progress_html(done: int, total: int, seconds: float) -> str:
    """While a transcription runs: the segments decoded of all the VAD found, and the audio
    time they reach."""
    if total == 0:
        return f'<div class="sv-tags">{badge("nospeech", "🔇 No speech found")}</div>'
    label = f"⏳ {done} of {total} segment{'' if total == 1 else 's'}"
    if done:
        label += f" · {seconds:.1f} s of audio"
    return f'<div class="sv-tags">{badge("progress", label)}</div>'


def word_span(word: Word) -> str:
    low = word.probability < LOW_CONFIDENCE
    title = f"{word.start:.2f}–{word.end:.2f} s · p={word.probability:.2f}"
    return (f'<span class="sv-word{" sv-low" if low else ""}" title="{title}" '
            f'data-start="{word.start:.3f}" data-end="{word.end:.3f}" '
            f'data-probability="{word.probability:.3f}">{escape(word.word)}</span>')


def words_html(segments: Sequence[Segment]) -> str:
    """Every word, its time and probability on hover, the unsure ones marked; "" when there
    are none (word timestamps off, or no speech). At most MAX_SHOWN_WORDS: hours of speech
    would make a page too heavy to scroll."""
    lines, shown, total = [], 0, sum(len(segment.words) for segment in segments)
    for segment in segments:
        if segment.words and shown < MAX_SHOWN_WORDS:
            words = segment.words[:MAX_SHOWN_WORDS - shown]
            shown += len(words)
            # Mandarin, Cantonese and Japanese are written without spaces between words.
            gap = "" if segment.language in UNSPACED_LANGUAGES else " "
            lines.append(f'<p class="sv-line">{gap.join(map(word_span, words))}</p>')
    if not lines:
        return ""
    legend = (f"Hover over a word for its time and probability; a marked word is one the model "
              f"gave less than p={LOW_CONFIDENCE:g}.")
    if total > shown:
        legend += (f" The first {shown} of {total} words are shown; the JSON below and the "
                   f"subtitles have them all.")
    return (f'<div class="sv-words">{"".join(lines)}</div>'
            f'<div class="sv-detail">{escape(legend)}</div>')


def word_rows(segments: Sequence[Segment]) -> list[dict[str, object]]:
    """The words as data, for the page's JSON panel and gradio_client callers."""
    return [word.model_dump() for segment in segments for word in segment.words]


def code(text: str) -> str:
    """A Markdown code span that shows text literally, whatever backticks it holds."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if "`" in text else f"`{text}`"


def plain(text: str | None) -> str:
    """Text from outside (error messages, paths) made inert in Markdown: no tags, no markup."""
    return re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", escape(text or "", quote=False))


SEGMENT_COLUMNS = ("start", "end", "text", "language", "emotion", "event")


def segment_rows(segments: Sequence[Segment]) -> list[list[object]]:
    """The segment table: one row per segment, times in seconds."""
    return [[f"{s.start:.2f}", f"{s.end:.2f}", s.text, s.language or "", s.emotion or "",
             s.event or ""] for s in segments]


def short_fingerprint(fingerprint: str | None) -> str:
    return fingerprint[:12] if fingerprint else "none"


def describe_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def via(cache_level: str | None) -> str:
    return CACHE_LEVEL_WORDS.get(cache_level or "", str(cache_level))


def reload_summary(outcome: ReloadOutcome, full: bool = True) -> str:
    if outcome.canary is not None and outcome.canary.passed:  # a failed one is in outcome.error
        without = reload_summary(outcome.model_copy(update={"canary": None}), full)
        return f"{without} · {outcome.canary.verdict()}"
    if outcome.ok and outcome.cache_level == "L1":
        return (f"✅ Model unchanged (`{short_fingerprint(outcome.new_fingerprint)}`): kept "
                f"serving, no new worker, answered in {outcome.seconds * 1000:.1f} ms via "
                f"{via(outcome.cache_level)} ({outcome.origin})")
    if outcome.ok and outcome.old_fingerprint == outcome.new_fingerprint:
        return (f"✅ Model reloaded, unchanged (`{short_fingerprint(outcome.new_fingerprint)}`) in "
                f"{outcome.seconds:.2f} s via {via(outcome.cache_level)} ({outcome.origin})")
    if outcome.ok:
        return (f"✅ Model updated, new requests use it: `{short_fingerprint(outcome.old_fingerprint)}`"
                f" → `{short_fingerprint(outcome.new_fingerprint)}` in {outcome.seconds:.2f} s via "
                f"{via(outcome.cache_level)} ({outcome.origin})")
    why = plain(outcome.error) if full else "the admin token shows why"
    return (f"❌ Reload failed ({outcome.origin}): {why}. The old model "
            f"`{short_fingerprint(outcome.old_fingerprint)}` is still serving.")


def status_markdown(status: ServiceStatus | None, problem: str | None = None,
                    note: str | None = None, full: bool = True) -> str:
    """The model-status panel; `note` goes first (a reload in progress or its result).

    full=False leaves out what only the operator may see: the model's path, worker pids and
    why a reload failed.
    """
    lines = [note] if note else []
    if status is None:
        lines.append(f"⚠️ Service unavailable: {plain(problem)}")
        return "\n\n".join(lines)
    model = status.model
    if model is None:
        lines.append("⏳ No model is serving yet (the first worker is loading).")
    else:
        ids = " · ".join(f"{key} `{value}`" for key, value in model.short_ids.items())
        fingerprint = f"**Fingerprint** `{short_fingerprint(model.fingerprint)}` ({ids})"
        lines.append(f"**Model** {code(model.model_dir)}  \n{fingerprint}" if full else fingerprint)
        lines.append(f"**Loaded** via {via(model.cache_level)} in {model.load_s:.2f} s, "
                     f"warm-up {model.warmup_s:.2f} s  \n**Compute type** `{model.compute_type}`"
                     + (f" ({plain(model.compute_reason)})" if model.compute_reason else ""))
    workers = "; ".join(f"{f'pid {w.pid} ' if full else ''}{w.role}, up {describe_age(w.age_s)}, "
                        f"{w.requests_served} served" for w in status.workers)
    lines.append(f"**Workers** {workers or 'none'}  \n**Requests served** {status.requests_served}"
                 f" · in flight {status.in_flight} · queued {status.queued} · worker restarts "
                 f"{status.worker_restarts}")
    if status.reloading:
        lines.append("⏳ A reload is in progress; the current model keeps serving until the new "
                     "one passes its health check.")
    if status.last_reload is not None and note is None:
        lines.append(f"**Last reload** {reload_summary(status.last_reload, full)}")
    return "\n\n".join(lines)


def public_status(status: ServiceStatus) -> dict:
    """The status for a caller who may not see internals: what serves and how it is doing,
    without paths, pids, checksums or error sentences (a whitelist: new fields stay hidden)."""
    model = status.model
    last = status.last_reload
    return {
        "model": None if model is None else {
            "fingerprint": model.fingerprint, "short_ids": model.short_ids,
            "cache_level": model.cache_level, "load_s": model.load_s,
            "warmup_s": model.warmup_s, "compute_type": model.compute_type},
        "workers": [{"role": w.role, "age_s": w.age_s, "requests_served": w.requests_served}
                    for w in status.workers],
        "queued": status.queued, "in_flight": status.in_flight,
        "requests_served": status.requests_served, "worker_restarts": status.worker_restarts,
        "reloading": status.reloading, "reload_counts": status.reload_counts,
        "reload_levels": status.reload_levels,
        "last_reload": None if last is None else {
            "ok": last.ok, "origin": last.origin, "old_fingerprint": last.old_fingerprint,
            "new_fingerprint": last.new_fingerprint, "seconds": last.seconds,
            "cache_level": last.cache_level},
    }
