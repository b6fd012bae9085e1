"""FFmpeg, through PyAV, for what libsndfile cannot read: webm/ogg Opus from browsers, m4a/AAC
from phones, mp4 videos, mpeg. It reads a file object (the upload's bytes, never a temp file)
and may only use the demuxers of audio and video containers: no playlists, no other files, no
network. ``audio_stream.open_decoder`` comes here (and imports PyAV) only when libsndfile fails.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import BinaryIO

import av
import numpy as np

from sensevoice_core.audio_stream import (
    DeclaredLength,
    Decoder,
    decoder_message,
    mp3_states_its_length,
    to_float32,
)
from sensevoice_core.errors import AudioError

# FFmpeg demuxers an upload may use: the audio and video containers people send. Playlist and
# concat demuxers (hls, dash, concat) open other files or URLs, so they are not listed.
FFMPEG_FORMATS = "mov,matroska,ogg,mp3,aac,wav,w64,flac,mpeg,mpegts,aiff,caf,amr,asf,au"
FFMPEG_EXACT = {"mov", "matroska", "ogg", "wav", "w64", "flac", "aiff", "caf"}  # stated lengths
FFMPEG_OPTIONS = {"format_whitelist": FFMPEG_FORMATS, "protocol_whitelist": "none",
                  "probesize": "5000000", "analyzeduration": "5000000"}
SEEK_PREROLL_S = 0.5  # decoded and dropped before a seek target, so codec state converges
SEEK_AHEAD_S = 10.0  # a read this far ahead seeks; nearer ones decode forward
SEEK_BAD_PACKETS = 64  # undecodable packets skipped right after a seek (MPEG-PS lands mid-frame)


def ffmpeg_message(error: Exception) -> str:
    """FFmpeg's own explanation of an error (its strerror), else the decoder_message."""
    if isinstance(error, av.FFmpegError):
        return decoder_message(error, error.strerror or type(error).__name__)
    return decoder_message(error)


class NotRecognised(Exception):
    """FFmpeg cannot open the input as any container it is allowed to read."""


