"""What the page shows: tag badges for a transcription, and the model status panel."""

from __future__ import annotations

import re
from html import escape

from sensevoice_core.protocol import ReloadOutcome, ServiceStatus, TranscribeReply
from sensevoice_core.vocab import EMOTION_EMOJI, EVENT_EMOJI

LANGUAGE_LABELS = {"zh": "Mandarin", "en": "English", "yue": "Cantonese", "ja": "Japanese",
                   "ko": "Korean", "nospeech": "no speech"}
CACHE_LEVEL_LABELS = {"L1": "L1 (already in memory)", "L2": "L2 snapshot",
                      "fresh": "model files (fresh load)"}
VIA = {"L1": "L1", "L2": "L2", "fresh": "a fresh load"}


def badge(kind: str, label: str) -> str:
    return f'<span class="sv-badge sv-{kind}" data-{kind}="{escape(label)}">{escape(label)}</span>'


def tags_html(reply: TranscribeReply) -> str:
    """Language, emotion and event as readable badges, plus where and how fast it ran."""
    badges = []
    if reply.language:
        badges.append(badge("language", f"🌐 {LANGUAGE_LABELS.get(reply.language, reply.language)}"))
    if reply.emotion:
        emoji = EMOTION_EMOJI.get(reply.emotion, "😐")
        badges.append(badge("emotion", f"{emoji} {reply.emotion.capitalize()}"))
    if reply.event:
        emoji = EVENT_EMOJI.get(reply.event, "🗣️")
        badges.append(badge("event", f"{emoji} {reply.event.replace('_', ' ')}"))
    detail = (f"{reply.duration_s:.1f} s of audio in {reply.inference_s * 1000:.0f} ms · "
              f"model {short_fingerprint(reply.fingerprint)} · worker pid {reply.worker_pid}")
    return (f'<div class="sv-tags">{" ".join(badges)}</div>'
            f'<div class="sv-detail">{escape(detail)}</div>')


def code(text: str) -> str:
    """A Markdown code span that shows text literally, whatever backticks it holds."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if "`" in text else f"`{text}`"


def plain(text: str | None) -> str:
    """Text from outside (error messages, paths) made inert in Markdown: no tags, no markup."""
    return re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", escape(text or "", quote=False))


SEGMENT_COLUMNS = ("start", "end", "text", "language", "emotion", "event")


def segment_rows(reply: TranscribeReply) -> list[list[object]]:
    """The segment table: one row per segment, times in seconds."""
    return [[f"{s.start:.2f}", f"{s.end:.2f}", s.text, s.language or "", s.emotion or "",
             s.event or ""] for s in reply.segments]


def short_fingerprint(fingerprint: str | None) -> str:
    return fingerprint[:12] if fingerprint else "none"


def describe_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def reload_summary(outcome: ReloadOutcome) -> str:
    if outcome.ok and outcome.old_fingerprint == outcome.new_fingerprint:
        return (f"✅ Model reloaded, unchanged (`{short_fingerprint(outcome.new_fingerprint)}`) in "
                f"{outcome.seconds:.2f} s via {VIA.get(outcome.cache_level or '', outcome.cache_level)} "
                f"({outcome.origin})")
    if outcome.ok:
        return (f"✅ Model updated, new requests use it: `{short_fingerprint(outcome.old_fingerprint)}`"
                f" → `{short_fingerprint(outcome.new_fingerprint)}` in {outcome.seconds:.2f} s via "
                f"{VIA.get(outcome.cache_level or '', outcome.cache_level)} ({outcome.origin})")
    return (f"❌ Reload failed ({outcome.origin}): {plain(outcome.error)}. The old model "
            f"`{short_fingerprint(outcome.old_fingerprint)}` is still serving.")


def status_markdown(status: ServiceStatus | None, problem: str | None = None,
                    note: str | None = None) -> str:
    """The model-status panel; `note` goes first (a reload in progress or its result)."""
    lines = [note] if note else []
    if status is None:
        lines.append(f"⚠️ Service unavailable: {plain(problem)}")
        return "\n\n".join(lines)
    model = status.model
    if model is None:
        lines.append("⏳ No model is serving yet (the first worker is loading).")
    else:
        ids = " · ".join(f"{key} `{value}`" for key, value in model.short_ids.items())
        lines.append(f"**Model** {code(model.model_dir)}  \n**Fingerprint** `{short_fingerprint(model.fingerprint)}` ({ids})")
        lines.append(f"**Loaded from** {CACHE_LEVEL_LABELS.get(model.cache_level, model.cache_level)}"
                     f" in {model.load_s:.2f} s, warm-up {model.warmup_s:.2f} s")
    workers = "; ".join(f"pid {w.pid} {w.role}, up {describe_age(w.age_s)}, "
                        f"{w.requests_served} served" for w in status.workers)
    lines.append(f"**Workers** {workers or 'none'}  \n**Requests served** {status.requests_served}"
                 f" · in flight {status.in_flight} · queued {status.queued} · worker restarts "
                 f"{status.worker_restarts}")
    if status.reloading:
        lines.append("⏳ A reload is in progress; the current model keeps serving until the new "
                     "one passes its health check.")
    if status.last_reload is not None and note is None:
        lines.append(f"**Last reload** {reload_summary(status.last_reload)}")
    return "\n\n".join(lines)
