"""What users actually upload: browser recordings (webm/ogg Opus), phone memos (m4a/AAC), mp4
videos, mpeg, mp3: each made here from a bundled clip with PyAV, decoded to the clip's length and
transcribed by the demo model to the flac's text; and the files that must not decode."""

from __future__ import annotations

import io
import resource
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch

from sensevoice_core import TranscribeOptions
from sensevoice_core.audio import AudioSource, load_audio
from sensevoice_core.audio_ffmpeg import FFmpegDecoder
from sensevoice_core.audio_stream import open_decoder
from sensevoice_core.errors import AudioError, AudioTooLongError
from sensevoice_core.segmentation import VadOptions

EXAMPLES = Path(__file__).resolve().parent.parent / "ui" / "examples"
CLIPS = [EXAMPLES / name for name in ("en_02.flac", "zh_04.flac", "en_03.flac", "zh_08.flac")]
ITN = TranscribeOptions(use_itn=True)
VIDEO_CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"

# name: (container, audio codec, video codec or None); audio at 48 kHz, as phones and browsers
# record it
FORMATS = {
    "webm": ("webm", "libopus", None),  # what Chrome and Firefox's MediaRecorder send
    "opus": ("ogg", "libopus", None),  # ogg Opus (Firefox, WhatsApp voice notes)
    "m4a": ("ipod", "aac", None),  # iPhone / Android voice memos
    "mp4": ("mp4", "aac", VIDEO_CODEC),  # a video: its audio is transcribed
    "mpeg": ("mpeg", "mp2", None),  # MPEG program stream, MPEG-1 Layer II audio
    "mp3": ("mp3", "libmp3lame", None),
    "aac": ("adts", "aac", None),  # raw AAC: nothing trims the encoder's priming
}
MAX_LEAD_S = 0.06  # codec delay a container may leave in front (AAC priming without an edit list)


def encode(samples: np.ndarray, path: Path, container: str, codec: str,
           video: str | None = None, options: dict[str, str] | None = None,
           audio: bool = True, rate: int = 48000, video_s: float | None = None) -> Path:
    """16 kHz mono samples written with PyAV; a video stream first when asked (as cameras do)."""
    out = av.open(str(path), "w", format=container, options=options or {})
    picture = None
    if video:
        picture = out.add_stream(video, rate=10)
        picture.width, picture.height, picture.pix_fmt = 64, 48, "yuv420p"
    if audio:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        resampler = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name,
                                      layout="mono", rate=rate,
                                      frame_size=stream.codec_context.frame_size or None)
        frames = []
        for first in range(0, len(samples), 4096):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples[None, first:first + 4096], np.float32),
                format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 16000, first, Fraction(1, 16000)
            frames += resampler.resample(frame)
        for frame in frames + resampler.resample(None):
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    if picture is not None:
        for index in range(int((video_s or len(samples) / 16000) * 10) + 1):
            image = av.VideoFrame.from_ndarray(np.full((48, 64, 3), index * 10 % 255, np.uint8),
                                               format="rgb24")
            image.pts = index
            for packet in picture.encode(image):
                out.mux(packet)
        for packet in picture.encode(None):
            out.mux(packet)
    out.close()
    return path


def encode_as(name: str, samples: np.ndarray, directory: Path, stem: str = "clip") -> Path:
    container, codec, video = FORMATS[name]
    return encode(samples, directory / f"{stem}.{name}", container, codec, video)


def lead(decoded: np.ndarray, reference: np.ndarray) -> tuple[int, float]:
    """Where the reference starts in the decoded audio (samples), and their correlation there."""
    count = len(reference) - round(MAX_LEAD_S * 16000)
    scores = [float(np.dot(decoded[lag:lag + count], reference[:count]))
              for lag in range(round(MAX_LEAD_S * 16000))]
    lag = int(np.argmax(scores))
    return lag, float(np.corrcoef(decoded[lag:lag + count], reference[:count])[0, 1])


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, list[Path]]:
    """Each bundled clip in each format, made once."""
    directory = tmp_path_factory.mktemp("formats")
    made: dict[str, list[Path]] = {name: [] for name in FORMATS}
    for clip in CLIPS:
        samples = load_audio(clip).numpy()
        for name in FORMATS:
            made[name].append(encode_as(name, samples, directory, clip.stem))
    return made


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_decodes_to_the_clips_length_and_samples(clips, name):
    reference = load_audio(CLIPS[0]).numpy()
    path = clips[name][0]
    from_path, from_bytes = load_audio(path), load_audio(path.read_bytes())
    torch.testing.assert_close(from_path, from_bytes, rtol=0, atol=0)
    lag, correlation = lead(from_path.numpy(), reference)
    assert correlation > 0.97  # the codec's delay is a fraction of a 16 kHz sample: not 1
    assert abs(from_path.numel() - lag - len(reference)) < 0.01 * 16000, (lag, from_path.numel())


