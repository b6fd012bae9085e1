"""Blue-green swaps, idle and under traffic, with fork- and spawn-started workers (not a test).

    python ../shared/tools/make_full_fixture.py /tmp/full
    python bench/swap.py --model /tmp/full [--swaps 3] [--rounds 2] [--starts fork spawn]

Each round starts the real service (supervisor, workers, warm standby) once per start method
(SENSEVOICE_WORKER_START), in turn: fork, spawn, fork, spawn ... (a slow spell on a shared
machine hits both alike); the figures are medians (latencies: percentiles) over all rounds.
A swap alternates between --model and a copy of it that differs only by a newline at the end of
its config (the same weights, symbolic links; another fingerprint, so every reload is a real
swap, an L2 hit with the warm standby, and never L1); the copy lives in the cache directory
(--cache keeps both for the next run; the first run's load of the copy is a fresh one, before
any figure is taken). In each service:

- idle: the bench asks for a reload and, once it is answered, sends one request;
  * reload request -> traffic switched: ReloadOutcome.seconds, measured by the supervisor from
    receiving the request to the moment traffic moves to the new worker (it has loaded, warmed
    up, passed its health ping and taken the serving role); the reply to the client follows;
  * reload request -> first reply from the new model: from sending the reload request to the
    first reply that carries the new model's fingerprint, as the bench's client sees them;
  * standby spawn: spawn request -> Hello of the standby that replaces the one the swap used,
    as the supervisor measured it (WorkerStatus.start_s);
- unchanged-fingerprint reloads (--l1 of them): cache level and ReloadOutcome.seconds, and
  whether any process started;
- under traffic: --clients clients send --clip back to back; latency p50/p99 before any swap
  (--steady-s), during swaps (requests overlapping [reload request, first reply from the new
  model + 1 s]) and after (the rest: the drained worker exits and a new standby starts);
  reload -> switched and -> first new reply as above (the first reply, to any client, with the
  new fingerprint); failed requests (idle and under traffic);
- memory: PSS (with its anonymous and file-backed parts) of every service process, by role
  (supervisor, fork server, serving, warming, standby, draining ...), from
  /proc/PID/smaps_rollup: before a swap, at its peak (the largest total sampled every 50 ms
  from the reload request until the new standby stands by) and after; the swap whose peak is
  the median one is shown. The target compares the total at the peak with one serving
  worker's RSS before the swap (every page it maps counted whole: what it would take alone;
  its PSS is smaller by what it shares with the fork server and the standby). The two models
  are two L2 snapshot files, so while both workers hold theirs the peak counts two copies of
  the (file-backed) weights.

Settings other than those named in SERVICE_ENV come from the environment, as for the service.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from swap_probe import (
    MemorySampler,
    Sample,
    cpu_line,
    sample,
    second_model,
    start_method,
)
from swap_report import Figures, SwapMemory, print_report

from sensevoice_core.client import ServiceError, SupervisorClient
from sensevoice_core.errors import ModelFileError
from sensevoice_core.protocol import ReloadOutcome, ServiceStatus
from sensevoice_core.settings import Settings

REPO = Path(__file__).resolve().parent.parent
POLL_S = 0.01
SETTLE_S = 1.0  # after a new standby says Hello, its start-up's last work
READY_TIMEOUT_S = 600.0
GIVE_UP = 3  # workers that exited before serving or standing by
# A fresh load of the copy (the first run with a --cache) hashes, converts and gates the model:
# minutes on a busy machine, past the default reload timeout.
SERVICE_ENV = {"SENSEVOICE_ENABLE_FILE_WATCH": "false", "SENSEVOICE_KEEP_SNAPSHOTS": "4",
               "SENSEVOICE_WARM_STANDBY": "true", "SENSEVOICE_HOTRELOAD_TIMEOUT": "600"}


class Bench:
    """One running service and the bench's client to it."""

    def __init__(self, start: str, models: tuple[Path, Path], work: Path, cache: Path,
                 run: int):
        self.start, self.models = start, models
        self.address = f"ipc://{work}/s{run}.ipc"
        self.env = {**os.environ, **SERVICE_ENV, "SENSEVOICE_WORKER_START": start,
                    "SENSEVOICE_MODEL_DIR": str(models[0]),
                    "SENSEVOICE_MODEL_ROOTS": f"{models[0].parent},{models[1].parent}",
                    "SENSEVOICE_CACHE_DIR": str(cache),
                    "SENSEVOICE_SUPERVISOR_ADDRESS": self.address}
        self.log_path = work / f"service-{run}-{start}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "supervisor"], env=self.env,
                                            cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        self.client = self.new_client()
        self.serving = 0  # index into models

    def new_client(self) -> SupervisorClient:
        return SupervisorClient(self.address, Settings(supervisor_address=self.address))

    def fail(self, why: str) -> SystemExit:
        return SystemExit(f"{self.start}: {why}; see {self.log_path}")

    def wait_standby(self) -> ServiceStatus:
        """Until the workers serve (their threads reported), one standby stands by, and no
        other worker is left (starting, loading, draining)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        starting: set[int] = set()  # pids seen starting that never stood by
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self.fail(f"the service exited with {self.process.returncode}")
            try:
                status = self.client.status(timeout=5)
            except ServiceError:
                time.sleep(POLL_S)
                continue
            if status.model is None and status.worker_restarts >= GIVE_UP:
                raise self.fail(f"the model does not load ({status.worker_restarts} workers "
                                f"exited)")
            roles = {w.pid: w.role for w in status.workers}
            starting.update(pid for pid, role in roles.items() if role == "starting")
            lost = starting - set(roles)
            if len(lost) >= GIVE_UP:
                raise self.fail(f"{len(lost)} standby workers never said Hello (pids "
                                f"{sorted(lost)}): a machine too busy for a standby's start?")
            starting -= {pid for pid, role in roles.items() if role != "starting"}
            if (status.model and not status.reloading
                    and set(roles.values()) == {"serving", "standby"}
                    and list(roles.values()).count("standby") == 1
                    and all(w.threads for w in status.workers if w.role == "serving")):
                return status
            time.sleep(POLL_S)
        raise self.fail(f"no serving worker and standby within {READY_TIMEOUT_S:g} s")

    def reload(self, to: int) -> tuple[float, ReloadOutcome]:
        """Reload to models[to]; (when it was asked, the outcome)."""
        asked = time.monotonic()
        outcome = self.client.hot_reload_model(self.models[to])
        if not outcome.ok:
            raise self.fail(f"reload to {self.models[to]} failed: {outcome.error}")
        if to != self.serving and outcome.cache_level == "L1":
            raise self.fail("a reload to the other model was answered as L1")
        self.serving = to
        return asked, outcome

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Reply:
    sent: float
    received: float
    fingerprint: str | None  # None: failed
    error: str | None = None


@dataclass
class Traffic:
    """Clients sending the clip back to back, each on its own connection."""

    bench: Bench
    audio: bytes
    clients: int
    replies: list[Reply] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def run_client(self) -> None:
        client = self.bench.new_client()
        try:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    reply = client.transcribe(self.audio, filename="bench")
                    self.replies.append(Reply(sent, time.monotonic(), reply.fingerprint))
                except ServiceError as e:
                    self.replies.append(Reply(sent, time.monotonic(), None, e.code))
        finally:
            client.close()

    def __enter__(self) -> Self:
        self.threads = [threading.Thread(target=self.run_client) for _ in range(self.clients)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def first_with(self, fingerprint: str, after: float, timeout: float = 120.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r.received for r in list(self.replies)
                     if r.fingerprint == fingerprint and r.received > after]
            if found:
                return min(found)
            time.sleep(POLL_S / 2)
        raise self.bench.fail(f"no reply from the new model within {timeout:g} s")


def swap_memory(bench: Bench, sampler: MemorySampler, before: Sample, asked: float,
                condition: str, figures: Figures) -> ServiceStatus:
    """After a swap: wait for the new standby, settle, and keep before/peak/after."""
    status = bench.wait_standby()
    time.sleep(SETTLE_S)
    sampler.active.clear()
    after = sample(bench.client, bench.process.pid)
    peak = max([s for s in (sampler.peak(asked, after.at), before, after) if s is not None],
               key=lambda s: s.total.pss)
    figures.memory.append(SwapMemory(condition, before, peak, after))
    return status


def idle_swaps(bench: Bench, sampler: MemorySampler, audio: bytes, swaps: int,
               figures: Figures) -> None:
    for _ in range(swaps):
        status = bench.wait_standby()
        time.sleep(SETTLE_S)  # the standby's start-up has settled
        old = {w.pid for w in status.workers}
        before = sample(bench.client, bench.process.pid)
        sampler.active.set()
        asked, outcome = bench.reload(1 - bench.serving)
        try:
            reply = bench.client.transcribe(audio, filename="bench")
        except ServiceError as e:
            figures.failures[e.code] += 1
            raise bench.fail(f"the first request after a reload failed: {e}") from None
        answered = time.monotonic()
        figures.requests += 1
        if reply.fingerprint != outcome.new_fingerprint:
            raise bench.fail("the first request after the reload was answered by the old model")
        figures.idle_switch.append(outcome.seconds)
        figures.idle_first.append(answered - asked)
        status = swap_memory(bench, sampler, before, asked, "idle", figures)
        standby = next(w for w in status.workers if w.role == "standby")
        if standby.pid in old:
            raise bench.fail("the swap did not use the warm standby")
        if standby.start_s is not None:
            figures.spawn.append(standby.start_s)


def unchanged_reloads(bench: Bench, count: int, figures: Figures) -> None:
    status = bench.wait_standby()
    pids = {w.pid for w in status.workers}
    for _ in range(count):
        asked = time.monotonic()
        outcome = bench.client.hot_reload_model(bench.models[bench.serving])
        figures.l1_round_trip.append(time.monotonic() - asked)
        figures.l1_levels[f"{outcome.cache_level} ({'ok' if outcome.ok else outcome.error})"] += 1
        if outcome.ok and outcome.cache_level == "L1":
            figures.l1_seconds.append(outcome.seconds)
    status = bench.wait_standby()
    figures.l1_new_processes += len({w.pid for w in status.workers} - pids)


def traffic_swaps(bench: Bench, sampler: MemorySampler, audio: bytes, args: argparse.Namespace,
                  figures: Figures) -> None:
    bench.wait_standby()
    windows: list[tuple[float, float]] = []
    with Traffic(bench, audio, args.clients) as traffic:
        started = time.monotonic()
        time.sleep(args.steady_s)
        steady_end = time.monotonic()
        for _ in range(args.swaps):
            bench.wait_standby()
            time.sleep(SETTLE_S)
            before = sample(bench.client, bench.process.pid)
            sampler.active.set()
            asked, outcome = bench.reload(1 - bench.serving)
            figures.traffic_switch.append(outcome.seconds)
            first = traffic.first_with(outcome.new_fingerprint or "", asked)
            figures.traffic_first.append(first - asked)
            windows.append((asked, first + 1.0))
            time.sleep(max(0.0, first + 1.0 - time.monotonic()))
            swap_memory(bench, sampler, before, asked, "traffic", figures)
        time.sleep(min(args.steady_s, 5.0))  # after the last swap, too
    for reply in traffic.replies:
        figures.requests += 1
        if reply.fingerprint is None:
            figures.failures[reply.error or "?"] += 1
            continue
        latency = reply.received - reply.sent
        if started <= reply.sent and reply.received <= steady_end:
            figures.before.append(latency)
        elif any(reply.sent < end and reply.received > start for start, end in windows):
            figures.during.append(latency)
        elif reply.sent > steady_end:
            figures.after.append(latency)


def run_service(start: str, run: int, models: tuple[Path, Path], work: Path, audio: bytes,
                args: argparse.Namespace, figures: Figures, prime: bool) -> None:
    bench = Bench(start, models, work, args.cache, run)
    sampler = MemorySampler(bench.address, bench.process.pid)
    try:
        status = bench.wait_standby()
        if prime:  # the second model's first load writes its L2 snapshot; both are L2 after
            for to in (1, 0):
                bench.wait_standby()
                bench.reload(to)
            status = bench.wait_standby()
        for _ in range(3):  # the first requests fault pages in and pick kernels
            try:
                bench.client.transcribe(audio, filename=args.clip.name)
            except ServiceError as e:
                raise bench.fail(f"--clip {args.clip} is not served: {e}") from None
        figures.note_service(status, start_method(status))
        sampler.start()
        idle_swaps(bench, sampler, audio, args.swaps, figures)
        unchanged_reloads(bench, args.l1, figures)
        traffic_swaps(bench, sampler, audio, args, figures)
    finally:
        if sampler.is_alive():
            sampler.stop()
        bench.stop()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model directory")
    parser.add_argument("--swaps", type=int, default=3, help="per condition and service")
    parser.add_argument("--rounds", type=int, default=2, help="services per start method")
    parser.add_argument("--starts", nargs="+", choices=("fork", "spawn"),
                        default=["fork", "spawn"], help="start methods, interleaved")
    parser.add_argument("--clients", type=int, default=2, help="back-to-back clients")
    parser.add_argument("--steady-s", type=float, default=10.0,
                        help="traffic before the first swap (the steady latencies)")
    parser.add_argument("--l1", type=int, default=5, help="unchanged-fingerprint reloads")
    parser.add_argument("--clip", type=Path, default=REPO / "tests" / "data" / "zh.mp3")
    parser.add_argument("--cache", type=Path, help="SENSEVOICE_CACHE_DIR, kept for the next "
                        "run with the model's copy (default: a new one, removed after)")
    args = parser.parse_args()
    for name in ("swaps", "rounds", "clients", "l1"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, not {getattr(args, name)}")
    if args.steady_s <= 0:
        parser.error(f"--steady-s must be positive, not {args.steady_s:g}")
    if not args.model.is_dir():
        parser.error(f"--model {args.model} is not a directory")
    if not args.clip.is_file():
        parser.error(f"--clip {args.clip} is not a file")
    if args.cache is not None and args.cache.exists() and not args.cache.is_dir():
        parser.error(f"--cache {args.cache} is not a directory")
    if len(set(args.starts)) != len(args.starts):
        parser.error(f"--starts names a method twice: {' '.join(args.starts)}")
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # stop services
    work = Path(tempfile.mkdtemp(prefix="swap-bench-", dir="/tmp"))  # ipc paths must be short
    keep_cache = args.cache is not None
    args.cache = (args.cache or work / "cache").resolve()
    model = args.model.resolve()
    try:
        models = (model, second_model(model, args.cache))
    except (ModelFileError, SystemExit) as e:
        shutil.rmtree(work)  # nothing ran
        raise SystemExit(f"--model: {e}") from None
    audio = args.clip.read_bytes()
    figures = {start: Figures(start) for start in args.starts}
    began = time.monotonic()
    ran: list[str] = []  # the services that ran, in order
    stopped: str | None = None  # why the run stopped early
    try:
        for run, start in enumerate(args.starts * args.rounds):
            try:
                run_service(start, run, models, work, audio, args, figures[start],
                            prime=run == 0)
            except SystemExit as e:
                if not isinstance(e.code, str):
                    raise  # SIGTERM
                stopped = e.code  # what was measured so far is still printed
            ran.append(start)
            if stopped:
                break
    finally:
        if not keep_cache:
            shutil.rmtree(args.cache, ignore_errors=True)  # two models' snapshots
    settings = {key: value for key, value in sorted(os.environ.items())
                if key.startswith("SENSEVOICE_") and key not in SERVICE_ENV}
    print_report(args, figures, cpu_line(), {**settings, **SERVICE_ENV}, ran,
                 time.monotonic() - began, work)
    if stopped:
        raise SystemExit(f"stopped early: {stopped}")


if __name__ == "__main__":
    main()
