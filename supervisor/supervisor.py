"""The supervisor: routes client requests to inference workers and keeps the workers alive.

It never imports torch. Clients talk to its ROUTER frontend, workers to its ROUTER backend
(``sockets.py``); what a client is answered is ``clients.py``. Requests wait in a bounded queue
and go to serving workers (``broker.py``).
A reload swaps the model blue-green (``reload.py``). This file is the loop and the life of a
worker, whose role (``WorkerRole`` in protocol.py) moves like this:

    starting → standby    on Hello, with nothing to load
             → loading    on Hello, given a load to fill serving capacity (so may a standby)
             → warming    on Hello, given the load of a reload: a green (so may a standby)
    loading  → serving    on Ready and the Pong to the health ping that follows
    warming  → serving    the same, once every green of the reload has passed (reload.py)
    serving  → draining   replaced: sent Stop, it finishes the requests in hand and exits

A worker that exits unasked is replaced (backoff on repeated failures); one that stops
answering pings, overstays a deadline or a request's timeout is killed, then replaced.
"""

from __future__ import annotations

import logging
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import zmq

from sensevoice_core.canary import CanaryCheck
from sensevoice_core.exit_codes import EXIT_BOOT_ERROR, EXIT_MODEL_LOAD_ERROR, EXIT_OK
from sensevoice_core.protocol import (
    CACHE_LEVEL_WORDS,
    Hello,
    LoadFailed,
    LoadModel,
    ModelInfo,
    Pong,
    Progress,
    ProtocolError,
    Ready,
    ReloadRequest,
    Stop,
    StreamEvents,
    StreamMoved,
    decode_from_worker,
    request_id_of,
)
from sensevoice_core.settings import Settings
from supervisor.broker import Broker
from supervisor.clients import ClientDesk
from supervisor.reload import BlueGreen, Waiter, describe_model
from supervisor.sockets import (
    StartupError,
    bind_frontend,
    bind_owner_only,
    make_runtime_dir,
)
from supervisor.streams import StreamRouter
from supervisor.watcher import ModelWatcher
from supervisor.workers import (
    Assignment,
    Backoff,
    WorkerHandle,
    WorkerPool,
    describe_exit,
)

__all__ = ["StartupError", "Supervisor"]

logger = logging.getLogger("sensevoice.supervisor")

TICK_S = 0.05  # the loop wakes at least this often to check deadlines
FIRST_LOAD_TIMEOUT_S = 300.0  # a first load may hash and convert a large model
BACKOFF_MAX_S = 30.0
BURST = 100  # messages handled per socket per tick, so one side cannot starve the other
BACKLOG_QUIET_MS = 50  # a worker exited: read its socket until quiet this long, before reaping
BACKLOG_BURSTS = 10


