"""The reload canary: clips with their expected text and language that a reload's new model
must transcribe (within SENSEVOICE_RELOAD_CANARY_MAX_CER) before traffic moves to it.

Torch-free at import: the supervisor and the protocol use its types; only ``run_canary`` needs
a loaded model (passed in).

Format: ``<SENSEVOICE_RELOAD_CANARY_DIR>/canary.jsonl``, one JSON object per line:
``{"audio": "en_00.flac", "text": "close the window", "language": "en"}`` plus optional
``"use_itn": true`` (the expected text is then the ITN form). Audio paths are relative to the
directory and must stay inside it (symbolic links included); blank lines are skipped. Clips are
files soundfile reads (WAV, FLAC, OGG, MP3).

Scoring: each clip is transcribed as the service would with language "auto" (so language ID is
tested) and the clip's use_itn. Both texts are normalised (NFKC, case folded, whitespace runs as
one space; with use_itn false, punctuation removed: the spoken form has none, with use_itn true
it is part of what is checked). The CER is the character edit distance over the expected
characters, summed over all clips; it must be at most the maximum, and every clip with a
language must be tagged that language.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from sensevoice_core.vocab import LANGUAGE_TAGS, Language, languages_of

if TYPE_CHECKING:
    from sensevoice_core.pipeline import SenseVoice
    from sensevoice_core.settings import Settings

CANARY_FILE = "canary.jsonl"
FIELDS = {"audio": "a string (the clip's file name)", "text": "a string (what the clip says)",
          "language": "a language code", "use_itn": "true or false"}
LANGUAGES = tuple(tag for tag in LANGUAGE_TAGS if tag != Language.NOSPEECH.value)
MAX_TEXT_CHARS = 1000  # a canary clip is an utterance; bounds the edit distance's cost
MAX_CLIP_S = 30.0  # a canary clip is an utterance; hours of audio would hold up every reload
# The canary runs on one thread after the load and the warm-up, inside the reload's timeout.
# Measured: the full-size model, float32, one Zen 3 core: 3.4 s for the 15.5 s of the demo
# canary (0.22 s per audio second). A canary expected to take over half the timeout is
# warned about at start (the load and the warm-up need the rest).
CANARY_S_PER_AUDIO_S = 0.25
SHOWN_CLIPS = 3  # worst clips a failed canary's summary shows
SHOWN_TEXT_CHARS = 60


class CanaryError(ValueError):
    """The canary directory or one of its entries is unusable (not a verdict on a model)."""


class CanaryClip(BaseModel):
    model_config = ConfigDict(frozen=True)
    audio: str  # the file name, relative to the canary directory
    expected: str
    got: str
    cer: float  # this clip's character error rate
    expected_language: str | None = None
    language: str | None = None  # what the model tagged
    ok: bool  # its language matched (when one is expected); its text is judged in the total
    use_itn: bool = False


class CanaryReport(BaseModel):
    model_config = ConfigDict(frozen=True)
    canary_dir: str
    passed: bool
    cer: float  # character errors over all clips / expected characters over all clips
    max_cer: float
    seconds: float
    clips: list[CanaryClip]

    def verdict(self) -> str:
        """"canary passed (8 clips, CER 0.000)": for the [HOTRELOAD] line and the UI."""
        return (f"canary {'passed' if self.passed else 'failed'} ({len(self.clips)} clips, "
                f"CER {self.cer:.3f})")

    def summary(self) -> str:
        """One line for logs and the reload outcome: the verdict and the worst clips' diffs."""
        wrong = sum(not clip.ok for clip in self.clips)
        line = (f"canary {'passed' if self.passed else 'failed'} ({len(self.clips)} clips from "
                f"{self.canary_dir}, CER {self.cer:.3f} {'<=' if self.cer <= self.max_cer else '>'}"
                f" max {self.max_cer:g}" + (f", {wrong} tagged the wrong language" if wrong else "")
                + f", {self.seconds:.2f} s)")
        bad = sorted((clip for clip in self.clips if clip.cer > 0 or not clip.ok),
                     key=lambda clip: (clip.ok, -clip.cer))
        diffs = [describe_clip(clip) for clip in bad[:SHOWN_CLIPS]]
        if len(bad) > SHOWN_CLIPS:
            diffs.append(f"{len(bad) - SHOWN_CLIPS} more clip(s) with errors")
        return line + (": " + "; ".join(diffs) if diffs else "")


def describe_clip(clip: CanaryClip) -> str:
    wrong = f"language expected {clip.expected_language} got {clip.language or 'none'}"
    parts = [] if clip.ok else [wrong]
    if clip.cer > 0:
        parts.append(f"expected {shorten(clip.expected)} got {shorten(clip.got)} "
                     f"(CER {clip.cer:.2f}{', ITN' if clip.use_itn else ''})")
    else:
        parts.append(f"text right ({shorten(clip.got)})")
    return f"{clip.audio}: {', '.join(parts)}"


