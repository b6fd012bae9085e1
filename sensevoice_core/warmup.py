"""A loaded model's checks before its worker says Ready: the warm-up (every worker) and the
reload canary (a reload's green), and the one line that says which of them failed and why."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files

import torch
from pydantic import ValidationError

from sensevoice_core.audio import SAMPLE_RATE, load_audio
from sensevoice_core.canary import CanaryReport, run_canary
from sensevoice_core.options import TranscribeOptions
from sensevoice_core.pipeline import SenseVoice
from sensevoice_core.settings import Settings
from sensevoice_core.vad import speech_probabilities

WARMUP_CLIP = files("sensevoice_core") / "warmup.flac"  # short: the gate has gate.flac
# The model's part of the warm-up: a forward pass reads every weight once whatever the input
# length, so its cost is that read; a few frames go through every layer (the LFR frontend
# stacks 7 feature frames of 10 ms, so 0.2 s gives 3 encoder frames beside the 4 queries).
WARMUP_MODEL_S = 0.2
SHOWN_INPUT_CHARS = 60


def warm_up(model: SenseVoice) -> float:
    """The first request's one-off costs, paid before Ready: decode the bundled clip (the
    audio path), load the VAD and run it over the clip, and run the model on its first
    WARMUP_MODEL_S through every stage (features, encoder, CTC head, decoding), which proves
    the model runs and touches every weight page (the L2 load mapped them in already).
    Going through transcribe() would only run the model on the VAD's speech, at the length
    of the whole clip.

    One thread: a reload warms up beside the old worker, which is serving on every core;
    two thread pools spinning on the same cores would slow both far more than half.
    """
    start = time.perf_counter()
    with one_thread():
        audio = load_audio(str(WARMUP_CLIP))
        speech_probabilities(model.vad, [audio])
        model.decode([audio[:round(WARMUP_MODEL_S * SAMPLE_RATE)]], TranscribeOptions())
    return time.perf_counter() - start


def check_canary(model: SenseVoice, settings: Settings) -> CanaryReport | None:
    """A reload's green, before Ready: the canary clips (SENSEVOICE_RELOAD_CANARY_DIR, if set),
    on one thread like the warm-up and for the same reason."""
    if settings.reload_canary_dir is None:
        return None
    with one_thread():
        return run_canary(model, settings.reload_canary_dir, settings.reload_canary_max_cer,
                          settings=settings)


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one intra-op thread for the block, then the worker's count again."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def describe_failure(stage: str, error: BaseException) -> str:
    """One line: the stage that failed and the problem. A pydantic error names the model,
    the field and why ("warm-up: ValidationError: Segment.avg_logprob: Input should be a
    finite number (got nan)"), not only how many errors it holds."""
    if isinstance(error, ValidationError) and error.errors():
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        got = repr(first.get("input"))
        if len(got) > SHOWN_INPUT_CHARS:
            got = got[:SHOWN_INPUT_CHARS - 1] + "…"
        more = error.error_count() - 1
        problem = (f"{error.title}{'.' + where if where else ''}: {first['msg']} (got {got})"
                   + (f"; {more} more error{'s' if more > 1 else ''}" if more else ""))
    else:
        problem = str(error).strip().splitlines()[0] if str(error).strip() else "(no message)"
    return f"{stage}: {type(error).__name__}: {problem}"