@pytest.fixture(scope="module")
def flac_texts(demo_model) -> list[str]:
    return [demo_model.transcribe(clip, ITN).text for clip in CLIPS]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_transcribes_like_the_flac(demo_model, clips, flac_texts, name):
    expected = flac_texts
    found = [demo_model.transcribe(path.read_bytes(), ITN, source_name=path.name).text
             for path in clips[name]]
    assert all(expected) and found == expected


def test_an_mp4_video_is_transcribed_from_its_audio_stream(clips):
    path = clips["mp4"][0]
    with av.open(str(path)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]  # the video comes first
    with open_decoder(path.read_bytes(), "movie.mp4") as decoder:
        assert isinstance(decoder, FFmpegDecoder) and decoder.rate == 48000


def test_a_video_without_sound_is_a_clear_error(tmp_path: Path):
    silent_movie = encode(np.zeros(16000, np.float32), tmp_path / "screen.mp4", "mp4", "aac",
                          VIDEO_CODEC, audio=False)
    with pytest.raises(AudioError) as error:
        load_audio(silent_movie.read_bytes(), source_name="screen.mp4")
    assert str(error.value) == "screen.mp4: has no audio stream (found video)"


@pytest.fixture(scope="module")
def recording() -> tuple[np.ndarray, list[float]]:
    """About 30 s: the four clips with pauses between them, twice; and where each clip starts."""
    parts, starts, at = [], [], 0.0
    for gap, clip in zip([1.0, 2.0, 1.5, 2.5] * 2, CLIPS * 2):
        samples = load_audio(clip).numpy()
        parts += [np.zeros(int(gap * 16000), np.float32), samples]
        starts.append(at + gap)
        at += gap + len(samples) / 16000
    return np.concatenate(parts + [np.zeros(16000, np.float32)]), starts


@pytest.mark.parametrize("name", ["webm", "m4a", "mpeg"])
def test_long_audio_in_each_container_streams_and_seeks_exactly(demo_model, recording, tmp_path,
                                                                 name):
    """Streamed in blocks, then regions read back in length order (the decoder seeks back and
    forth): the same segments as the same audio decoded whole, at the WAV's times. (The demo
    model's words on codec-coloured speech may differ from the WAV's; that is not decoding.)"""
    samples, _ = recording
    wav = tmp_path / "meeting.wav"
    soundfile.write(wav, samples, 16000)
    options = TranscribeOptions(use_itn=True, vad=VadOptions(max_segment_s=5.0))
    encoded = encode_as(name, samples, tmp_path)
    found = demo_model.transcribe(encoded.read_bytes(), options)
    whole = demo_model.transcribe(load_audio(encoded), options)
    original = demo_model.transcribe(wav, options)
    # Confidences are floats of the model's output: lossy decoding after a seek may move them
    # by a few hundredths (see the next test); the words, tags and times are the same.
    confidences = {"avg_logprob", "no_speech_prob"}
    assert [s.model_dump(exclude=confidences) for s in found.segments] == \
        [s.model_dump(exclude=confidences) for s in whole.segments]
    for mine, theirs in zip(found.segments, whole.segments):
        assert mine.avg_logprob == pytest.approx(theirs.avg_logprob, abs=0.05)
        assert mine.no_speech_prob == pytest.approx(theirs.no_speech_prob, abs=1e-3)
    assert len(found.segments) == len(original.segments) == 8
    for mine, theirs in zip(found.segments, original.segments):
        assert abs(mine.start - theirs.start) < 0.1 and abs(mine.end - theirs.end) < 0.1


