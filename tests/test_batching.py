"""Cross-request batching in the library (sensevoice_core.batching), in process, on the demo
model: what concurrent callers get, the order passes take items in, and failures."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from sensevoice_core import TranscribeOptions
from sensevoice_core.batching import LENGTH_RATIO, SHORT_FRAMES, ForwardBatcher
from sensevoice_core.pipeline import SenseVoice

CLIPS = sorted((Path(__file__).parent / "data" / "demo_eval").glob("*.flac"))[:8]
FRAME_S = 0.06


def segments_without_floats(result) -> list[tuple]:
    return [(s.start, s.end, s.text, s.raw, s.language, s.emotion, s.event, s.token_ids,
             s.tokens, s.words) for s in result.segments]


def test_concurrent_callers_share_passes_and_each_gets_its_own_result(demo_model: SenseVoice):
    options = [TranscribeOptions(word_timestamps=True), TranscribeOptions("en", use_itn=True)]
    alone = [demo_model.transcribe(clip, options[i % 2]) for i, clip in enumerate(CLIPS)]
    batcher = ForwardBatcher(demo_model.forward_rows, 0.2, round(120 / FRAME_S))
    demo_model.batcher = batcher
    together: list = [None] * len(CLIPS)
    start = threading.Barrier(len(CLIPS))

    def transcribe(index: int) -> None:
        start.wait()
        together[index] = demo_model.transcribe(CLIPS[index], options[index % 2])

    threads = [threading.Thread(target=transcribe, args=(i,)) for i in range(len(CLIPS))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        batcher.close()
        demo_model.batcher = None
    assert batcher.batch_items == len(CLIPS) > batcher.batches
    for mine, reference in zip(together, alone):
        # Per-item query rows: the English/ITN callers' answers are their own.
        assert segments_without_floats(mine) == segments_without_floats(reference)
        # Not bit-equal: the same rows in a GEMM of another shape sum in another order.
        assert [s.avg_logprob for s in mine.segments] == pytest.approx(
            [s.avg_logprob for s in reference.segments], abs=1e-4)


class GatedForward:
    """The real forward pass, recording the frame counts of each pass; the first pass waits
    for `release`, so that the test can queue calls behind a running pass."""

    def __init__(self, model: SenseVoice):
        self.model = model
        self.release = threading.Event()
        self.entered = threading.Event()
        self.passes: list[list[int]] = []

    def __call__(self, features: list[torch.Tensor], languages: Sequence[int],
                 text_norms: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        self.passes.append([f.shape[0] for f in features])
        self.entered.set()
        self.release.wait(timeout=30)
        return self.model.forward_rows(features, languages, text_norms)


def wait_for(condition, what: str) -> None:
    done = threading.Event()
    for _ in range(3000):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_short_call_waits_for_one_pass_and_is_not_padded_to_a_long_call(
        demo_model: SenseVoice):
    gate = GatedForward(demo_model)
    budget = 400  # frames per pass: two 200-frame pieces
    batcher = ForwardBatcher(gate, 0.001, budget)
    dim = demo_model.model.dims.input_size
    rows = [0]
    calls: dict[str, list[torch.Tensor]] = {}

    def run(name: str, lengths: list[int]) -> None:
        features = [torch.randn(n, dim) for n in lengths]
        calls[name] = batcher.run(features, rows * len(lengths), rows * len(lengths))

    first = threading.Thread(target=run, args=("first", [10]))
    first.start()
    gate.entered.wait(timeout=30)  # a pass is running
    long = threading.Thread(target=run, args=("long", [200] * 8))
    long.start()
    wait_for(lambda: batcher.pending() == 8, "the long call to queue")
    short = threading.Thread(target=run, args=("short", [7]))
    short.start()
    wait_for(lambda: batcher.pending() == 9, "the short call to queue")
    gate.release.set()
    for thread in (first, long, short):
        thread.join(timeout=60)
    batcher.close()
    # The long call queued first and takes the next pass; its rest goes behind the short
    # call, which runs alone: a 200-frame piece is over LENGTH_RATIO times its length.
    assert gate.passes[:3] == [[10], [200, 200], [7]]
    assert all(max(p) * len(p) <= budget for p in gate.passes)
    assert all(max(p) <= LENGTH_RATIO * max(min(p), SHORT_FRAMES) for p in gate.passes)
    assert [r.shape[0] for r in calls["long"]] == [204] * 8  # 4 prompt frames + its own
    assert batcher.batches == len(gate.passes) == 6 and batcher.batch_items == 10


def test_a_lone_caller_does_not_wait_and_a_second_caller_is_waited_for(
        demo_model: SenseVoice):
    dim = demo_model.model.dims.input_size
    callers = [1]
    batcher = ForwardBatcher(demo_model.forward_rows, 30.0, 1000, callers=lambda: callers[0])
    try:
        done = threading.Event()
        result: list[torch.Tensor] = []

        def run() -> None:
            result.extend(batcher.run([torch.randn(10, dim)], [0], [0]))
            done.set()

        threading.Thread(target=run).start()
        # With wait_s = 30 s, only a pass that did not wait answers within the test's time.
        assert done.wait(timeout=15), "a lone caller waited for company"
        assert result[0]._base is None  # its own copy, not a view of the pass's logits
        callers[0] = 2  # two requests in hand: the first one to queue waits for the other
        answers: list[list[torch.Tensor]] = []
        threads = [threading.Thread(target=lambda n=n: answers.append(
            batcher.run([torch.randn(n, dim)], [0], [0]))) for n in (10, 12)]
        threads[0].start()
        wait_for(lambda: batcher.pending() == 1, "the first of two callers to queue")
        threads[1].start()
        for thread in threads:
            thread.join(timeout=15)
        assert len(answers) == 2, "the pass did not start once both callers had queued"
        assert batcher.batches == 2 and batcher.batch_items == 3
    finally:
        batcher.close()


def test_a_failed_calls_queued_items_are_dropped(demo_model: SenseVoice):
    gate = GatedForward(demo_model)
    batcher = ForwardBatcher(gate, 0.001, 20)  # one 20-frame item per pass
    dim = demo_model.model.dims.input_size
    errors: list[BaseException] = []

    def run(features: list[torch.Tensor]) -> None:
        try:
            batcher.run(features, [0] * len(features), [0] * len(features))
        except Exception as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    blocker = threading.Thread(target=run, args=([torch.randn(5, dim)],))
    blocker.start()
    gate.entered.wait(timeout=30)
    bad = [torch.randn(20, dim + 3), torch.randn(20, dim), torch.randn(20, dim)]
    failing = threading.Thread(target=run, args=(bad,))
    failing.start()
    wait_for(lambda: batcher.pending() == 3, "the failing call to queue")
    gate.release.set()
    for thread in (blocker, failing):
        thread.join(timeout=60)
    wait_for(lambda: batcher.pending() == 0, "the queue to empty")
    batcher.close()
    assert len(errors) == 1
    assert gate.passes == [[5], [20]]  # its two other items never ran


def test_a_failing_call_fails_alone_and_the_others_in_its_pass_are_answered(
        demo_model: SenseVoice):
    gate = GatedForward(demo_model)
    batcher = ForwardBatcher(gate, 0.001, 1000)
    dim = demo_model.model.dims.input_size
    outcome: dict[str, object] = {}

    def run(name: str, features: torch.Tensor) -> None:
        try:
            outcome[name] = batcher.run([features], [0], [0])[0]
        except Exception as e:  # noqa: BLE001 - the test inspects it
            outcome[name] = e

    blocker = threading.Thread(target=run, args=("blocker", torch.randn(5, dim)))
    blocker.start()
    gate.entered.wait(timeout=30)
    good = threading.Thread(target=run, args=("good", torch.randn(20, dim)))
    bad = threading.Thread(target=run, args=("bad", torch.randn(20, dim + 3)))  # wrong width
    good.start()
    wait_for(lambda: batcher.pending() == 1, "the good call to queue")
    bad.start()
    wait_for(lambda: batcher.pending() == 2, "the bad call to queue")
    gate.release.set()
    for thread in (blocker, good, bad):
        thread.join(timeout=60)
    batcher.close()
    assert sorted(gate.passes[1]) == [20, 20]  # they shared a pass, which failed
    assert isinstance(outcome["bad"], Exception)  # the model refuses its width
    assert isinstance(outcome["good"], torch.Tensor) and outcome["good"].shape[0] == 24


def test_closing_fails_queued_calls_instead_of_hanging(demo_model: SenseVoice):
    gate = GatedForward(demo_model)
    batcher = ForwardBatcher(gate, 0.001, 1000)
    dim = demo_model.model.dims.input_size
    errors: list[BaseException] = []

    def run(length: int) -> None:
        try:
            batcher.run([torch.randn(length, dim)], [0], [0])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    running = threading.Thread(target=run, args=(5,))
    running.start()
    gate.entered.wait(timeout=30)
    queued = threading.Thread(target=run, args=(6,))
    queued.start()
    wait_for(lambda: batcher.pending() == 1, "a queued call")
    closer = threading.Thread(target=batcher.close)
    closer.start()
    queued.join(timeout=30)
    gate.release.set()
    closer.join(timeout=30)
    running.join(timeout=30)
    assert not queued.is_alive() and [type(e).__name__ for e in errors] == ["BatcherClosed"]


def test_waiting_zero_is_no_batcher(demo_model: SenseVoice):
    with pytest.raises(ValueError, match="0 means no batcher"):
        ForwardBatcher(demo_model.forward_rows, 0, 100)


def test_a_non_finite_item_does_not_spill_into_the_rows_beside_it(demo_model: SenseVoice):
    """Huge but finite audio gives non-finite features; batched, they hurt their own rows."""
    dim = demo_model.model.dims.input_size
    generator = torch.Generator().manual_seed(0)
    good = torch.randn(30, dim, generator=generator)
    bad = torch.full((40, dim), float("nan"))
    bad[::3] = float("inf")
    alone, _ = demo_model.forward_rows([good], [0], [0])
    for order in ([good, bad], [bad[:20], good]):  # the bad rows last, and first
        batched, lengths = demo_model.forward_rows(order, [0, 0], [0, 0])
        row = 0 if order[0] is good else 1
        assert lengths[row] == 34
        assert torch.isfinite(batched[row, :34]).all()
        assert torch.allclose(batched[row, :34], alone[0], atol=1e-4)