def shorten(text: str) -> str:
    return json.dumps(text if len(text) <= SHOWN_TEXT_CHARS else
                      text[:SHOWN_TEXT_CHARS - 1] + "…", ensure_ascii=False)


@dataclass(frozen=True)
class CanaryEntry:
    """One line of canary.jsonl, checked."""

    audio: str  # as written
    path: Path  # resolved, inside the canary directory
    text: str
    language: str | None
    use_itn: bool


def read_canary(canary_dir: Path | str) -> list[CanaryEntry]:
    """Read and check canary.jsonl; CanaryError names the file, line, field, expected and found."""
    root = canary_root(canary_dir)
    source = root / CANARY_FILE
    try:
        lines = source.read_text(encoding="utf-8-sig").splitlines()  # a BOM is no error
    except FileNotFoundError:
        raise CanaryError(f"{source} is missing: write one JSON object per clip, e.g. "
                          '{"audio": "clip.flac", "text": "hello world", "language": "en"}') \
            from None
    except (OSError, UnicodeDecodeError) as e:
        raise CanaryError(f"{source} is unreadable: {e}") from None
    entries = [entry_of(root, f"{source} line {number}", line)
               for number, line in enumerate(lines, 1) if line.strip()]
    if not entries:
        raise CanaryError(f"{source} has no clips (expected one JSON object per line)")
    return entries


def canary_root(canary_dir: Path | str) -> Path:
    root = Path(canary_dir).expanduser()
    if not root.is_dir():
        raise CanaryError(f"the canary directory {root} "
                          f"{'is not a directory' if root.exists() else 'does not exist'}")
    return root.resolve()


def entry_of(root: Path, where: str, line: str) -> CanaryEntry:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise CanaryError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(item, dict):
        raise CanaryError(f"{where}: expected a JSON object, found {type(item).__name__}")
    for key in item:
        if key not in FIELDS:
            raise CanaryError(f"{where}: unknown field {key!r} (expected "
                              f"{', '.join(FIELDS)})")
    for key, value in item.items():
        kind = bool if key == "use_itn" else str
        if not isinstance(value, kind) and not (key == "language" and value is None):
            raise CanaryError(f"{where}: field {key!r} must be {FIELDS[key]}, found "
                              f"{json.dumps(value, ensure_ascii=False)[:80]}")
    for key in ("audio", "text"):
        if not item.get(key):
            raise CanaryError(f"{where}: field {key!r} is missing or empty")
    audio, text, language = item["audio"], item["text"], item.get("language")
    if language is not None and language not in LANGUAGES:
        raise CanaryError(f"{where}: field 'language' must be one of {', '.join(LANGUAGES)}, "
                          f"found {language!r}")
    use_itn = item.get("use_itn", False)
    if not normalise(text, use_itn):
        raise CanaryError(f"{where}: field 'text' {text!r} is empty once normalised")
    if len(text) > MAX_TEXT_CHARS:
        raise CanaryError(f"{where}: field 'text' is {len(text)} characters; a canary clip "
                          f"holds at most {MAX_TEXT_CHARS}")
    return CanaryEntry(audio, audio_path(root, where, audio), text, language, use_itn)


def audio_path(root: Path, where: str, audio: str) -> Path:
    if any(ch < " " for ch in audio) or Path(audio).is_absolute():  # control chars, NUL
        raise CanaryError(f"{where}: field 'audio' must be a path relative to {root}, found "
                          f"{audio[:200]!r}")
    path = (root / audio).resolve()
    if not path.is_relative_to(root):
        raise CanaryError(f"{where}: audio {audio!r} is outside the canary directory {root} "
                          f"(it resolves to {path})")
    if not path.is_file():
        raise CanaryError(f"{where}: audio file {path} "
                          f"{'is not a file' if path.exists() else 'is missing'}")
    return path


@dataclass(frozen=True)
class CanaryCheck:
    """What a canary directory holds, checked at start (check_canary_dir)."""

    root: Path
    clips: int
    seconds: float  # of audio, all clips
    languages: tuple[str, ...]

    def size(self) -> str:
        return f"{self.clips} clip{'s' if self.clips != 1 else ''}, {self.seconds:.1f} s of audio"

    def line(self) -> str:
        return (f"{self.clips} clips ({self.seconds:.1f} s of audio"
                + (f"; {', '.join(self.languages)}" if self.languages else "")
                + f") from {self.root}")

    def timeout_warning(self, timeout_s: float) -> str | None:
        """A line when the canary alone may take over half of SENSEVOICE_HOTRELOAD_TIMEOUT."""
        expected_s = self.seconds * CANARY_S_PER_AUDIO_S
        if expected_s <= timeout_s / 2:
            return None
        return (f"the reload canary ({self.size()}) may take ~{expected_s:.0f} s on one CPU "
                f"thread (~{CANARY_S_PER_AUDIO_S:g} s per audio second for a full-size model), "
                f"over half of SENSEVOICE_HOTRELOAD_TIMEOUT={timeout_s:g} s, which also covers "
                f"the load and the warm-up: reloads may time out. Fix: fewer or shorter clips "
                f"in {self.root}, or a longer SENSEVOICE_HOTRELOAD_TIMEOUT")