@pytest.mark.parametrize("name", ["webm", "opus", "m4a", "mpeg", "aac"])
def test_a_span_read_after_a_seek_is_in_place_to_the_sample(recording, tmp_path, name):
    samples, starts = recording
    path = encode_as(name, samples, tmp_path)
    with open_decoder(path.read_bytes(), path.name) as decoder:
        streamed, rate = decoder.read_all(None), decoder.rate
        for clip in (7, 2, 5, 0, 4):  # backwards and forwards
            first = round((starts[clip] + 0.2) * rate)
            span = decoder.read(first, rate)
            assert span.shape == (rate,)
            # Off by a sample or more, speech differs a lot; in place, by little (AAC's noise
            # substitution draws from a generator a seek resets).
            errors = [np.abs(span - streamed[first + shift:first + shift + rate]).mean()
                      for shift in range(-48, 49)]
            assert int(np.argmin(errors)) == 48, (clip, int(np.argmin(errors)) - 48)
            assert errors[48] < 0.05 * np.abs(span).mean(), clip


def test_a_browser_recording_without_a_duration_is_measured_and_bounded(tmp_path: Path):
    """MediaRecorder's WebM has no Duration element: the length is found by decoding, and
    decoding stops at max_seconds, long before the end."""
    speech = load_audio(CLIPS[0]).numpy()
    live = encode(np.tile(speech, 20), tmp_path / "recording.webm", "webm", "libopus",
                  options={"live": "1"})
    with open_decoder(live.read_bytes(), "recording.webm") as decoder:
        assert decoder.declared is None
    with AudioSource(live.read_bytes(), max_seconds=100) as source:
        blocks = sum(block.numel() for block in source.blocks(seconds=5.0))
    assert abs(blocks / 16000 - 20 * len(speech) / 16000) < 0.1
    with AudioSource(live.read_bytes(), max_seconds=10, source_name="recording.webm") as source:
        seen: list[torch.Tensor] = []
        with pytest.raises(AudioTooLongError,
                           match=r"recording.webm: the audio is at least 1\d\.\d s"):
            seen.extend(source.blocks(seconds=5.0))
        assert len(seen) == 2  # refused on the block that passed the limit, not at the end


def test_a_stated_length_over_the_limit_is_refused_before_decoding(tmp_path: Path):
    long_memo = encode_as("m4a", np.zeros(16000 * 30, np.float32), tmp_path)
    with pytest.raises(AudioTooLongError, match=r"memo.m4a: the audio is 30.\d s long; "
                                                r"the limit is 10 s"):
        AudioSource(long_memo.read_bytes(), max_seconds=10, source_name="memo.m4a")


# --- files cut short: an error naming the file and the second, unless the length was a guess --


def cut(path: Path, keep: float) -> bytes:
    data = path.read_bytes()
    return data[:int(len(data) * keep)]


def test_an_mp3_cut_short_of_its_xing_length_names_the_file_and_the_second(clips):
    """Row 7 of issue 12: 30 % of an MP3 whose Xing frame says 1.34 s."""
    partial = cut(clips["mp3"][0], 0.3)
    for attempt in (lambda: load_audio(partial, source_name="talk.mp3"),
                    lambda: AudioSource(partial, source_name="talk.mp3").whole()):
        with pytest.raises(AudioError, match=r"^talk.mp3: decoding stopped at 0\.\d\d s of the "
                                             r"1\.34 s its header states: the file is cut short"):
            attempt()


def test_an_mp3_without_a_xing_frame_has_an_estimated_length_and_decodes_what_is_there(
        tmp_path: Path):
    speech = load_audio(CLIPS[0]).numpy()
    plain = encode(np.tile(speech, 3), tmp_path / "plain.mp3", "mp3", "libmp3lame",
                   options={"write_xing": "0"})
    with open_decoder(plain.read_bytes(), "plain.mp3") as decoder:
        assert decoder.declared is not None and not decoder.declared.exact
    samples = load_audio(cut(plain, 0.6))
    assert abs(samples.numel() / 16000 - 0.6 * 3 * len(speech) / 16000) < 0.15


def test_a_vbr_mp3_without_a_xing_frame_is_decoded_to_its_end(tmp_path: Path):
    """Its length is estimated from the first frame's bit rate: 3 s for these 22 s. libsndfile
    stops at the estimate, so such files go to FFmpeg, which decodes until the data ends."""
    loud = np.random.default_rng(0).standard_normal(16000 * 2).astype(np.float32) * 0.3
    path = tmp_path / "vbr.mp3"
    out = av.open(str(path), "w", format="mp3", options={"write_xing": "0"})
    stream = out.add_stream("libmp3lame", rate=16000)
    stream.layout = "mono"
    stream.codec_context.flags |= av.codec.context.Flags.qscale  # variable bit rate
    stream.codec_context.global_quality = 2 * 118  # -q:a 2
    samples = np.concatenate([loud, np.zeros(16000 * 20, np.float32)])
    frame = av.AudioFrame.from_ndarray(samples[None], format="flt", layout="mono")
    frame.sample_rate, frame.pts, frame.time_base = 16000, 0, Fraction(1, 16000)
    resampler = av.AudioResampler(format="s16p", layout="mono", rate=16000, frame_size=1152)
    for piece in resampler.resample(frame) + resampler.resample(None):
        for packet in stream.encode(piece):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)
    out.close()
    assert soundfile.info(str(path)).duration < 4  # the estimate
    assert abs(load_audio(path).numel() / 16000 - 22.0) < 0.2


