"""Cross-request batching: the forward passes of concurrent callers run as one padded batch.

Every decode goes through ``SenseVoice.logits``; with a ``ForwardBatcher`` attached
(``SenseVoice.batcher``) its items (feature matrices, each with its own language and
text-norm query row) join a queue shared by every thread using that model, and one batcher
thread runs them:

- when other callers are active in the worker (``callers``: the requests and the stream
  thread it holds, beyond those already queued), it waits until the oldest queued item is
  ``wait_s`` old, or until the queue holds a full batch; a lone caller never waits;
- it takes the oldest item, then the next ones in arrival order that fit the budget
  (``max_frames`` padded frames: longest x count) and whose length is within LENGTH_RATIO of
  every other item's in the pass (so padding wastes at most about half a pass), skipping
  those that do not (they keep their place); so items are served in arrival order across
  callers and one call's items may be split across passes. A call's items left over from a
  pass go to the back of the queue, so a short call that arrives while a long one is decoded
  waits for about one pass (the one running, at most ``max_frames``), whatever the long
  call's size. A long transcription also submits one batch of its pieces at a time
  (long_audio.decode_pieces);
- it runs them length-sorted as one forward pass and hands each caller its own rows.

A pass that raises (out of memory) is run again caller by caller, so that a call that fails
fails alone, and its items still queued are dropped. Each layer treats a row on its own and
padded frames are masked out of the attention and the memory block, so the text, tags and
timings of a call batched equal those of the call run alone, except at near-ties of the
frame argmax: GEMMs and convolutions of another shape sum in another order, so logits (and
avg_logprob) may differ in the last bits (measured: 3 of 8 demo clips bit-exact, 8 of 8 the
same argmax).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sensevoice_core.protocol import MAX_REQUESTS_PER_WORKER
from sensevoice_core.settings import Settings

if TYPE_CHECKING:  # torch-free at import: the supervisor reads max_requests from here
    from torch import Tensor

logger = logging.getLogger("sensevoice.batching")

Forward = Callable[[list["Tensor"], Sequence[int], Sequence[int]], tuple["Tensor", "Tensor"]]
"""forward(features, language_rows, text_norm_rows) -> (logits (B, 4 + T, V), lengths (B,)):
one padded pass over a batch (SenseVoice.forward_rows)."""

LENGTH_RATIO = 2.0
"""A pass holds items whose lengths are within this ratio of each other (see SHORT_FRAMES)."""
SHORT_FRAMES = 32
"""Items shorter than this (about 2 s of features) count as this long for LENGTH_RATIO:
padding them costs little, and they may share a pass with any short item."""


def max_requests(settings: Settings) -> int:
    """The requests one worker holds at once: SENSEVOICE_MAX_BATCH_REQUESTS with batching on,
    MAX_REQUESTS_PER_WORKER (one, and a second beside a long one) with it off. The worker
    sizes its compute threads by it, the supervisor's broker dispatches up to it."""
    return settings.max_batch_requests if settings.batch_wait_ms > 0 else MAX_REQUESTS_PER_WORKER


@dataclass
class _Call:
    """One caller's items, and what it waits for."""

    rows: list[Tensor | None]
    error: BaseException | None = None
    remaining: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self, index: int, rows: Tensor) -> None:
        if self.error is not None:
            return  # already failed: its other rows are not wanted
        self.rows[index] = rows
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


@dataclass(frozen=True)
class _Item:
    call: _Call
    index: int  # in its call
    features: Tensor  # (frames, input_size)
    language_row: int
    text_norm_row: int
    arrived: float

    @property
    def frames(self) -> int:
        return int(self.features.shape[0])


class BatcherClosed(RuntimeError):
    """The batcher was closed while a call waited (the worker is exiting)."""