def check_canary_dir(canary_dir: Path | str, languages: Sequence[str] = ()) -> CanaryCheck:
    """For the supervisor at start: read canary.jsonl and every clip's header (soundfile, no
    torch), so a misconfigured canary fails now, not at the first reload. languages: the
    service's whitelist (SENSEVOICE_LANGUAGES), which must allow every expected language.
    CanaryError names the first problem."""
    entries = read_canary(canary_dir)
    allowed = {language.value for language in languages_of(languages)}
    seconds = 0.0
    for entry in entries:
        if allowed and entry.language is not None and entry.language not in allowed:
            raise CanaryError(f"{entry.path} (in {CANARY_FILE}) is expected as "
                              f"{entry.language!r}, which SENSEVOICE_LANGUAGES "
                              f"({', '.join(sorted(allowed))}) rules out: every reload would "
                              f"fail its canary")
        seconds += clip_seconds(entry)
    return CanaryCheck(canary_root(canary_dir), len(entries), seconds,
                       tuple(sorted({entry.language for entry in entries if entry.language})))


def clip_seconds(entry: CanaryEntry) -> float:
    """The clip's length from its header; CanaryError when it is not audio or over MAX_CLIP_S."""
    import soundfile

    try:
        seconds = soundfile.info(str(entry.path)).duration
    except (soundfile.LibsndfileError, RuntimeError, OSError) as e:
        raise CanaryError(f"{entry.path} (in {CANARY_FILE}): not audio soundfile can read: "
                          f"{e}") from None
    if seconds > MAX_CLIP_S:
        raise CanaryError(f"{entry.path} (in {CANARY_FILE}) is {seconds:.1f} s long; a canary "
                          f"clip is an utterance of at most {MAX_CLIP_S:g} s (split it)")
    return seconds


def normalise(text: str, use_itn: bool) -> str:
    """What is compared (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    if not use_itn:
        text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return " ".join(text.split())


def edit_distance(expected: str, got: str) -> int:
    """Levenshtein distance in characters (substitutions, deletions, insertions)."""
    previous = list(range(len(got) + 1))
    for i, want in enumerate(expected, 1):
        current = [i]
        for j, have in enumerate(got, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (want != have)))
        previous = current
    return previous[-1]


def character_error_rate(pairs: list[tuple[str, str]]) -> float:
    """Edit distance summed over (expected, got) pairs, over the expected characters."""
    characters = sum(len(expected) for expected, _ in pairs)
    return sum(edit_distance(expected, got) for expected, got in pairs) / max(1, characters)


def run_canary(model: SenseVoice, canary_dir: Path | str, max_cer: float, *,
               settings: Settings | None = None) -> CanaryReport:
    """Transcribe every canary clip as the service would (its TranscribeOptions from settings,
    None: SENSEVOICE_* from the environment) and judge the model. CanaryError when the canary
    itself is unusable (a clip that no longer decodes), so that it is not blamed on the model."""
    from sensevoice_core.errors import AudioError
    from sensevoice_core.settings import Settings

    settings = settings or Settings()
    entries = read_canary(canary_dir)
    start = time.perf_counter()
    clips, pairs = [], []
    for entry in entries:
        clip_seconds(entry)  # replaced since the start by a long one: not run, not blamed
        try:
            result = model.transcribe(str(entry.path),
                                      settings.transcribe_options("auto", entry.use_itn),
                                      source_name=entry.audio)
        except AudioError as e:
            raise CanaryError(f"canary clip {entry.path}: {e.problem}") from None
        pair = (normalise(entry.text, entry.use_itn), normalise(result.text, entry.use_itn))
        pairs.append(pair)
        clips.append(CanaryClip(
            audio=entry.audio, expected=entry.text, got=result.text,
            cer=round(character_error_rate([pair]), 4), expected_language=entry.language,
            language=result.language, use_itn=entry.use_itn,
            ok=entry.language is None or result.language == entry.language))
    cer = character_error_rate(pairs)
    return CanaryReport(canary_dir=str(canary_root(canary_dir)),
                        passed=cer <= max_cer and all(clip.ok for clip in clips), cer=cer,
                        max_cer=max_cer, seconds=round(time.perf_counter() - start, 3),
                        clips=clips)