@pytest.mark.parametrize(("missing_s", "refused"), [(0.2, False), (0.6, True)])
def test_a_wav_missing_more_than_the_slack_is_refused(tmp_path: Path, missing_s, refused):
    """The RIFF data size is exact; libsndfile would quietly decode what is there."""
    wav = tmp_path / "memo.wav"
    soundfile.write(wav, np.tile(load_audio(CLIPS[0]).numpy(), 2), 16000, subtype="PCM_16")
    data = wav.read_bytes()
    partial = data[:len(data) - round(missing_s * 16000) * 2]
    if refused:
        with pytest.raises(AudioError, match=r"memo.wav: decoding stopped at 2\.08 s of the "
                                             r"2\.68 s its header states"):
            load_audio(partial, source_name="memo.wav")
    else:
        assert load_audio(partial).numel() == len(partial[44:]) // 2


@pytest.mark.parametrize("name", ["webm", "m4a"])
def test_a_container_that_states_its_length_and_breaks_off_is_refused(tmp_path: Path, name):
    speech = np.tile(load_audio(CLIPS[0]).numpy(), 4)
    container, codec, _ = FORMATS[name]
    options = {"movflags": "faststart"} if name == "m4a" else {}  # the index first, as phones do
    whole = encode(speech, tmp_path / f"memo.{name}", container, codec, options=options)
    with pytest.raises(AudioError, match=rf"^memo.{name}: decoding stopped at [0-9.]+ s of the "
                                         r"5\.3\d s its header states"):
        load_audio(cut(whole, 0.6), source_name=f"memo.{name}")


# --- hostile input ---------------------------------------------------------------------------


def test_corrupt_files_fail_fast_with_an_audio_error_naming_them(clips):
    """Truncations, flipped bytes, junk spans and absurd sizes in each format: every one decodes
    or is an AudioError naming the upload, in well under a second and a few MiB, without a
    Python repr."""
    rng = np.random.default_rng(12)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name in ("webm", "m4a", "mp4", "mpeg", "mp3", "opus", "aac"):
        original = clips[name][1].read_bytes()
        for trial in range(24):
            data = bytearray(original)
            at = int(rng.integers(0, len(data) - 8))
            if trial % 4 == 0:
                data = data[:at + 1]
            elif trial % 4 == 1:
                for position in rng.integers(0, len(data), 12):
                    data[position] = int(rng.integers(0, 256))
            elif trial % 4 == 2:
                data[at:at + 400] = rng.integers(0, 256, len(data[at:at + 400]), np.uint8).tobytes()
            else:
                at = int(rng.integers(0, min(200, len(data) - 4)))
                data[at:at + 4] = b"\xff\xff\xff\x7f"
            start = time.perf_counter()
            try:
                load_audio(bytes(data), max_seconds=60, source_name=f"upload.{name}")
            except AudioError as e:
                assert str(e).startswith(f"upload.{name}: ") and "<" not in str(e), str(e)
            assert time.perf_counter() - start < 3.0, (name, trial)
    growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert growth_mib < 100, growth_mib


