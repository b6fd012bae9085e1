"""The demo model's clips: planned from a seed, rendered in parallel chunks, cached on disk.

Clip i of a split depends only on (seed, split, i), so the data is the same however many
processes render it. Chunks are rendered by worker processes and kept as ``.npz`` files (16-bit
audio + JSON metadata, written atomically) under the cache directory: a second run with the same
seed and DATA_VERSION reads them back instead of synthesising again.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.augment import render_chain
from training.corpus import pinyin as to_pinyin
from training.corpus import sample_utterance
from training.nospeech import make_nospeech
from training.synth import espeak, festival, flite
from training.voices import Rendering, choose_rendering

DATA_VERSION = 3  # bump when anything here or in synth/augment/nospeech/voices changes clips
CHUNK = 50
NOSPEECH_EVERY = 12  # every 12th training clip has no speech in it
NOSPEECH_LONGEST_S = 4.0  # training's; the held-out ones are up to 8 s


@dataclass(frozen=True)
class Clip:
    language: str  # "en", "zh" or "nospeech"
    kind: str  # digits / number / phrase, or the kind of non-speech sound
    woitn: tuple[str, ...]  # transcript pieces (empty for no speech)
    withitn: tuple[str, ...]
    event: str  # event tag: "Speech", "BGM", "Event_UNK"
    voice: str  # "espeak:en-us+m3", "flite:slt", ... ("" for no speech)
    rate: int  # words per minute asked of the synthesiser (0 for no speech)
    waveform: np.ndarray  # float32 mono 16 kHz
    word_starts: tuple[float, ...] | None  # espeak-ng's word onsets in the clip, seconds

    def meta(self) -> dict:
        return {"language": self.language, "kind": self.kind, "woitn": self.woitn,
                "withitn": self.withitn, "event": self.event, "voice": self.voice,
                "rate": self.rate, "word_starts": self.word_starts}


def _plan(index: int, seed: int, split: str):
    rng = random.Random(f"{seed}:{split}:{index}")
    if split == "train" and index % NOSPEECH_EVERY == NOSPEECH_EVERY - 1:
        return rng, None, None
    language = "en" if rng.random() < 0.5 else "zh"
    utterance = sample_utterance(language, rng)
    return rng, utterance, choose_rendering(language, split != "train", rng)


def _text(utterance, rendering: Rendering) -> str:
    return to_pinyin(utterance.spoken) if rendering.voice.pinyin else utterance.spoken


def render_chunk(seed: int, split: str, start: int, stop: int) -> list[Clip]:
    plans = [_plan(i, seed, split) for i in range(start, stop)]
    spoken: dict[int, tuple[np.ndarray, list[float] | None]] = {}
    for synth, render in (("festival", festival), ("espeak", espeak)):
        batch = [(i, _text(u, r), r) for i, (_, u, r) in enumerate(plans)
                 if r is not None and r.voice.synth == synth]
        for (i, _, _), result in zip(batch, render([(t, r) for _, t, r in batch])):
            spoken[i] = result if synth == "espeak" else (result, None)
    for i, (_, utterance, rendering) in enumerate(plans):
        if rendering is not None and rendering.voice.synth == "flite":
            spoken[i] = (flite(_text(utterance, rendering), rendering), None)
    pool = [spoken[i][0] for i in sorted(spoken)]
    clips = []
    for i, (rng, utterance, rendering) in enumerate(plans):
        if rendering is None:
            sound = make_nospeech(f"{seed}:{split}:nospeech:{start + i}",
                                  longest_s=NOSPEECH_LONGEST_S)
            clips.append(Clip("nospeech", sound.kind, (), (), sound.event, "", 0,
                              sound.waveform, None))
            continue
        samples, starts = spoken[i]
        others = [p for p in pool if p is not samples]
        waveform, starts = render_chain(samples, starts, rendering,
                                        np.random.default_rng(rng.randrange(2**32)), others)
        clips.append(Clip(utterance.language, utterance.kind, utterance.woitn,
                          utterance.withitn, "Speech", rendering.describe(), rendering.rate,
                          waveform, None if starts is None else tuple(starts)))
    return clips


def _chunk_file(cache_dir: Path, seed: int, split: str, start: int, stop: int) -> Path:
    return cache_dir / f"v{DATA_VERSION}-{split}-seed{seed}-{start:06d}-{stop:06d}.npz"


def save_chunk(path: Path, clips: list[Clip]) -> None:
    audio = np.concatenate([c.waveform for c in clips])
    offsets = np.cumsum([0] + [c.waveform.size for c in clips])
    meta = json.dumps([c.meta() for c in clips], ensure_ascii=False)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("wb") as handle:
        np.savez(handle, audio=np.round(audio * 32767).astype(np.int16), offsets=offsets,
                 meta=np.array(meta))
    os.replace(temporary, path)


def load_chunk(path: Path) -> list[Clip]:
    with path.open("rb") as handle, np.load(handle, allow_pickle=False) as data:
        audio = data["audio"].astype(np.float32) / 32767
        offsets, meta = data["offsets"], json.loads(str(data["meta"]))
    clips = []
    for entry, a, b in zip(meta, offsets[:-1], offsets[1:]):
        starts = entry.pop("word_starts")
        clips.append(Clip(**{**entry, "woitn": tuple(entry["woitn"]),
                             "withitn": tuple(entry["withitn"])},
                          waveform=audio[a:b], word_starts=None if starts is None
                          else tuple(starts)))
    return clips


def _render_to_cache(cache_dir: Path, seed: int, split: str, start: int, stop: int) -> None:
    import torch

    torch.set_num_threads(1)
    save_chunk(_chunk_file(cache_dir, seed, split, start, stop),
               render_chunk(seed, split, start, stop))


def _read_chunk(path: Path, expected: int) -> list[Clip] | None:
    """A cached chunk, or None when it is missing, damaged or holds the wrong number of clips
    (a truncated write, a file from elsewhere): such a chunk is rendered again."""
    if not path.exists():
        return None
    try:
        clips = load_chunk(path)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as error:
        print(f"[training] cached chunk {path} is unreadable ({error}); rendering it again",
              flush=True)
        return None
    if len(clips) != expected:
        print(f"[training] cached chunk {path} holds {len(clips)} clips, expected {expected}; "
              f"rendering it again", flush=True)
        return None
    return clips


def make_clips(count: int, seed: int, split: str, cache_dir: Path, workers: int = 2
               ) -> list[Clip]:
    """Clips 0..count-1 of a split ("train" or "held-out"), rendering only the chunks the
    cache does not hold (or holds damaged)."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the training cache {cache_dir} ({error.strerror}): "
                      f"pass --cache DIR on a writable disk") from error
    bounds = [(a, min(a + CHUNK, count)) for a in range(0, count, CHUNK)]
    chunks = {b: _read_chunk(_chunk_file(cache_dir, seed, split, *b), b[1] - b[0])
              for b in bounds}
    missing = [b for b, clips in chunks.items() if clips is None]
    if missing:
        context = multiprocessing.get_context("spawn")  # no inherited torch/OpenMP state
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for future in [pool.submit(_render_to_cache, cache_dir, seed, split, a, b)
                           for a, b in missing]:
                future.result()
        for b in missing:
            chunks[b] = load_chunk(_chunk_file(cache_dir, seed, split, *b))
    return [clip for b in bounds for clip in chunks[b]]
