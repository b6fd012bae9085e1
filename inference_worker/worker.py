"""One inference worker: loads a model when told, then serves transcriptions one at a time.

Life of a worker: connect to the supervisor's backend and say Hello (torch is already
imported and its first construction paid: a warm standby), wait for LoadModel, load through
the cache (L2 first), transcribe the bundled clip as a warm-up (which also loads the VAD),
announce Ready with the model's fingerprint and load report, then answer Transcribe and Ping
until Stop. Without batching (SENSEVOICE_BATCH_WAIT_MS=0) a worker holds at most
MAX_REQUESTS_PER_WORKER requests (the supervisor gives it a second one only beside a long
one); with batching, up to SENSEVOICE_MAX_BATCH_REQUESTS: each compute thread reads, VADs and
post-processes its own request, and their forward passes (and the live streams') run batched
on the model's one batcher thread (sensevoice_core.batching). After Stop it finishes and
answers the requests it holds, then exits: that is the drain.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import zmq

from inference_worker.streams import StreamSessions
from sensevoice_core.batching import max_requests
from sensevoice_core.exit_codes import EXIT_MODEL_LOAD_ERROR, EXIT_OK
from sensevoice_core.linux import PR_SET_PDEATHSIG, prctl
from sensevoice_core.long_audio import ProgressCallback
from sensevoice_core.model import SenseVoiceSmall
from sensevoice_core.pipeline import SenseVoice
from sensevoice_core.protocol import (
    HEARTBEAT_INTERVAL_S,
    MAX_REPLY_HEADER_BYTES,
    SUPERVISOR_SILENCE_S,
    ErrorReply,
    Hello,
    LoadFailed,
    LoadModel,
    MiB,
    Ping,
    Pong,
    Progress,
    ProtocolError,
    Ready,
    Stop,
    StreamAudio,
    StreamControl,
    StreamOpen,
    StreamResume,
    TranscribeReply,
    TranscribeRequest,
    decode_for_worker,
    encode,
)
from sensevoice_core.random_model import random_model, small_dims
from sensevoice_core.result import Segment
from sensevoice_core.serving import LoadFailure, answer, attach_batcher, load_for_serving
from sensevoice_core.settings import Settings

logger = logging.getLogger("sensevoice.worker")

def prewarm() -> None:
    """Pay the first-use costs (meta construction, kernels, thread pool) before any model."""
    SenseVoiceSmall(small_dims(), device="meta")
    model = random_model(small_dims())
    features = torch.randn(1, 50, model.dims.input_size)
    rows = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        model(features, torch.tensor([50]), rows, rows)


class InferenceWorker:
    """The I/O thread answers the supervisor at once (pongs included); transcriptions run on
    compute threads, so a long request never silences the heartbeat, and a worker that stops
    answering pings is hung (or stopped) whatever it was doing."""

    def __init__(self, worker_id: str, backend: str, settings: Settings):
        self.worker_id = worker_id
        self.backend = backend
        self.settings = settings
        self.model: SenseVoice | None = None
        self.fingerprint = ""
        self.stop_requested = False
        self.in_flight: set[str] = set()  # request ids on the compute threads
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, worker_id.encode())
        self.socket.setsockopt(zmq.LINGER, 1000)  # let the last reply leave before exit
        # Compute threads hand finished replies to the I/O thread through this socket.
        self.results_address = f"inproc://results-{worker_id}"
        self.results = self.context.socket(zmq.PULL)
        self.results.bind(self.results_address)
        self.threads = torch.get_num_threads()  # set by __main__ (pick_threads)
        # With batching the forward passes run on the batcher thread, with self.threads; the
        # compute threads' own work (audio decoding, VAD, features, greedy decoding) runs on
        # one thread each: an OpenMP team of their own would spin beside the passes' and,
        # on a 2-core box, cost a lone request ~40% of its latency (OMP_WAIT_POLICY=PASSIVE
        # closes the gap, which shows it is spinning).
        self.compute = ThreadPoolExecutor(
            max_requests(settings), thread_name_prefix="compute",
            initializer=torch.set_num_threads if settings.batch_wait_ms > 0 else None,
            initargs=(1,) if settings.batch_wait_ms > 0 else ())
        self.local = threading.local()
        self.pushers: list[zmq.Socket] = []
        self.pushers_lock = threading.Lock()
        self.streams = StreamSessions(self)  # live streams, on their own thread

    def run(self) -> int:
        self.socket.connect(self.backend)
        self.send(Hello(worker_id=self.worker_id, pid=os.getpid()))
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.results, zmq.POLLIN)
        last_heard = time.monotonic()
        try:
            while not (self.stop_requested and not self.in_flight and not self.streams.held()):
                if self.stop_requested:
                    self.streams.drain()  # once: each stream moves between two turns
                ready = dict(poller.poll(HEARTBEAT_INTERVAL_S * 1000))
                if self.results in ready:
                    self.forward_results()
                if self.socket not in ready:
                    if (not self.in_flight
                            and time.monotonic() - last_heard > SUPERVISOR_SILENCE_S):
                        logger.warning("supervisor silent for %.0f s; exiting",
                                       SUPERVISOR_SILENCE_S)
                        return EXIT_OK
                    continue
                frames = self.socket.recv_multipart()
                code = self.handle(frames)
                if code is not None:
                    return code
                last_heard = time.monotonic()
            self.forward_results()  # a stream's last message, pushed just before it was let go
            step_aside()
            return EXIT_OK
        finally:
            self.streams.close()
            self.compute.shutdown(wait=False, cancel_futures=True)
            for pusher in self.pushers:
                pusher.close(linger=0)
            self.results.close(linger=0)
            self.socket.close()
            self.context.term()

    def handle(self, frames: list[bytes]) -> int | None:
        """Act on one message; an exit code means the worker is done."""
        try:
            message, payload = decode_for_worker(frames)
        except ProtocolError as e:
            logger.error("ignoring a malformed message from the supervisor: %s", e)
            return None
        if isinstance(message, Ping):
            batcher = self.model.batcher if self.model is not None else None
            self.send(Pong(nonce=message.nonce, threads=self.threads,
                           batches=batcher.batches if batcher else 0,
                           batch_items=batcher.batch_items if batcher else 0))
        elif isinstance(message, TranscribeRequest):
            self.in_flight.add(message.request_id)
            self.compute.submit(self.compute_reply, message, payload or b"")
        elif isinstance(message, (StreamOpen, StreamResume)):
            self.streams.open(message, payload)
        elif isinstance(message, (StreamAudio, StreamControl)):
            self.streams.add(message, payload or b"")
        elif isinstance(message, LoadModel):
            return self.load(message)
        elif isinstance(message, Stop):
            # Requests already here are finished and answered first: that is the drain.
            logger.info("stopping (%d request%s to finish, %d stream%s to move)",
                        len(self.in_flight), "" if len(self.in_flight) == 1 else "s",
                        self.streams.held(), "" if self.streams.held() == 1 else "s")
            self.stop_requested = True
        return None

    def compute_reply(self, request: TranscribeRequest, payload: bytes) -> None:
        """On a compute thread: transcribe, then hand the encoded reply to the I/O thread."""
        try:
            frames = reply_frames(self.transcribe(request, payload))
        except BaseException as e:  # noqa: BLE001 - the request must be answered whatever happens
            logger.exception("Request %s failed", request.request_id)
            frames = encode(ErrorReply(request_id=request.request_id, code="internal",
                                       message=f"the worker failed on this request: "
                                               f"{type(e).__name__}"))
        self.push(frames, finished=request.request_id)

    def push(self, frames: list[bytes], finished: str | None = None) -> None:
        """From any thread: send frames to the supervisor through the I/O thread. finished
        names the request these frames answer for good (a reply), None for anything else
        (progress, stream events)."""
        pusher = getattr(self.local, "pusher", None)
        if pusher is None:
            pusher = self.context.socket(zmq.PUSH)
            pusher.setsockopt(zmq.LINGER, 0)
            pusher.connect(self.results_address)
            self.local.pusher = pusher
            with self.pushers_lock:
                self.pushers.append(pusher)
        pusher.send_multipart([(finished or "").encode(), *frames])

    def forward_results(self) -> None:
        while True:
            try:
                finished, *frames = self.results.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if finished:
                self.in_flight.discard(finished.decode())
            self.socket.send_multipart(frames)

    def callers(self) -> int:
        """Threads that may submit forward passes now: each request in hand, and the stream
        thread while it holds a stream. Read from the batcher thread without the streams'
        lock (a dict's length), so that no lock order ties the two threads."""
        return len(self.in_flight) + (1 if self.streams.sessions else 0)

    def load(self, request: LoadModel) -> int | None:
        try:
            loaded = load_for_serving(request.path, request.force_fresh, self.settings,
                                      request.canary)
        except LoadFailure as e:
            if e.canary is not None:
                logger.error("not ready: %s", e.cause)
            else:
                logger.error("cannot load model %s: %s", request.path or "(default)", e.cause)
            self.send(LoadFailed(worker_id=self.worker_id, error=e.cause, canary=e.canary))
            return EXIT_MODEL_LOAD_ERROR
        attach_batcher(loaded.model, self.settings, self.threads, self.callers)
        self.model, self.fingerprint = loaded.model, loaded.report.fingerprint
        self.send(Ready(worker_id=self.worker_id, pid=os.getpid(), model=loaded.info))
        return None

    def transcribe(self, request: TranscribeRequest, payload: bytes) -> TranscribeReply | ErrorReply:
        if self.model is None:
            return ErrorReply(request_id=request.request_id, code="unavailable",
                              message="this worker has no model loaded")
        return answer(self.model, self.fingerprint, request, payload, self.settings,
                      self.progress_sender(request))

    def progress_sender(self, request: TranscribeRequest) -> ProgressCallback | None:
        """When the request asks for progress: a callback that sends each step as a Progress
        message (the request stays in flight until its reply)."""
        if not request.progress:
            return None

        def send_progress(done: int, total: int, segment: Segment | None) -> None:
            self.push(encode(Progress(request_id=request.request_id, done=done, total=total,
                                      segment=segment)))

        return send_progress

    def send(self, message: Ready | Hello | LoadFailed | Pong) -> None:
        self.socket.send_multipart(encode(message))

    def request_stop(self, signum: int, frame: object) -> None:
        """SIGTERM: finish the request in hand, then exit."""
        self.stop_requested = True


def reply_frames(reply: TranscribeReply | ErrorReply) -> list[bytes]:
    """The encoded reply, or an error for this request alone when it is too large to send."""
    frames = encode(reply)
    # The supervisor puts the client's request id (up to 64 characters) in place of its own.
    if len(frames[0]) + 64 <= MAX_REPLY_HEADER_BYTES:
        return frames
    logger.error("Request %s: the result is %.1f MiB, over the %d MiB a reply may carry",
                 reply.request_id, len(frames[0]) / MiB, MAX_REPLY_HEADER_BYTES // MiB)
    return encode(ErrorReply(
        request_id=reply.request_id, code="internal",
        message=f"the result is {len(frames[0]) / MiB:.1f} MiB, over the "
                f"{MAX_REPLY_HEADER_BYTES // MiB} MiB a reply may carry; send shorter audio"
                + (" or ask without word timestamps" if isinstance(reply, TranscribeReply)
                   and any(s.tokens for s in reply.segments) else "")))


def step_aside() -> None:
    """Tear down at idle CPU priority: unmapping a model and freeing its memory takes a core
    for a second or more, which the worker that replaced this one needs for its requests."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass


def die_with_parent(parent_pid: int) -> None:
    """Linux: get SIGTERM when the supervisor dies, however it dies (no orphans)."""
    if prctl(PR_SET_PDEATHSIG, signal.SIGTERM) is not None:
        return  # not Linux/glibc: the worker still exits when the supervisor goes silent
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)  # the parent died before prctl took effect

