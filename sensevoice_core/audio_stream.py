"""Audio files and their bytes, decoded in blocks at their own rate: never the whole file.

soundfile (libsndfile: wav, flac, ogg, mp3) reads what it can, fast and in memory; FFmpeg, through
PyAV (``audio_ffmpeg``, imported on first use), reads the rest (webm/ogg Opus from browsers,
m4a/AAC from phones, mp4 videos, mpeg) from the same bytes, never through temp files. Each decoder also knows the length its header states,
and whether that is exact (sample counts) or an estimate (an MP3 without a Xing frame), so a
file that ends far before its stated length is an error, not a partial transcript.
"""

from __future__ import annotations

import io
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile

from sensevoice_core.errors import AudioError, AudioTooLongError

EXPECTED_FORMATS = "expected wav, flac, mp3, ogg, opus, webm, m4a, mp4 or mpeg"
# Sample rates accepted for files and arrays alike. Below 1 kHz no speech survives, and the
# resampling to 16 kHz would multiply the samples (16,000x at 1 Hz: a 1 GB tensor from 64 KB).
MIN_NATIVE_RATE = 1_000
MAX_NATIVE_RATE = 384_000
BLOCK_S = 30.0  # seconds decoded at a time
READ_CHUNK = 1 << 20  # samples x channels per soundfile read: bounds memory for many channels
HEAD_BYTES = 65536  # enough of a file to find its WAV data chunk
WAV_SIZE_PLACEHOLDER = 0x7FFF0000  # a WAV data size this large is a streaming writer's filler
MP3_HEAD_BYTES = 4096  # after any ID3 tag: enough to find the first MP3 frame
# A length the header states exactly still differs from what decodes by codec delay and padding
# (under 0.3 s even for 8 kHz MP3 or AAC); a bigger shortfall means the file was cut short.
TRUNCATION_SLACK_S = 0.3
TRUNCATION_SLACK_FRACTION = 0.01
ESTIMATE_MARGIN = 1.25  # an estimated length is refused before decoding only when this far over


def decoder_message(error: Exception, text: str | None = None) -> str:
    """A decoder's own explanation (text: its words, when not the error's str()), without the
    Python reprs some of them embed."""
    if text is None:
        text = error.error_string if isinstance(error, soundfile.LibsndfileError) else str(error)
    text = re.sub(r"<[^<>]*>", "the input", text).strip().rstrip(".")
    text = re.sub(r"^Error\s*:\s*", "", text)  # libsndfile's prefix
    return text or type(error).__name__


def check_rate(name: str, rate: float) -> None:
    """AudioError naming the input unless rate is within MIN_NATIVE_RATE..MAX_NATIVE_RATE."""
    if not MIN_NATIVE_RATE <= rate <= MAX_NATIVE_RATE:
        raise AudioError(name, f"invalid sample rate {rate} Hz; expected {MIN_NATIVE_RATE} to "
                               f"{MAX_NATIVE_RATE} Hz")