def test_a_concat_script_naming_a_local_file_is_not_followed(tmp_path: Path, monkeypatch):
    """FFmpeg's concat demuxer reads the files a script names: an upload must not make the
    service read its own disk. Only audio and video containers are allowed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.flac").write_bytes(CLIPS[0].read_bytes())
    script = b"ffconcat version 1.0\nfile secret.flac\n"
    with av.open(io.BytesIO(script)) as unguarded:  # what FFmpeg does by default
        assert sum(frame.samples for frame in unguarded.decode(audio=0)) > 16000
    with pytest.raises(AudioError, match="^playlist.txt: cannot decode audio"):
        load_audio(script, source_name="playlist.txt")


def test_header_sizes_that_lie_cost_nothing(tmp_path: Path):
    # An ID3 tag claiming 256 MB; a WAV claiming 4 GB of data over 1 KB (a streaming
    # writer's filler: measured by decoding), and one claiming 1 GB (a cut-off file).
    huge_id3 = b"ID3\x04\x00\x00\x7f\x7f\x7f\x7f" + bytes(2000)
    wav = io.BytesIO()
    soundfile.write(wav, np.zeros(512, np.float32), 16000, format="WAV", subtype="PCM_16")
    lying_wav = bytearray(wav.getvalue())
    start = time.perf_counter()
    with pytest.raises(AudioError, match="tag.mp3: cannot decode audio"):
        load_audio(huge_id3, source_name="tag.mp3")
    lying_wav[40:44] = (0xFFFFFFF0).to_bytes(4, "little")
    assert load_audio(bytes(lying_wav), max_seconds=None, source_name="big.wav").numel() == 512
    lying_wav[40:44] = (1 << 30).to_bytes(4, "little")
    with pytest.raises(AudioError, match=r"big.wav: decoding stopped at 0\.03 s of the "
                                         r"33554.4\d s its header states"):
        load_audio(bytes(lying_wav), max_seconds=None, source_name="big.wav")
    assert time.perf_counter() - start < 1.0


def streamed_flac(samples: np.ndarray) -> bytes:
    """A FLAC as a pipe writes it: STREAMINFO's total sample count left at 0 (unknown)."""
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, 16000, format="FLAC")
    data = bytearray(buffer.getvalue())
    data[21] &= 0xF0
    data[22:26] = bytes(4)
    return bytes(data)


def test_a_flac_without_a_sample_count_is_measured_by_decoding():
    """libsndfile reports such a file as 2**63 frames long and fails to read it."""
    speech = load_audio(CLIPS[0]).numpy()
    torch.testing.assert_close(load_audio(streamed_flac(speech)), torch.from_numpy(speech),
                               rtol=0, atol=1e-4)


def test_audio_of_unknown_length_is_refused_while_decoding_not_after():
    """A few kilobytes can hold hours of silence: decoding stops at the limit."""
    minutes = streamed_flac(np.zeros(16000 * 600, np.float32))
    assert len(minutes) < 200_000
    with pytest.raises(AudioTooLongError, match=r"pipe.flac: the audio is at least 60\.0 s long; "
                                                r"the limit is 45 s"):
        load_audio(minutes, max_seconds=45, source_name="pipe.flac")


@pytest.mark.parametrize("placeholder", [0, 0x7FFFFFFF - 36, 0xFFFFFFFF])
def test_a_wav_written_to_a_pipe_is_measured_not_refused(placeholder: int):
    """Streaming writers (espeak-ng --stdout, ffmpeg or sox to a pipe) cannot fill the data
    size in: it is 0 or a filler near 2 or 4 GiB, never a length to hold the file to."""
    speech = (np.sin(np.arange(16000) / 7.0) * 8000).astype(np.int16)
    buffer = io.BytesIO()
    soundfile.write(buffer, speech, 16000, format="WAV", subtype="PCM_16")
    data = bytearray(buffer.getvalue())
    at = data.index(b"data")
    data[at + 4:at + 8] = placeholder.to_bytes(4, "little")
    decoded = load_audio(bytes(data))
    assert decoded.numel() == speech.size


def test_espeak_ng_stdout_decodes_whole():
    spoken = subprocess.run(["espeak-ng", "--stdout", "three zero five two"],
                            capture_output=True, check=True, timeout=60).stdout
    assert 0x7FFF0000 <= int.from_bytes(spoken[40:44], "little")  # the filler, as shipped
    assert load_audio(spoken).numel() > 16000 * 0.5


@pytest.mark.parametrize("container, codec", [("matroska", "libopus"), ("mp4", "aac")])
def test_a_video_longer_than_its_sound_is_not_taken_for_a_cut_file(tmp_path: Path,
                                                                   container: str, codec: str):
    """The file's length covers every track; only the audio track's own length is held to."""
    speech = load_audio(CLIPS[0]).numpy()
    path = encode(speech, tmp_path / f"screen.{container}", container, codec, VIDEO_CODEC,
                  video_s=2 * len(speech) / 16000 + 1)
    decoded = load_audio(path)
    assert abs(decoded.numel() - speech.size) < 16000 * 0.1