class Supervisor:
    def __init__(self, settings: Settings, canary: CanaryCheck | None = None):
        """canary: SENSEVOICE_RELOAD_CANARY_DIR as checked at start (its size names a
        timed-out reload's likely cause)."""
        self.settings = settings
        self.canary = canary
        self.frontend_address = settings.client_address()
        self.runtime_dir = make_runtime_dir()
        self.backend_address = f"ipc://{self.runtime_dir}/workers.ipc"
        self.context = zmq.Context()
        self.frontend = self.context.socket(zmq.ROUTER)
        self.backend = self.context.socket(zmq.ROUTER)
        self.authenticator = None  # CURVE's ZAP handler, on tcp:// with SENSEVOICE_CURVE_DIR
        self.broker = Broker(settings, self.frontend, self.backend)
        self.pool = WorkerPool(self.backend, self.backend_address, settings.worker_start)
        self.reloads = BlueGreen(self)
        self.clients = ClientDesk(self)
        self.streams = StreamRouter(self)  # live streams (streams.py)
        self.model: ModelInfo | None = None  # what the serving workers run
        self.signals: deque[int] = deque()
        self.watcher: ModelWatcher | None = None
        self.should_exit = False
        self.shutting_down = False
        self.exit_code = EXIT_OK
        self.started_at = time.monotonic()
        self.restarts = 0
        self.backoff = Backoff(BACKOFF_MAX_S)  # serving workers that fail to load
        self.standby_backoff = Backoff(BACKOFF_MAX_S)  # kept apart: never delays serving

    # ----------------------------------------------------------------- the loop

    def run(self) -> int:
        try:
            self.start()
        except BaseException:
            self.close_sockets(frontend_linger=0)
            raise
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        try:
            while not self.should_exit:
                ready = dict(poller.poll(TICK_S * 1000))
                if self.backend in ready:
                    self.read_burst(self.backend, self.handle_worker)
                if self.frontend in ready:
                    self.read_burst(self.frontend, self.clients.handle)
                self.handle_signals()
                self.reloads.take_requests_from_threads()
                self.reap_workers()
                now = time.monotonic()
                self.pool.check_liveness(now)
                self.expire_requests(now)
                self.streams.tick(now)
                self.reloads.check_deadline(now)
                self.manage_workers()
                self.dispatch()
        finally:
            self.shutdown()
        return self.exit_code

    def dispatch(self) -> None:
        self.broker.dispatch(self.pool, frozenset(
            s.worker_id for s in self.streams.streams.values() if s.worker_id))

    def read_burst(self, socket: zmq.Socket, handle: Callable[[list[bytes]], None]) -> None:
        """Handle up to BURST messages waiting on one socket."""
        for _ in range(BURST):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                handle(frames)
            except Exception:  # a bug handling one message must not stop the service
                logger.exception("Unexpected error handling a message; the service goes on "
                                 "(please report this with the lines above)")
                if socket is self.frontend and len(frames) > 1:
                    self.broker.reply_error(frames[0], request_id_of(frames[1]), "internal",
                                            "the supervisor hit an unexpected error with this "
                                            "request; see its log")

    def read_backlog(self) -> None:
        """Read what the workers sent until the backend has been quiet for
        BACKLOG_QUIET_MS (at most BACKLOG_BURSTS bursts)."""
        for _ in range(BACKLOG_BURSTS):
            if not self.backend.poll(BACKLOG_QUIET_MS):
                return
            self.read_burst(self.backend, self.handle_worker)

    # ----------------------------------------------------------------- start and stop

    def start(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.queue_signal)
        self.authenticator = bind_frontend(self.frontend, self.context, self.settings)
        self.backend.setsockopt(zmq.LINGER, 0)
        bind_owner_only(self.backend, self.runtime_dir / "workers.ipc")
        self.pool.start()  # the fork server, when workers are forked
        logger.info("Supervisor listening on %s (%d worker%s, warm standby %s)",
                    self.frontend_address, self.settings.workers,
                    "s" if self.settings.workers > 1 else "",
                    "on" if self.settings.warm_standby else "off")

    def queue_signal(self, signum: int, frame: object) -> None:
        """Signal handler: no logging, no work; the loop handles it."""
        self.signals.append(signum)

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.popleft()
            if signum == signal.SIGHUP:
                logger.info("SIGHUP: reloading the model")
                self.reloads.request(ReloadRequest(origin="cli"), Waiter(None, ""))
            elif not self.should_exit:
                logger.info("%s: stopping", signal.Signals(signum).name)
                self.should_exit = True

    def shutdown(self) -> None:
        """Queued requests fail, workers finish the ones they hold, then everything closes."""
        self.shutting_down = True
        self.broker.fail_queued("shutting_down", "the service is stopping")
        self.streams.shutdown()
        self.reloads.stop()
        if self.watcher is not None:  # after the reload it may be waiting for is answered
            self.watcher.stop()
        for worker in self.pool:
            if worker.role in ("serving", "draining", "standby"):
                self.pool.send(worker, Stop())
            else:
                worker.kill("the service is stopping")  # importing or loading: nothing to finish
        deadline = time.monotonic() + self.settings.drain_timeout
        while any(w.process.poll() is None for w in self.pool):
            if time.monotonic() > deadline:
                break
            if self.backend.poll(TICK_S * 1000):
                self.read_burst(self.backend, self.handle_worker)
            if self.frontend.poll(0):
                self.read_burst(self.frontend, self.clients.handle)
        self.read_backlog()
        self.streams.stopped()
        for worker in self.pool:
            self.broker.fail_held(worker, "shutting_down",
                                  "the service stopped before this request finished")
        self.pool.kill_all(f"still running {self.settings.drain_timeout:g} s after the stop")
        self.close_sockets(frontend_linger=500)
        if self.frontend_address.startswith("ipc://"):
            Path(self.frontend_address[len("ipc://"):]).unlink(missing_ok=True)
        logger.info("Supervisor stopped")

    def close_sockets(self, frontend_linger: int) -> None:
        self.frontend.close(linger=frontend_linger)
        self.backend.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()
        self.context.term()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    # ----------------------------------------------------------------- workers

    def handle_worker(self, frames: list[bytes]) -> None:
        worker = self.pool.get(frames[0].decode(errors="replace"))
        if worker is None:
            return  # a retired worker's last words
        try:
            message, payload = decode_from_worker(frames[1:])
        except ProtocolError as e:
            job_id = request_id_of(frames[1]) if len(frames) > 1 else None
            logger.error("Malformed message from worker %s (pid %s)%s: %s", worker.worker_id,
                         worker.pid, f" answering request {job_id}" if job_id else "", e)
            self.broker.unreadable_reply(worker, job_id, str(e))
            return
        worker.unanswered_pings = 0  # any message shows it is alive
        if isinstance(message, Hello):
            worker.start_s = time.monotonic() - worker.spawned_at
            if worker.assignment is None:
                worker.role = "standby"
                self.standby_backoff.reset()
            else:
                self.send_load(worker, worker.assignment)
        elif isinstance(message, Ready):
            worker.model = message.model
            worker.health_ping = self.pool.ping(worker)  # the check before traffic
        elif isinstance(message, Pong):
            worker.threads, worker.batches, worker.batch_items = \
                message.threads, message.batches, message.batch_items
            if message.nonce == worker.health_ping:
                worker.health_ping = None
                self.worker_checked(worker)
        elif isinstance(message, LoadFailed):
            worker.load_error = message.error  # it exits next; reap_workers reports it
            worker.canary = message.canary
        elif isinstance(message, Progress):
            self.broker.progress(worker, message)
        elif isinstance(message, (StreamEvents, StreamMoved)):
            self.streams.from_worker(worker, message, payload)
        else:
            self.broker.finish(worker, message)

    def send_load(self, worker: WorkerHandle, assignment: Assignment) -> None:
        worker.assignment = assignment
        if self.reloads.is_green(worker):
            worker.role = "warming"  # bounded by the reload's deadline
        else:
            worker.role = "loading"
            worker.deadline = time.monotonic() + (
                FIRST_LOAD_TIMEOUT_S if self.model is None else
                max(self.settings.hotreload_timeout, 60.0))
        canary = self.reloads.is_green(worker) and self.settings.reload_canary_dir is not None
        self.pool.send(worker, LoadModel(path=assignment.path, force_fresh=assignment.force_fresh,
                                         canary=canary))

    def worker_checked(self, worker: WorkerHandle) -> None:
        """It said Ready and answered the ping that followed: it may take traffic."""
        if worker.role == "warming":
            self.reloads.green_passed(worker)
        elif worker.role == "loading":
            self.start_serving(worker)

    def start_serving(self, worker: WorkerHandle) -> None:
        """A worker that filled serving capacity (first start, or a replacement)."""
        model = worker.model
        assert model is not None
        worker.role, worker.idle_since = "serving", time.monotonic()
        self.backoff.reset()
        if self.model is not None:
            logger.info("Worker %s (pid %s) serving %s", worker.worker_id, worker.pid,
                        describe_model(model))
        self.serve_model(model)

    def serve_model(self, model: ModelInfo) -> None:
        """The serving workers run this model now (a first load, a replacement, or a reload's
        switch); the first model also starts the file watcher."""
        first = self.model is None
        self.model = model
        if first:
            logger.info("Serving model %s, loaded in %.2f s via %s", describe_model(model),
                        model.load_s, CACHE_LEVEL_WORDS[model.cache_level])
            self.start_watcher()

    def drain_worker(self, worker: WorkerHandle) -> None:
        """No new work; finish the requests in hand, then exit (the worker drains on Stop)."""
        worker.role = "draining"
        worker.deadline = time.monotonic() + self.settings.drain_timeout
        self.pool.send(worker, Stop())
        self.streams.worker_draining(worker)

    def reap_workers(self) -> None:
        if any(w.process.poll() is not None for w in self.pool):
            self.read_backlog()  # its last words (a StreamMoved, a reply) before its end
        for worker, code in self.pool.reap():
            self.worker_exited(worker, code)
        job = self.reloads.job
        for old_id, new_id in self.pool.take_renamed():  # a lost fork's worker, spawned
            if job is not None and old_id in job.green:
                job.green.discard(old_id)
                job.green.add(new_id)

    def expire_requests(self, now: float) -> None:
        """Fail requests past SENSEVOICE_REQUEST_TIMEOUT: queued ones, and running ones, whose
        worker is then replaced."""
        for worker in self.pool:
            if worker.process.poll() is None and not worker.killed and \
                    self.broker.expire_running(worker, now):
                timeout = self.settings.request_timeout
                logger.error("Worker %s (pid %s) spent %.0f s on one request; replacing it",
                             worker.worker_id, worker.pid, timeout)
                worker.kill(f"spent {timeout:g} s on one request")
        self.broker.expire_queued(now)

    def worker_exited(self, worker: WorkerHandle, code: int) -> None:
        how = f"was killed: {worker.kill_reason}" if worker.killed else describe_exit(code)
        cause = worker.load_error or how
        self.streams.worker_lost(worker, how)
        # A drain past its deadline is the supervisor's doing: its requests are not suspects.
        self.broker.requeue(worker, f"worker {worker.worker_id} (pid {worker.pid}) {how}",
                            retry=not self.shutting_down,
                            suspect=not (worker.killed and worker.role == "draining"))
        if worker.role == "draining" or self.shutting_down or self.should_exit:
            logger.info("Worker %s (pid %s) %s", worker.worker_id, worker.pid,
                        how if worker.killed else "drained and exited")
        elif self.reloads.is_green(worker):
            self.reloads.green_exited(worker, cause)
        elif worker.role == "serving":
            self.restarts += 1
            logger.warning("Worker %s (pid %s) %s; replacing it", worker.worker_id, worker.pid,
                           how)
        elif worker.role in ("starting", "loading") and worker.assignment is not None:
            if self.model is None and self.reloads.job is None:  # the first load: give up
                if code == EXIT_BOOT_ERROR:
                    logger.error("Cannot start: the inference worker %s; see its error above",
                                 cause)
                else:
                    logger.error("Cannot start: the model did not load: %s. Fix the model "
                                 "directory (python -m sensevoice_core doctor) and start again",
                                 cause)
                self.should_exit, self.exit_code = True, EXIT_MODEL_LOAD_ERROR
                return
            self.backoff.fail()
            logger.error("Worker %s (pid %s) could not load %s: %s; retrying in %.0f s",
                         worker.worker_id, worker.pid, worker.assignment.path, cause,
                         self.backoff.delay_s)
        else:
            self.standby_backoff.fail()
            logger.warning("Standby worker %s (pid %s) %s; next one in %.0f s", worker.worker_id,
                           worker.pid, how, self.standby_backoff.delay_s)

    def manage_workers(self) -> None:
        """Keep SENSEVOICE_WORKERS serving (outside reloads) and one warm standby."""
        if self.shutting_down or self.should_exit or self.reloads.job is not None:
            return
        if self.pool.fork_server.first_start:
            return  # the first worker is forked once it is ready (meanwhile: status answered)
        now = time.monotonic()
        try:
            if now >= self.backoff.until:
                self.fill_serving()
            if (self.settings.warm_standby and self.model is not None
                    and now >= self.standby_backoff.until
                    and not self.pool.in_roles("standby", "draining", "loading")
                    and not any(w.assignment is None for w in self.pool.in_roles("starting"))):
                standby = self.pool.spawn(None)
                logger.debug("Spawned warm standby %s (%s)", standby.worker_id,
                             f"pid {standby.pid}" if standby.pid else "being forked")
        except OSError as e:  # fork/exec failed: out of processes or memory
            self.backoff.fail()
            self.standby_backoff.fail()
            logger.error("Cannot start a worker process: %s; retrying in %.0f s", e,
                         self.backoff.delay_s)

    def fill_serving(self) -> None:
        serving = len(self.pool.in_roles("serving"))
        filling = sum(w.assignment is not None for w in self.pool.in_roles("starting", "loading"))
        path = self.model.model_dir if self.model else (
            str(self.settings.model_dir) if self.settings.model_dir else None)
        for _ in range(self.settings.workers - serving - filling):
            assignment = Assignment(path, force_fresh=False)
            standby = self.pool.idle_standby()
            if standby is None:
                self.pool.spawn(assignment)
            else:
                self.send_load(standby, assignment)

    def start_watcher(self) -> None:
        if self.settings.enable_file_watch and self.watcher is None:
            self.watcher = ModelWatcher(self.reloads.request_from_thread, lambda: self.model,
                                        self.settings.watch_quiet_s)
            self.watcher.start()