class FFmpegDecoder(Decoder):
    """The first audio stream of any container FFmpeg reads (video ignored), from a file object.

    Reads in order decode forward; a read that jumps back (or far ahead) seeks to a little
    before it and finds its place from the frames' timestamps, or decodes again from the start
    when the container cannot seek there."""

    def __init__(self, opener: Callable[[], BinaryIO], name: str, mp3_head: bytes):
        self.opener, self.name = opener, name
        self.handle: BinaryIO | None = None
        self.container: av.container.InputContainer | None = None
        try:
            self._open()
            assert self.container is not None
            kind = self.container.format.name.split(",")[0]
            stream, container = self.stream, self.container
            # The audio stream's own length; the container's covers every stream (a longer
            # video track, a second audio track), so it is exact only when there is one.
            own = track_seconds(stream, kind, len(container.streams))
            seconds = own or (container.duration / 1e6 if container.duration else None)
            exact = ((kind in FFMPEG_EXACT and (own is not None or len(container.streams) == 1))
                     or (kind == "mp3" and mp3_states_its_length(mp3_head)))
            # The rate of the decoded frames, which the header may not give (HE-AAC's is half).
            try:
                peek: av.AudioFrame | None = next(self.frames)
            except StopIteration:
                peek = None
            except (av.FFmpegError, ValueError, OSError) as e:
                raise AudioError(name, f"cannot decode audio at 0.0 s: {ffmpeg_message(e)}") from e
            if peek is not None:
                self.frames = itertools.chain([peek], self.frames)
            super().__init__(name, peek.sample_rate if peek else stream.codec_context.sample_rate,
                             DeclaredLength(seconds, exact) if seconds else None)
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        """(Re)open at the start; NotRecognised when FFmpeg cannot read the input at all."""
        self.close()
        self.handle = self.opener()
        try:
            self.container = av.open(self.handle, options=FFMPEG_OPTIONS,
                                     metadata_errors="replace")
        except (av.FFmpegError, ValueError, OSError) as e:
            raise NotRecognised(ffmpeg_message(e)) from e
        audio = [s for s in self.container.streams if s.type == "audio"]
        if not audio:
            found = ", ".join(sorted({s.type for s in self.container.streams})) or "nothing"
            raise AudioError(self.name, f"has no audio stream (found {found})")
        self.stream = audio[0]
        self.frames = self._decode()
        self.position, self.end, self.ended = 0, 0, False
        self.pending: list[np.ndarray] = []  # decoded samples [position, end)
        # The time of frame 0 as the timestamps count it, taken from the second frame: the first
        # one may be trimmed (codec delay) yet stamped at the start, which a coarse time base
        # (WebM counts milliseconds) would put half a millisecond off every later frame.
        self.origin: Fraction | None = None
        self.bad_packets_allowed = 0  # right after a seek: packets cut by a byte-position seek

    def _decode(self) -> Iterator[av.AudioFrame]:
        assert self.container is not None
        for packet in self.container.demux(self.stream):
            try:
                frames = packet.decode()
            except (av.FFmpegError, ValueError):
                if self.bad_packets_allowed <= 0:
                    raise
                self.bad_packets_allowed -= 1
                continue
            self.bad_packets_allowed = 0
            yield from frames

    def _next(self) -> tuple[int | None, np.ndarray] | None:
        """The next frame (None at the end): its place from its timestamp, and its samples."""
        try:
            frame = next(self.frames)
        except StopIteration:
            return None
        except (av.FFmpegError, ValueError, OSError) as e:
            raise self.failure(self.end, ffmpeg_message(e)) from e
        if frame.sample_rate != self.rate:
            raise AudioError(self.name, f"the sample rate changes at {self.end / self.rate:.1f} s "
                                        f"(from {self.rate} to {frame.sample_rate} Hz)")
        planes = frame.to_ndarray()
        if not frame.format.is_planar:  # interleaved: (1, frames * channels)
            planes = planes.reshape(-1, frame.layout.nb_channels).T
        mono = to_float32(planes, self.name).mean(axis=0, dtype=np.float32)
        if frame.pts is None:
            return None, mono
        time = frame.pts * Fraction(frame.time_base or self.stream.time_base)
        if self.origin is None:
            if self.end == 0:
                return None, mono
            self.origin = time - Fraction(self.end, self.rate)
        return round((time - self.origin) * self.rate), mono

    def _read(self, first: int, count: int) -> tuple[np.ndarray, int | None]:
        if first < self.position or first > self.end + SEEK_AHEAD_S * self.rate:
            self._seek(first)
        while not self.ended and self.end < first + count:
            decoded = self._next()
            if decoded is None:
                self.ended = True
                break
            self.pending.append(decoded[1])
            self.end += decoded[1].shape[0]
            if self.end <= first:  # wholly before the span: drop it
                self.position, self.pending = self.end, []
        joined = np.concatenate(self.pending) if self.pending else np.zeros(0, np.float32)
        offset = first - self.position
        samples = joined[offset:offset + count]
        self.position, self.pending = first + samples.shape[0], [joined[offset + count:]]
        return samples, (self.end if self.ended and samples.shape[0] < count else None)

    def _seek(self, first: int) -> None:
        target = first / self.rate - SEEK_PREROLL_S
        if target <= 0 or self.origin is None:
            return self._reopen()
        assert self.container is not None
        try:
            self.container.seek(int((self.origin + Fraction(target)) / self.stream.time_base),
                                stream=self.stream, backward=True)
        except (av.FFmpegError, ValueError, OSError):
            return self._reopen()
        self.frames, self.pending, self.ended = self._decode(), [], False
        self.bad_packets_allowed = SEEK_BAD_PACKETS
        try:
            decoded = self._next()
        except AudioError:
            decoded = None
        if decoded is None or decoded[0] is None or decoded[0] > first:
            return self._reopen()  # undecodable there, no timestamps, or past the target
        self.position, self.pending = decoded[0], [decoded[1]]
        self.end = self.position + decoded[1].shape[0]

    def _reopen(self) -> None:
        try:
            self._open()
        except NotRecognised as e:
            raise AudioError(self.name, f"cannot decode audio: {e}") from e

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def track_seconds(stream: av.audio.stream.AudioStream, kind: str, streams: int) -> float | None:
    """The audio track's own length, if the file states one. Matroska states it as a DURATION
    tag per track; FFmpeg gives its streams the whole file's length when there is more than one."""
    tag = next((v for k, v in stream.metadata.items() if k.upper() == "DURATION"), None)
    if tag:
        try:
            hours, minutes, secs = tag.strip().split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(secs)
        except ValueError:
            return None
    if not stream.duration or (kind == "matroska" and streams > 1):
        return None
    return float(stream.duration * stream.time_base)
