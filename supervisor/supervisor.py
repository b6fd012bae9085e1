"""The supervisor: routes client requests to inference workers and swaps models blue-green.

It never imports torch. Clients talk to its ROUTER frontend, workers to its ROUTER backend.
Requests wait in a bounded queue (``broker.py``); a worker serves one at a time, and a second
one beside a request that runs long. A reload loads the new model in a warm standby (or a fresh
worker), checks it with a ping once it has warmed up, then moves traffic to it and lets the old
worker finish its requests and exit.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter, deque
from pathlib import Path

import zmq

from sensevoice_core.exit_codes import EXIT_BOOT_ERROR
from sensevoice_core.protocol import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_LIVENESS,
    SPAWN_TIMEOUT_S,
    ErrorCode,
    Hello,
    LoadFailed,
    LoadModel,
    ModelInfo,
    Ping,
    Pong,
    ProtocolError,
    Ready,
    ReloadOutcome,
    ReloadReply,
    ReloadRequest,
    ServiceStatus,
    StatusReply,
    StatusRequest,
    Stop,
    TranscribeRequest,
    WorkerStatus,
    decode_client,
    decode_from_worker,
    encode,
    request_id_of,
)
from sensevoice_core.curve import CurveKeyError
from sensevoice_core.processes import pid_alive
from sensevoice_core.settings import Settings
from supervisor.broker import Broker
from supervisor.reload import (
    ReloadJob,
    ReloadRefused,
    Waiter,
    check_reload_path,
    describe_model,
    failure_line,
    success_line,
)
from supervisor.watcher import ModelWatcher
from supervisor.workers import (
    Assignment,
    Backoff,
    WorkerHandle,
    describe_exit,
    spawn_worker_process,
)

logger = logging.getLogger("sensevoice.supervisor")

TICK_S = 0.05  # the loop wakes at least this often to check deadlines
FIRST_LOAD_TIMEOUT_S = 300.0  # a first load may hash and convert a large model
BACKOFF_MAX_S = 30.0
BURST = 100  # messages handled per socket per tick, so one side cannot starve the other
RUNTIME_PREFIX = "sensevoice-"  # /tmp/sensevoice-<supervisor pid>-*: the workers' socket
RUNTIME_NAME = re.compile(r"sensevoice-(\d+)-[a-z0-9_]{8}")  # as tempfile.mkdtemp names it


class StartupError(RuntimeError):
    """The supervisor cannot start (address in use, first model does not load)."""


class Supervisor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.frontend_address = settings.client_address()
        remove_stale_runtime_dirs()
        self.runtime_dir = Path(tempfile.mkdtemp(prefix=f"{RUNTIME_PREFIX}{os.getpid()}-"))
        self.authenticator = None  # CURVE's ZAP handler, on tcp:// with SENSEVOICE_CURVE_DIR
        self.backend_address = f"ipc://{self.runtime_dir}/workers.ipc"
        self.context = zmq.Context()
        self.frontend = self.context.socket(zmq.ROUTER)
        self.backend = self.context.socket(zmq.ROUTER)
        self.broker = Broker(settings, self.frontend, self.backend)
        self.workers: dict[str, WorkerHandle] = {}
        self.exiting: list = []  # processes retired but not yet reaped
        self.model: ModelInfo | None = None  # what the serving workers run
        self.reload: ReloadJob | None = None
        self.next_reload: ReloadJob | None = None
        self.last_reload: ReloadOutcome | None = None
        self.reload_counts: Counter[str] = Counter()  # outcome -> count, for /metrics
        self.signals: deque[int] = deque()
        # From the watcher's thread: a reload to request, and the event to set when it is over.
        self.watch_reloads: deque[tuple[ReloadRequest, threading.Event]] = deque()
        self.watcher: ModelWatcher | None = None
        self.should_exit = False
        self.shutting_down = False
        self.exit_code = 0
        self.started_at = time.monotonic()
        self.spawned = 0
        self.restarts = 0
        self.backoff = Backoff(BACKOFF_MAX_S)  # serving workers that fail to load
        self.standby_backoff = Backoff(BACKOFF_MAX_S)  # kept apart: never delays serving

    # ----------------------------------------------------------------- the loop

    def run(self) -> int:
        try:
            self.start()
        except BaseException:
            self.frontend.close(linger=0)
            self.backend.close(linger=0)
            if self.authenticator is not None:
                self.authenticator.stop()
            self.context.term()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            raise
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        try:
            while not self.should_exit:
                ready = dict(poller.poll(TICK_S * 1000))
                if self.backend in ready:
                    self.drain(self.backend, self.handle_worker)
                if self.frontend in ready:
                    self.drain(self.frontend, self.handle_client)
                self.handle_signals()
                self.reap_workers()
                self.check_health()
                try:
                    self.manage_workers()
                except OSError as e:  # fork/exec failed: out of processes or memory
                    self.backoff.fail()
                    self.standby_backoff.fail()
                    logger.error("Cannot start a worker process: %s; retrying in %.0f s", e,
                                 self.backoff.delay_s)
                self.broker.dispatch(self.workers.values())
        finally:
            self.shutdown()
        return self.exit_code

    def drain(self, socket: zmq.Socket, handle) -> None:
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
                    self.reply_error(frames[0], request_id_of(frames[1]), "internal",
                                     "the supervisor hit an unexpected error with this request; "
                                     "see its log")

    # ----------------------------------------------------------------- start and stop

    def start(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.queue_signal)
        self.bind_frontend()
        self.backend.setsockopt(zmq.LINGER, 0)
        bind_owner_only(self.backend, Path(self.backend_address[len("ipc://"):]))
        logger.info("Supervisor listening on %s (%d worker%s, warm standby %s)",
                    self.frontend_address, self.settings.workers,
                    "s" if self.settings.workers > 1 else "",
                    "on" if self.settings.warm_standby else "off")

    def bind_frontend(self) -> None:
        address = self.frontend_address
        self.frontend.setsockopt(zmq.LINGER, 500)
        max_bytes = int(self.settings.max_request_mb * 1024 * 1024)
        # A hard cap well above the limit: larger frames are dropped by ZeroMQ before they
        # can fill memory; those between the limit and the cap get a "too_large" reply.
        self.frontend.setsockopt(zmq.MAXMSGSIZE, 2 * max_bytes + (1 << 20))
        keys = self.settings.curve_keys(address)
        if keys is not None:
            try:
                self.authenticator = keys.secure_server(self.frontend)
            except CurveKeyError as e:
                raise StartupError(str(e)) from None
        if not address.startswith("ipc://"):
            try:
                self.frontend.bind(address)
            except zmq.ZMQError as e:
                raise StartupError(f"cannot listen on {address}: {e}; set "
                                   f"SENSEVOICE_SUPERVISOR_ADDRESS to a free address") from None
            return
        path = Path(address[len("ipc://"):])
        if path.exists():
            if supervisor_answers(self.context, address):
                raise StartupError(f"another supervisor is already serving at {address}; "
                                   f"stop it or set SENSEVOICE_SUPERVISOR_ADDRESS")
            path.unlink()  # left by a supervisor that was killed
        try:
            bind_owner_only(self.frontend, path)
        except (zmq.ZMQError, OSError) as e:
            raise StartupError(f"cannot listen on {address}: {e}; set "
                               f"SENSEVOICE_SUPERVISOR_ADDRESS to a free address") from None

    def queue_signal(self, signum: int, frame: object) -> None:
        """Signal handler: no logging, no work; the loop handles it."""
        self.signals.append(signum)

    def handle_signals(self) -> None:
        while self.watch_reloads:
            request, done = self.watch_reloads.popleft()
            self.request_reload(request, Waiter(None, "", done))
        while self.signals:
            signum = self.signals.popleft()
            if signum == signal.SIGHUP:
                logger.info("SIGHUP: reloading the model")
                self.request_reload(ReloadRequest(origin="cli"), Waiter(None, ""))
            elif not self.should_exit:
                logger.info("%s: stopping", signal.Signals(signum).name)
                self.should_exit = True

    def shutdown(self) -> None:
        self.shutting_down = True
        self.broker.fail_queued("shutting_down", "the service is stopping")
        if self.reload is not None:
            self.fail_reload("the service is stopping")
        if self.watcher is not None:  # after the reload it may be waiting for is answered
            self.watcher.stop()
        for worker in self.workers.values():
            if worker.role in ("serving", "draining", "standby"):
                self.send_worker(worker, Stop())
            else:
                worker.kill("the service is stopping")  # importing or loading: nothing to finish
        deadline = time.monotonic() + self.settings.drain_timeout
        while any(w.process.poll() is None for w in self.workers.values()):
            if time.monotonic() > deadline:
                break
            if self.backend.poll(TICK_S * 1000):
                self.drain(self.backend, self.handle_worker)
            if self.frontend.poll(0):
                self.drain(self.frontend, self.handle_client)
        for worker in self.workers.values():
            worker.kill(f"still running {self.settings.drain_timeout:g} s after the stop")
            worker.process.wait()
            self.broker.fail_held(worker, "shutting_down",
                                  "the service stopped before this request finished")
        for process in self.exiting:
            process.kill()
            process.wait()
        self.frontend.close(linger=500)
        self.backend.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()
        self.context.term()
        if self.frontend_address.startswith("ipc://"):
            Path(self.frontend_address[len("ipc://"):]).unlink(missing_ok=True)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        logger.info("Supervisor stopped")

    # ----------------------------------------------------------------- clients

    def handle_client(self, frames: list[bytes]) -> None:
        client, body = frames[0], frames[1:]
        size = sum(len(frame) for frame in body)
        limit = self.settings.max_request_mb * 1024 * 1024
        if size > limit:
            self.reply_error(client, request_id_of(body[0]) if body else None, "too_large",
                             f"request of {size / 2**20:.1f} MiB; at most "
                             f"{self.settings.max_request_mb:g} MiB (SENSEVOICE_MAX_REQUEST_MB)")
            return
        try:
            message, payload = decode_client(body)
        except ProtocolError as e:
            self.reply_error(client, request_id_of(body[0]) if body else None, "bad_request",
                             str(e))
            return
        if isinstance(message, StatusRequest):
            self.send_client(client, StatusReply(request_id=message.request_id,
                                                 status=self.status()))
        elif self.shutting_down:
            self.reply_error(client, message.request_id, "shutting_down",
                             "the service is stopping")
        elif isinstance(message, ReloadRequest):
            self.request_reload(message, Waiter(client, message.request_id))
        else:
            self.accept_job(client, message, payload or b"")

    def accept_job(self, client: bytes, request: TranscribeRequest, payload: bytes) -> None:
        if not self.can_serve_soon():
            self.reply_error(client, request.request_id, "unavailable",
                             "no inference worker is running; see the supervisor log")
        else:
            self.broker.accept(client, request, payload)

    def can_serve_soon(self) -> bool:
        return self.reload is not None or any(
            w.role == "serving" or (w.assignment and w.role in ("starting", "loading"))
            for w in self.workers.values()) or time.monotonic() < self.backoff.until + 1

    def reply_error(self, client: bytes, request_id: str | None, code: ErrorCode,
                    message: str) -> None:
        self.broker.reply_error(client, request_id, code, message)

    def send_client(self, client: bytes, message) -> None:
        self.broker.send_client(client, message)

    def status(self) -> ServiceStatus:
        now = time.monotonic()
        workers = [WorkerStatus(worker_id=w.worker_id, pid=w.pid, role=w.role,
                                age_s=round(now - w.spawned_at, 3),
                                requests_served=w.requests_served, busy=w.busy,
                                fingerprint=w.model.fingerprint if w.model else None)
                   for w in sorted(self.workers.values(), key=lambda w: w.age)]
        return ServiceStatus(
            supervisor_pid=os.getpid(), uptime_s=round(now - self.started_at, 3),
            model=self.model, workers=workers, queued=len(self.broker.queue),
            in_flight=sum(len(w.jobs) for w in self.workers.values()),
            requests_served=self.broker.requests_served, worker_restarts=self.restarts,
            reloading=self.reload is not None, last_reload=self.last_reload,
            reload_counts=dict(self.reload_counts),
            watching=str(self.watcher.directory) if self.watcher else None)

    # ----------------------------------------------------------------- workers

    def handle_worker(self, frames: list[bytes]) -> None:
        worker = self.workers.get(frames[0].decode(errors="replace"))
        if worker is None:
            return  # a retired worker's last words
        try:
            message = decode_from_worker(frames[1:])
        except ProtocolError as e:
            job_id = request_id_of(frames[1]) if len(frames) > 1 else None
            logger.error("Malformed message from worker %s (pid %s)%s: %s", worker.worker_id,
                         worker.pid, f" answering request {job_id}" if job_id else "", e)
            self.broker.unreadable_reply(worker, job_id, str(e))
            return
        worker.last_heard, worker.unanswered_pings = time.monotonic(), 0
        if isinstance(message, Hello):
            self.worker_hello(worker)
        elif isinstance(message, Ready):
            worker.model = message.model
            self.send_worker(worker, Ping(nonce=1))  # the health check before traffic
        elif isinstance(message, Pong):
            if worker.role == "loading" and worker.model is not None and not worker.health_checked:
                worker.health_checked = True
                self.worker_ready(worker)
        elif isinstance(message, LoadFailed):
            worker.load_error = message.error
        else:
            self.broker.finish(worker, message)

    def worker_hello(self, worker: WorkerHandle) -> None:
        if worker.assignment is None:
            worker.role = "standby"
            self.standby_backoff.reset()
        else:
            self.send_load(worker)

    def send_load(self, worker: WorkerHandle) -> None:
        assignment = worker.assignment
        assert assignment is not None
        worker.role = "loading"
        if assignment.purpose == "reload" and self.reload is not None:
            worker.deadline = self.reload.deadline
        else:
            worker.deadline = time.monotonic() + (
                FIRST_LOAD_TIMEOUT_S if self.model is None else
                max(self.settings.hotreload_timeout, 60.0))
        self.send_worker(worker, LoadModel(path=assignment.path, force_fresh=assignment.force_fresh))

    def worker_ready(self, worker: WorkerHandle) -> None:
        assert worker.model is not None and worker.assignment is not None
        reload = self.reload
        if worker.assignment.purpose == "reload" and reload and worker.worker_id in reload.green:
            greens = [self.workers[g] for g in reload.green]
            if all(g.health_checked for g in greens):
                self.switch_to_green(greens)
            return
        first = self.model is None
        worker.role, worker.idle_since = "serving", time.monotonic()
        self.model = worker.model
        self.backoff.reset()
        if first:
            logger.info("Serving model %s, loaded in %.2f s via %s", describe_model(worker.model),
                        worker.model.load_s, worker.model.cache_level)
            self.start_watcher()
        else:
            logger.info("Worker %s (pid %s) serving %s", worker.worker_id, worker.pid,
                        describe_model(worker.model))

    def send_worker(self, worker: WorkerHandle, message) -> None:
        self.backend.send_multipart([worker.worker_id.encode(), *encode(message)])

    def spawn_worker(self, assignment: Assignment | None) -> WorkerHandle:
        self.spawned += 1
        worker_id = f"w{self.spawned}"
        process = spawn_worker_process(worker_id, self.backend_address,
                                       standby=assignment is None)
        worker = WorkerHandle(worker_id, process, age=self.spawned, assignment=assignment)
        self.workers[worker_id] = worker
        return worker

    def assign(self, assignment: Assignment) -> WorkerHandle:
        """Give a load to the warm standby if there is one, else to a new worker.

        A standby still starting is not waited for: it starts at idle priority, which on a
        saturated machine could take longer than the reload may.
        """
        standby = next((w for w in self.workers.values()
                        if w.role == "standby" and w.assignment is None), None)
        if standby is None:
            return self.spawn_worker(assignment)
        standby.assignment = assignment
        self.send_load(standby)
        return standby

    def drain_worker(self, worker: WorkerHandle) -> None:
        """No new work; finish the requests in hand, then exit (the worker drains on Stop)."""
        worker.role = "draining"
        worker.deadline = time.monotonic() + self.settings.drain_timeout
        self.send_worker(worker, Stop())

    def retire(self, worker: WorkerHandle, reason: str) -> None:
        self.workers.pop(worker.worker_id, None)
        worker.kill(reason)
        self.exiting.append(worker.process)

    def reap_workers(self) -> None:
        for worker in list(self.workers.values()):
            code = worker.process.poll()
            if code is None:
                continue
            del self.workers[worker.worker_id]
            self.worker_exited(worker, code)
        self.exiting = [p for p in self.exiting if p.poll() is None]

    def worker_exited(self, worker: WorkerHandle, code: int) -> None:
        how = f"was killed: {worker.kill_reason}" if worker.killed else describe_exit(code)
        cause = worker.load_error or how
        self.broker.requeue(worker, f"worker {worker.worker_id} (pid {worker.pid}) {how}",
                            retry=not self.shutting_down)
        if worker.role == "draining" or self.shutting_down or self.should_exit:
            logger.info("Worker %s (pid %s) %s", worker.worker_id, worker.pid,
                        how if worker.killed else "drained and exited")
        elif self.reload is not None and worker.worker_id in self.reload.green:
            self.fail_reload(f"the new worker (pid {worker.pid}): {cause}")
        elif worker.role == "serving":
            self.restarts += 1
            logger.warning("Worker %s (pid %s) %s; replacing it", worker.worker_id, worker.pid,
                           how)
        elif worker.role in ("starting", "loading") and worker.assignment is not None:
            if self.model is None and self.reload is None and code == EXIT_BOOT_ERROR:
                logger.error("Cannot start: the inference worker %s; see its error above",
                             cause)
                self.should_exit, self.exit_code = True, 4
                return
            if self.model is None and self.reload is None:
                logger.error("Cannot start: the model did not load: %s. Fix the model directory "
                             "(python -m sensevoice_core doctor) and start again", cause)
                self.should_exit, self.exit_code = True, 4
                return
            self.backoff.fail()
            logger.error("Worker %s (pid %s) could not load %s: %s; retrying in %.0f s",
                         worker.worker_id, worker.pid, worker.assignment.path, cause,
                         self.backoff.delay_s)
        else:
            self.standby_backoff.fail()
            logger.warning("Standby worker %s (pid %s) %s; next one in %.0f s", worker.worker_id,
                           worker.pid, how, self.standby_backoff.delay_s)

    def check_health(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if worker.process.poll() is not None or worker.killed:
                continue  # reaped next tick
            if worker.role == "starting" and now - worker.spawned_at > SPAWN_TIMEOUT_S:
                logger.error("Worker %s (pid %s) did not start within %.0f s; killing it",
                             worker.worker_id, worker.pid, SPAWN_TIMEOUT_S)
                worker.kill(f"did not start within {SPAWN_TIMEOUT_S:.0f} s")
            elif worker.role in ("loading", "draining") and now > worker.deadline:
                logger.error("Worker %s (pid %s) still %s after its deadline; killing it",
                             worker.worker_id, worker.pid, worker.role)
                worker.kill(f"still {worker.role} after its deadline")
            elif self.broker.expire_running(worker, now):
                timeout = self.settings.request_timeout
                logger.error("Worker %s (pid %s) spent %.0f s on one request; replacing it",
                             worker.worker_id, worker.pid, timeout)
                worker.kill(f"spent {timeout:g} s on one request")
            else:
                self.heartbeat(worker, now)
        if self.reload is not None and self.reload.started and now > self.reload.deadline:
            self.fail_reload(f"not ready within {self.settings.hotreload_timeout:g} s "
                             f"(SENSEVOICE_HOTRELOAD_TIMEOUT)")
        self.broker.expire_queued(now)

    def heartbeat(self, worker: WorkerHandle, now: float) -> None:
        """Ping every worker past its start, busy or not (pongs come from its I/O thread); it
        is hung after HEARTBEAT_LIVENESS pings in a row went unanswered."""
        if worker.role == "starting" or (worker.role == "loading" and not worker.health_checked):
            return  # bounded by their deadlines instead
        if now - worker.last_ping < HEARTBEAT_INTERVAL_S:
            return
        if worker.unanswered_pings >= HEARTBEAT_LIVENESS:
            logger.error("Worker %s (pid %s) missed %d heartbeats%s; killing it as hung",
                         worker.worker_id, worker.pid, HEARTBEAT_LIVENESS,
                         f" while serving {len(worker.jobs)} request(s)" if worker.jobs else "")
            worker.kill(f"missed {HEARTBEAT_LIVENESS} heartbeats")
        else:
            worker.last_ping = now
            worker.unanswered_pings += 1
            self.send_worker(worker, Ping(nonce=int(now * 1000)))

    def manage_workers(self) -> None:
        if self.shutting_down or self.should_exit:
            return
        now = time.monotonic()
        workers = list(self.workers.values())
        if self.reload is None and now >= self.backoff.until:
            serving = sum(w.role == "serving" for w in workers)
            filling = sum(w.assignment is not None and w.assignment.purpose == "serve"
                          and w.role in ("starting", "loading") for w in workers)
            path = self.model.model_dir if self.model else (
                str(self.settings.model_dir) if self.settings.model_dir else None)
            for _ in range(self.settings.workers - serving - filling):
                self.assign(Assignment(path, False, "serve"))
        wants_standby = (self.settings.warm_standby and self.model is not None
                         and self.reload is None and now >= self.standby_backoff.until)
        if wants_standby and not any(w.role in ("standby", "draining", "loading")
                                     or (w.role == "starting" and w.assignment is None)
                                     for w in workers):
            standby = self.spawn_worker(None)
            logger.debug("Spawned warm standby %s (pid %s)", standby.worker_id, standby.pid)

    # ----------------------------------------------------------------- reload

    def request_reload(self, request: ReloadRequest, waiter: Waiter) -> None:
        try:
            path = check_reload_path(request.path, self.model, self.settings.model_roots)
        except ReloadRefused as e:
            logger.error(failure_line(self.model, str(e), verb="refused"))
            self.reload_counts["refused"] += 1
            self.last_reload = ReloadOutcome(
                ok=False, origin=request.origin,
                requested_path=request.path[:300] if request.path else None,
                model_dir=self.model.model_dir if self.model else None,
                old_fingerprint=self.model.fingerprint if self.model else None,
                error=f"refused: {e}")
            if waiter.client is not None:
                self.reply_error(waiter.client, waiter.request_id, "reload_refused", str(e))
            waiter.notify()
            return
        if self.reload is None:
            self.reload = ReloadJob(path, request.force_fresh, request.origin, [waiter])
            self.start_reload()
        elif self.next_reload is None:
            self.next_reload = ReloadJob(path, request.force_fresh, request.origin, [waiter])
        else:
            replaced = self.next_reload.path
            for superseded in self.next_reload.merge(request, path, waiter):
                superseded.notify()
                if superseded.client is not None:
                    outcome = ReloadOutcome(
                        ok=False, origin=request.origin, requested_path=replaced,
                        model_dir=self.model.model_dir if self.model else None,
                        old_fingerprint=self.model.fingerprint if self.model else None,
                        error=f"superseded by a later reload request for {path}")
                    self.send_client(superseded.client, ReloadReply(
                        request_id=superseded.request_id, outcome=outcome))

    def start_reload(self) -> None:
        job = self.reload
        assert job is not None
        job.started, job.old_model = True, self.model
        job.deadline = time.monotonic() + self.settings.hotreload_timeout
        if self.settings.swap_strategy == "stop_first":
            for worker in [w for w in self.workers.values() if w.role == "serving"]:
                self.drain_worker(worker)
            logger.info("[HOTRELOAD] stop_first: old worker stopped; requests wait until the "
                        "new model is ready (downtime = its load time)")
        for _ in range(self.settings.workers):
            worker = self.assign(Assignment(job.path, job.force_fresh, "reload"))
            job.green.add(worker.worker_id)

    def switch_to_green(self, greens: list[WorkerHandle]) -> None:
        job = self.reload
        assert job is not None
        for worker in [w for w in self.workers.values() if w.role == "serving"]:
            self.drain_worker(worker)
        for worker in [w for w in self.workers.values() if w.assignment is not None
                       and w.assignment.purpose == "serve" and w.role in ("starting", "loading")]:
            self.retire(worker, "it was loading the model being replaced")  # refilled after
        now = time.monotonic()
        for worker in greens:
            worker.role, worker.idle_since = "serving", now
        self.model = greens[0].model
        assert self.model is not None
        outcome = job.outcome(self.model, self.model)
        logger.info(success_line(self.model, outcome.seconds))
        self.finish_reload(outcome)

    def fail_reload(self, cause: str) -> None:
        job = self.reload
        assert job is not None
        for worker_id in job.green:
            if worker_id in self.workers:
                self.retire(self.workers[worker_id], "its reload failed")
        outcome = job.outcome(None, self.model, error=cause)
        logger.error(failure_line(self.model, cause))
        self.finish_reload(outcome)

    def finish_reload(self, outcome: ReloadOutcome) -> None:
        assert self.reload is not None
        self.last_reload = outcome
        self.reload_counts["ok" if outcome.ok else "failed"] += 1
        for waiter in self.reload.waiters:
            waiter.notify()
            if waiter.client is not None:
                self.send_client(waiter.client, ReloadReply(request_id=waiter.request_id,
                                                            outcome=outcome))
        self.reload, self.next_reload = self.next_reload, None
        if self.reload is not None and not self.shutting_down:
            self.start_reload()
        elif self.reload is not None:
            self.fail_reload("the service is stopping")

    def request_watch_reload(self, request: ReloadRequest) -> threading.Event:
        """Called from the watcher's thread; the loop picks the request up within a tick."""
        done = threading.Event()
        self.watch_reloads.append((request, done))
        return done

    def start_watcher(self) -> None:
        if self.settings.enable_file_watch and self.watcher is None:
            self.watcher = ModelWatcher(self.request_watch_reload, lambda: self.model,
                                        self.settings.watch_quiet_s)
            self.watcher.start()