def to_float32(samples: np.ndarray, source: str) -> np.ndarray:
    """Integer or float samples scaled to [-1, 1] floats."""
    if samples.dtype == np.int16:
        return samples.astype(np.float32) / 32768.0
    if samples.dtype == np.int32:
        return samples.astype(np.float32) / 2147483648.0
    if samples.dtype == np.uint8:
        return (samples.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(samples.dtype, np.floating):
        return samples.astype(np.float32, copy=False)
    raise AudioError(source, f"unsupported sample type {samples.dtype}; expected float or "
                             f"int16/32")


@dataclass(frozen=True)
class DeclaredLength:
    seconds: float
    exact: bool  # stated by the header (sample counts); False: estimated from the bit rate


class Decoder(ABC):
    """One file's audio at its own rate, read by frame index as mono float32."""

    def __init__(self, name: str, rate: int, declared: DeclaredLength | None):
        check_rate(name, rate)
        self.name, self.rate, self.declared = name, rate, declared

    def read(self, first: int, count: int) -> np.ndarray:
        """Frames [first, first + count); fewer at the end of the audio, which must not come
        far before the length the header states exactly."""
        samples, end = self._read(first, count)
        if end is not None and self._cut_short(end):
            raise self.failure(end)
        return samples

    def _cut_short(self, end: int) -> bool:
        if self.declared is None or not self.declared.exact:
            return False
        stated = self.declared.seconds
        return stated - end / self.rate > TRUNCATION_SLACK_S + TRUNCATION_SLACK_FRACTION * stated

    def failure(self, at: int, reason: str = "") -> AudioError:
        """Decoding ended or failed at frame `at`: the error naming the file and the second."""
        if self._cut_short(at):
            assert self.declared is not None
            return AudioError(self.name, f"decoding stopped at {at / self.rate:.2f} s of the "
                                         f"{self.declared.seconds:.2f} s its header states: the "
                                         f"file is cut short or corrupt"
                                         + (f" ({reason})" if reason else ""))
        return AudioError(self.name, f"cannot decode audio at {at / self.rate:.1f} s: {reason}")

    def read_all(self, max_seconds: float | None) -> np.ndarray:
        """Everything, block by block; AudioTooLongError as soon as it passes max_seconds."""
        check_declared_length(self.name, self.declared, max_seconds)
        parts, total, block = [], 0, round(BLOCK_S * self.rate)
        while True:
            part = self.read(total, block)
            parts.append(part)
            total += part.shape[0]
            if max_seconds is not None and total / self.rate > max_seconds:
                raise AudioTooLongError(self.name, total / self.rate, max_seconds,
                                        at_least=part.shape[0] == block)
            if part.shape[0] < block:
                return np.concatenate(parts)

    @abstractmethod
    def _read(self, first: int, count: int) -> tuple[np.ndarray, int | None]:
        """The frames, and where the audio ends when this read reached its end (else None)."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_declared_length(name: str, declared: DeclaredLength | None,
                          max_seconds: float | None) -> None:
    """Refuse audio the header says is too long, before decoding it (estimates get a margin)."""
    if declared is None or max_seconds is None:
        return
    if declared.seconds > max_seconds * (1.0 if declared.exact else ESTIMATE_MARGIN):
        raise AudioTooLongError(name, declared.seconds, max_seconds)


class SoundfileDecoder(Decoder):
    def __init__(self, file: soundfile.SoundFile, name: str, declared: DeclaredLength):
        self.file = file
        super().__init__(name, file.samplerate, declared)

    def _read(self, first: int, count: int) -> tuple[np.ndarray, int | None]:
        per_read = max(1, READ_CHUNK // max(1, self.file.channels))
        parts, wanted = [], count
        try:
            if self.file.tell() != first:
                self.file.seek(first)
            while wanted > 0:
                frames = self.file.read(min(wanted, per_read), dtype="float32", always_2d=True)
                parts.append(frames.mean(axis=1))
                wanted -= frames.shape[0]
                if frames.shape[0] < min(wanted + frames.shape[0], per_read):
                    break
        except (soundfile.LibsndfileError, RuntimeError, ValueError) as e:
            raise self.failure(self._stopped_at(first + count - wanted), decoder_message(e)) from e
        samples = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        return samples, (first + samples.shape[0] if wanted > 0 else None)

    def _stopped_at(self, read: int) -> int:
        """Where libsndfile stopped inside a read that failed (it reports no partial count)."""
        try:
            return max(read, self.file.tell())
        except (soundfile.LibsndfileError, RuntimeError):
            return read

    def close(self) -> None:
        self.file.close()


def audio_file(audio: str | Path, name: str) -> Path:
    """The path of an audio file, or an AudioError saying why it cannot be one (never opened
    here: opening a pipe could wait forever)."""
    path = Path(audio).expanduser()
    if path.is_dir():
        raise AudioError(name, "is a directory, not an audio file")
    if not path.is_file():
        raise AudioError(name, "no such file" if not path.exists() else
                         "is not a regular file (a pipe, socket or device)")
    return path


def open_decoder(audio: str | Path | bytes, name: str) -> Decoder:
    """A decoder for a file or a file's bytes: soundfile when it can open it, else FFmpeg."""
    if isinstance(audio, (str, Path)):
        path = audio_file(audio, name)
        opener: Callable[[], BinaryIO] = lambda: open(path, "rb")
        target: Path | io.BytesIO = path
    else:
        opener = lambda: io.BytesIO(audio)
        target = opener()
    try:
        with opener() as handle:
            head = handle.read(HEAD_BYTES)
            skip = id3_size(head)
            handle.seek(skip)
            mp3_head = handle.read(MP3_HEAD_BYTES)
    except OSError as e:
        raise AudioError(name, f"cannot read the file: {e.strerror or e}") from e
    if not head:
        raise AudioError(name, "cannot decode audio: it is empty (0 bytes)")
    try:
        file = soundfile.SoundFile(target)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        soundfile_error = decoder_message(e)
    else:
        declared = soundfile_length(file, head, mp3_head)
        # Left to FFmpeg: a length libsndfile cannot read (a streamed FLAC); an MP3 without a
        # Xing frame, which libsndfile stops decoding at its estimate (3 s of a 22 s VBR file);
        # Ogg Opus, whose seeks libsndfile lands off by the codec's pre-skip (6.5 ms).
        if (declared is not None and (declared.exact or file.format != "MP3")
                and (file.format, file.subtype) != ("OGG", "OPUS")):
            try:
                return SoundfileDecoder(file, name, declared)
            except AudioError:
                file.close()
                raise
        file.close()
        soundfile_error = f"{file.format} {file.subtype} left to FFmpeg"
    # Here, not at the top: it imports PyAV, and it builds on this module's Decoder.
    from sensevoice_core.audio_ffmpeg import FFmpegDecoder, NotRecognised

    try:
        return FFmpegDecoder(opener, name, mp3_head)
    except NotRecognised as e:
        raise AudioError(name, f"cannot decode audio (libsndfile: {soundfile_error}; FFmpeg: "
                               f"{e}); {EXPECTED_FORMATS}") from e


def soundfile_length(file: soundfile.SoundFile, head: bytes,
                     mp3_head: bytes) -> DeclaredLength | None:
    """The header's length: exact for sample counts (WAV data size, FLAC, Ogg, MP3 with a
    Xing/VBRI frame), estimated for MP3 without one; None when libsndfile has none."""
    frames = file.frames
    if not 0 < frames < 1 << 40:
        return None
    if file.format == "WAV":
        stated = wav_data_frames(head)
        if stated is not None:  # libsndfile trims it to the bytes present
            return DeclaredLength(stated / file.samplerate, exact=True)
        return DeclaredLength(frames / file.samplerate, exact=False)
    exact = file.format != "MP3" or mp3_states_its_length(mp3_head)
    return DeclaredLength(frames / file.samplerate, exact)


def wav_data_frames(head: bytes) -> int | None:
    """Frames the RIFF data chunk declares; None when it says "unknown" (streamed) or lies
    beyond the head."""
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    at, block_align = 12, 0
    while at + 8 <= len(head):
        chunk, size = head[at:at + 4], int.from_bytes(head[at + 4:at + 8], "little")
        if chunk == b"fmt " and at + 22 <= len(head):
            block_align = int.from_bytes(head[at + 20:at + 22], "little")
        if chunk == b"data":
            # Writers that stream (to a pipe) cannot go back to fill the size in: they leave 0
            # or a value near 2 or 4 GiB (espeak-ng: 0x7FFFFFFF less the header).
            unknown = size == 0 or size >= WAV_SIZE_PLACEHOLDER
            return size // block_align if block_align and not unknown else None
        at += 8 + size + (size & 1)
    return None


def id3_size(head: bytes) -> int:
    """Bytes of the ID3v2 tag at the start of an MP3 (0 when none)."""
    if len(head) < 10 or head[:3] != b"ID3":
        return 0
    size = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | head[9] & 0x7F
    return 10 + size + (10 if head[5] & 0x10 else 0)


def mp3_states_its_length(head: bytes) -> bool:
    """Whether the first MP3 frame (head: the bytes after any ID3 tag) is a Xing/Info or VBRI
    frame with a frame count; without one an MP3's length is an estimate from its bit rate."""
    for at in range(max(0, len(head) - 40)):
        b1, b3 = head[at + 1], head[at + 3]
        if head[at] != 0xFF or b1 & 0xE0 != 0xE0 or (b1 >> 3) & 3 == 1 or (b1 >> 1) & 3 == 0:
            continue
        mpeg1, mono = (b1 >> 3) & 3 == 3, b3 >> 6 == 3
        side = (17 if mono else 32) if mpeg1 else (9 if mono else 17)
        tag = at + 4 + side
        if head[tag:tag + 4] in (b"Xing", b"Info"):
            return bool(int.from_bytes(head[tag + 4:tag + 8], "big") & 1)
        return head[at + 36:at + 40] == b"VBRI"
    return False