class ForwardBatcher:
    """Runs the forward passes of all threads sharing a model, batched (see the module)."""

    def __init__(self, forward: Forward, wait_s: float, max_frames: int,
                 threads: int | None = None, callers: Callable[[], int] | None = None):
        """threads: torch's intra-op threads for the passes (the batcher thread's own
        setting; see _serve); None: whatever the process has when the thread starts.
        callers: how many callers may submit now (the worker's requests in hand, plus one for
        its stream thread); a pass waits wait_s only for callers beyond those queued. None:
        always wait."""
        if wait_s <= 0:
            raise ValueError(f"wait_s must be positive (0 means no batcher), not {wait_s}")
        self._forward = forward
        self._callers = callers
        self._threads = threads
        self.wait_s = wait_s
        self.max_frames = max(1, max_frames)
        self._queue: deque[_Item] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self.batches = 0  # forward passes run
        self.batch_items = 0  # items in them
        self._thread = threading.Thread(target=self._serve, name="batcher", daemon=True)
        self._thread.start()

    def run(self, features: Sequence[Tensor], language_rows: Sequence[int],
            text_norm_rows: Sequence[int]) -> list[Tensor]:
        """Each item's logits, (4 + its frames, vocab), once the passes holding them ran."""
        if not features:
            return []
        call = _Call([None] * len(features), remaining=len(features))
        now = time.monotonic()
        with self._condition:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            self._queue.extend(_Item(call, index, item, language, text_norm, now)
                               for index, (item, language, text_norm)
                               in enumerate(zip(features, language_rows, text_norm_rows,
                                                strict=True)))
            self._condition.notify()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return [rows for rows in call.rows if rows is not None]

    def pending(self) -> int:
        """Items queued for a pass, not yet taken."""
        with self._condition:
            return len(self._queue)

    def close(self) -> None:
        """Stop the batcher thread; calls still queued fail with BatcherClosed."""
        with self._condition:
            self._closed = True
            stranded = list(self._queue)
            self._queue.clear()
            self._condition.notify()
        for item in stranded:
            item.call.fail(BatcherClosed("the batcher was closed"))
        self._thread.join(timeout=5)

    # ----------------------------------------------------------------- the batcher thread

    def _serve(self) -> None:
        if self._threads is not None:
            import torch  # here: importing this module must not import torch (max_requests)

            # Per thread under OpenMP: the callers' threads may run with fewer (a worker's
            # compute threads run with one, so that no second thread team spins beside the
            # passes' on the same cores).
            torch.set_num_threads(self._threads)
        while True:
            with self._condition:
                while not self._queue and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
                while not self._closed and not self._full() and self._others_coming():
                    left = self._queue[0].arrived + self.wait_s - time.monotonic()
                    if left <= 0:
                        break
                    self._condition.wait(left)
                if self._closed:
                    return
                batch = self._take()
            self._run(batch)

    def _others_coming(self) -> bool:
        """Whether a caller that has not queued yet may still join this pass."""
        if self._callers is None:
            return True
        return self._callers() > len({id(item.call) for item in self._queue})

    def _full(self) -> bool:
        """Whether the queue alone fills a pass: waiting longer would add nothing to it."""
        longest = count = 0
        for item in self._queue:
            longest, count = max(longest, item.frames), count + 1
            if longest * count >= self.max_frames:
                return True
        return False

    def _take(self) -> list[_Item]:
        """The oldest item, then the next ones in arrival order that fit the budget and the
        length ratio."""
        head = self._queue.popleft()
        batch, kept = [head], deque[_Item]()
        longest = shortest = head.frames
        while self._queue:
            item = self._queue.popleft()
            high, low = max(longest, item.frames), min(shortest, item.frames)
            if high * (len(batch) + 1) <= self.max_frames and \
                    high <= LENGTH_RATIO * max(low, SHORT_FRAMES):
                batch.append(item)
                longest, shortest = high, low
            else:
                kept.append(item)
        # The rest of a call that has a pass now queues behind the calls that have none.
        served = {id(item.call) for item in batch}
        self._queue = deque(item for item in kept if id(item.call) not in served)
        self._queue.extend(item for item in kept if id(item.call) in served)
        return sorted(batch, key=lambda item: item.frames)

    def _run(self, batch: list[_Item]) -> None:
        self.batches += 1
        self.batch_items += len(batch)
        try:
            self._deliver(batch, self._pass(batch))
            return
        except BaseException as e:  # noqa: BLE001 - handed to the callers, never lost
            error = e
        calls = list({id(item.call): item.call for item in batch}.values())
        if len(calls) == 1:
            self._fail(calls[0], error)
            return
        logger.warning("a batched forward pass of %d calls failed (%s: %s); running them one "
                       "by one", len(calls), type(error).__name__, error)
        for call in calls:
            own = [item for item in batch if item.call is call]
            try:
                self._deliver(own, self._pass(own))
            except BaseException as e:  # noqa: BLE001
                self._fail(call, e)

    def _fail(self, call: _Call, error: BaseException) -> None:
        """Fail a call, and drop its items still queued: nobody waits for their rows."""
        with self._condition:
            self._queue = deque(item for item in self._queue if item.call is not call)
        call.fail(error)

    def _pass(self, batch: list[_Item]) -> list[Tensor]:
        logits, lengths = self._forward([item.features for item in batch],
                                        [item.language_row for item in batch],
                                        [item.text_norm_row for item in batch])
        # Copies: a view would keep the whole pass's logits alive until its caller woke.
        return [logits[row, :length].clone() for row, length in enumerate(lengths.tolist())]

    @staticmethod
    def _deliver(batch: list[_Item], rows: list[Tensor]) -> None:
        for item, item_rows in zip(batch, rows, strict=True):
            item.call.finish(item.index, item_rows)
