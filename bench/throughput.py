"""Service throughput with cross-request batching off and on (not a test).

Two supervisors serve the same model, one with SENSEVOICE_BATCH_WAIT_MS=0 (no batching, one
request per worker, a second only beside a long one) and one with batching on; N closed-loop
clients (1, 4, 8, 16) each send a 5 s clip of demo speech (FLAC bytes, as an upload would be)
and send the next one when the reply comes, for --seconds per system (each measured stretch
after --settle seconds of the same load, which let the clients fall out of step and the
batches find their size: a run starts from idle, all clients at once). Per client count the
two systems run back to back, in A B B A order (--seconds / 2 each, --rounds times; the idle
one waits on its socket); the figures pool the runs of each system. Printed: requests/s, audio seconds/s,
p50/p99 latency, the ratio on/off, and the CPU flags, torch threads and compute type served.
With --long-s, a mixed run follows: one more client sends a --long-s clip in a closed loop
beside the 5 s clients (--clients' first count), and the 5 s clips' p50/p99 are printed: what
a long request costs the short ones.

    python bench/throughput.py --model model                 # the demo model
    python ../shared/tools/make_full_fixture.py /tmp/full     # full-size random weights
    SENSEVOICE_COMPUTE_CHECK=false python bench/throughput.py --model /tmp/full --seconds 20

Settings (SENSEVOICE_THREADS, _COMPUTE_TYPE, _WORKERS, _MAX_BATCH_S ...) come from the
environment, as for the service; --wait-ms sets the batching system's wait.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import soundfile

from sensevoice_core.client import ServiceError, SupervisorClient
from sensevoice_core.compute import machine_features
from sensevoice_core.protocol import ServiceStatus
from sensevoice_core.settings import Settings

EXAMPLES = Path(__file__).resolve().parent.parent / "ui" / "examples"
RATE = 16000
CLIP_S = 5.0


def clip_bytes(seconds: float = CLIP_S) -> bytes:
    """Demo speech: the example clips back to back, cut to length, as FLAC."""
    parts, total = [], 0
    while total < seconds * RATE:
        for path in sorted(EXAMPLES.glob("*.flac")):
            samples, _ = soundfile.read(path, dtype="float32")
            parts.append(samples)
            total += len(samples)
    audio = np.concatenate(parts)[:round(seconds * RATE)]
    with tempfile.NamedTemporaryFile(suffix=".flac") as file:
        soundfile.write(file.name, audio, RATE)
        return Path(file.name).read_bytes()


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    address: str
    status: ServiceStatus | None = None

    def client(self) -> SupervisorClient:
        return SupervisorClient(self.address, Settings(supervisor_address=self.address))


def start(name: str, model: Path, wait_ms: float, work: Path) -> Service:
    address = f"ipc://{work}/{name}.ipc"
    env = {**os.environ, "SENSEVOICE_MODEL_DIR": str(model.resolve()),
           "SENSEVOICE_BATCH_WAIT_MS": str(wait_ms), "SENSEVOICE_SUPERVISOR_ADDRESS": address,
           "SENSEVOICE_WARM_STANDBY": "false", "SENSEVOICE_ENABLE_FILE_WATCH": "false",
           "SENSEVOICE_CACHE_DIR": os.environ.get("SENSEVOICE_CACHE_DIR",
                                                  "/tmp/sensevoice-bench-cache"),
           "SENSEVOICE_MAX_QUEUE": "256"}
    with open(work / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen([sys.executable, "-m", "supervisor"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Service(name, process, address)


def wait_ready(service: Service, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    client = service.client()
    try:
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise SystemExit(f"{service.name}: the service exited; see its log")
            try:
                status = client.status(timeout=2)
            except ServiceError:
                time.sleep(0.5)
                continue
            if status.model and any(w.role == "serving" and w.threads for w in status.workers):
                service.status = status
                return
            time.sleep(0.5)
    finally:
        client.close()
    raise SystemExit(f"{service.name}: not ready after {timeout:g} s")


@dataclass
class Run:
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def load(service: Service, clients: int, seconds: float, audio: bytes, into: Run,
         settle_s: float = 0.0, long_audio: bytes | None = None) -> None:
    """clients closed-loop senders for settle_s + seconds; the latencies of the requests that
    finished in the last `seconds` (the first settle_s let the clients fall out of step).
    long_audio: one more sender of it, whose latencies are not counted."""
    start = time.monotonic() + settle_s
    end = start + seconds
    lock = threading.Lock()

    def client_loop(audio: bytes = audio, counted: bool = True) -> None:
        client = service.client()
        try:
            while time.monotonic() < end:
                sent = time.perf_counter()
                try:
                    client.transcribe(audio, filename="bench.flac")
                except ServiceError as e:
                    with lock:
                        into.errors.append(e.code)
                    continue
                took = time.perf_counter() - sent
                if counted and start <= time.monotonic() <= end:
                    with lock:
                        into.latencies.append(took)
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    if long_audio is not None:
        threads.append(threading.Thread(target=client_loop, args=(long_audio, False)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    into.seconds += seconds


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("model"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="per system, client count and round (two halves: A B B A)")
    parser.add_argument("--rounds", type=int, default=1, help="A B B A pairs per client count")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds of load before each measured half, not counted")
    parser.add_argument("--wait-ms", type=float, default=5.0, help="the batching system's wait")
    parser.add_argument("--long-s", type=float, default=0.0,
                        help="then a mixed run: one client of a clip this long beside the "
                             "5 s clients (0: none)")
    args = parser.parse_args()
    audio = clip_bytes()
    work = Path(tempfile.mkdtemp(prefix="svtp", dir="/tmp"))
    services = {"off": start("off", args.model, 0, work),
                "on": start("on", args.model, args.wait_ms, work)}
    try:
        for service in services.values():
            wait_ready(service)
        for service in services.values():  # warm: first requests page in and prime kernels
            load(service, 2, 3.0, audio, Run())
        for service in services.values():
            client = service.client()
            service.status = client.status()
            client.close()
        report(args, services, audio)
    finally:
        for service in services.values():
            service.process.terminate()
        for service in services.values():
            service.process.wait(timeout=60)


def report(args: argparse.Namespace, services: dict[str, Service], audio: bytes) -> None:
    status = services["on"].status
    assert status is not None and status.model is not None
    workers = [w for w in status.workers if w.role == "serving"]
    print(f"CPU: {machine_features('cpu').describe()}; {len(os.sched_getaffinity(0))} usable "
          f"cores")
    print(f"model: {args.model} ({status.model.compute_type}: {status.model.compute_reason}); "
          f"{len(workers)} worker(s) x {workers[0].threads} torch threads; clip {CLIP_S:g} s "
          f"({len(audio) // 1024} KiB FLAC); batching wait {args.wait_ms:g} ms; "
          f"{args.seconds:g} s measured per system and client count after {args.settle:g} s "
          f"settling, {args.rounds} A-B-B-A round(s)")
    print(f"{'clients':>7} {'system':>6} {'req/s':>7} {'audio s/s':>9} {'p50 s':>7} "
          f"{'p99 s':>7} {'errors':>6}")
    for clients in args.clients:
        runs = {name: Run() for name in services}
        for _ in range(args.rounds):
            for name in ("off", "on", "on", "off"):
                load(services[name], clients, args.seconds / 2, audio, runs[name],
                     args.settle)
        rates = {}
        for name, run in runs.items():
            rate = len(run.latencies) / run.seconds
            rates[name] = (rate, percentile(run.latencies, 50))
            print(f"{clients:>7} {name:>6} {rate:>7.2f} {rate * CLIP_S:>9.1f} "
                  f"{percentile(run.latencies, 50):>7.3f} {percentile(run.latencies, 99):>7.3f} "
                  f"{len(run.errors):>6}")
        (off_rate, off_p50), (on_rate, on_p50) = rates["off"], rates["on"]
        print(f"{clients:>7}  on/off: throughput x{on_rate / off_rate:.2f}, "
              f"p50 x{on_p50 / off_p50:.2f}", flush=True)
    if args.long_s > 0:
        long_audio, clients = clip_bytes(args.long_s), args.clients[0]
        runs = {name: Run() for name in services}
        for _ in range(args.rounds):
            for name in ("off", "on", "on", "off"):
                load(services[name], clients, args.seconds / 2, audio, runs[name],
                     args.settle, long_audio)
        for name, run in runs.items():
            print(f"mixed {name:>3}: {clients} x {CLIP_S:g} s clients beside one "
                  f"{args.long_s:g} s client: 5 s clips p50 {percentile(run.latencies, 50):.3f}"
                  f" s, p99 {percentile(run.latencies, 99):.3f} s, "
                  f"{len(run.latencies) / run.seconds:.2f} req/s", flush=True)
    for service in services.values():
        client = service.client()
        worker = next(w for w in client.status().workers if w.role == "serving")
        client.close()
        if worker.batches:
            print(f"{service.name}: {worker.batches} passes, {worker.batch_items} items "
                  f"({worker.batch_items / worker.batches:.2f} per pass)")


if __name__ == "__main__":
    main()