def bind_owner_only(socket: zmq.Socket, path: Path) -> None:
    """Bind an ipc socket that only this user can connect to, whatever the umask: its directory
    is created 0700 when missing, the socket file is created and kept 0600."""
    missing = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
    for directory in reversed(missing):  # each level we create is ours alone
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)
    shared = path.parent.stat().st_mode & 0o022
    if shared:
        logger.warning("The socket directory %s is writable by other users (mode %o); anyone "
                       "who can write there can replace the socket. Fix: chmod go-w %s, or set "
                       "SENSEVOICE_SUPERVISOR_ADDRESS to a private directory", path.parent,
                       path.parent.stat().st_mode & 0o777, path.parent)
    old_umask = os.umask(0o077)
    try:
        socket.bind(f"ipc://{path}")
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)


def remove_stale_runtime_dirs() -> list[Path]:
    """Delete runtime directories of supervisors that were killed: ours, named exactly as
    mkdtemp names them, holding nothing but the workers' socket, their supervisor gone."""
    removed = []
    for directory in Path(tempfile.gettempdir()).glob(f"{RUNTIME_PREFIX}*"):
        match = RUNTIME_NAME.fullmatch(directory.name)
        try:
            if (match is None or directory.is_symlink() or directory.stat().st_uid != os.getuid()
                    or pid_alive(int(match[1]))
                    or {p.name for p in directory.iterdir()} - {"workers.ipc"}):
                continue
            shutil.rmtree(directory)
        except OSError:
            continue
        removed.append(directory)
    return removed


def supervisor_answers(context: zmq.Context, address: str, timeout_s: float = 0.5) -> bool:
    """True when a live supervisor replies to a status request at this address."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(address)
        socket.send_multipart(encode(StatusRequest()))
        return bool(socket.poll(timeout_s * 1000))
    finally:
        socket.close()
