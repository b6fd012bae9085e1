"""Cluster mode against the single-host supervisor, on this machine (not a test).

    python bench/cluster.py                                   # the demo model
    python ../shared/tools/make_full_fixture.py /tmp/full      # full-size random weights
    SENSEVOICE_COMPUTE_CHECK=false python bench/cluster.py --model /tmp/full --seconds 40

For each replica count (--replicas, default 1 then 2; one CPU and --threads torch threads
each) it runs two systems side by side on the same model, with the same compute:
- cluster: `python -m cluster up` (a local Ray instance on loopback, no dashboard, the
  application from cluster/serve_config.yaml with that many SenseVoiceModel replicas); the
  clients POST /v1/audio/transcriptions to its HTTP ingress (Ray's proxy, the ingress
  replica, then a model replica);
- supervisor: `python -m supervisor` with that many workers (as bench/throughput.py starts
  it: no warm standby); the clients talk ZeroMQ to it directly (SupervisorClient), without
  the UI process's HTTP hop, which the cluster's figures include.
--clients closed-loop clients each send a 5 s clip of demo speech and the next one when the
reply comes, for --seconds per system, in A B B A order (--seconds / 2 each, after --settle
seconds of the same load, --rounds times; the idle system waits). Printed: requests/s, audio
seconds/s, p50/p99 latency and failed requests of each.

Then reload times, idle, alternating the model and a copy of it that differs only by a newline
at the end of its config (another fingerprint, same weights: bench/swap_probe.second_model):
`python -m cluster reload PATH --json` (command -> every replica serves the new fingerprint:
FleetReloadResult.seconds) and the supervisor's hot reload (ReloadOutcome.seconds: request ->
traffic on the new worker), --reloads of each after one unmeasured round trip that builds both
models' L2 snapshots.

This script never imports ray or the cluster package: Ray puts a driver script's directory on
every worker's sys.path, where this file's name would shadow the `cluster` package. Settings
come from the environment, as for the service.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx
from cpuinfo import cpu_model_and_flags
from swap_probe import second_model
from throughput import CLIP_S, Run, Service, clip_bytes, load, percentile, start, wait_ready

from sensevoice_core.client import ServiceError
from sensevoice_core.settings import Settings

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 600.0
HTTP_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 120.0
# `python -m cluster reload/status`: a fleet reload is at most a few rollout steps of
# SENSEVOICE_HOTRELOAD_TIMEOUT (which this bench sets to READY_TIMEOUT_S) and a rollback.
COMMAND_TIMEOUT_S = 3 * READY_TIMEOUT_S
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


class HttpClient:
    """What throughput.load calls on a client (transcribe, close), over the cluster's HTTP API."""

    def __init__(self, base_url: str):
        self.http = httpx.Client(base_url=base_url, timeout=HTTP_TIMEOUT_S)

    def transcribe(self, audio: bytes, filename: str) -> str:
        response = self.http.post("/v1/audio/transcriptions", files={"file": (filename, audio)},
                                  data={"response_format": "json"})
        if response.status_code != 200:
            error = response.json().get("error", {})
            raise ServiceError(error.get("code") or "internal", error.get("message") or "")
        return response.headers["x-sensevoice-fingerprint"]

    def close(self) -> None:
        self.http.close()


@dataclass
class ClusterService:
    """`python -m cluster up` in the foreground, as throughput.load sees a service."""

    name: str
    process: subprocess.Popen
    port: int
    env: dict[str, str]

    def client(self) -> HttpClient:
        return HttpClient(f"http://127.0.0.1:{self.port}")

    def command(self, *args: str) -> str:
        """`python -m cluster ARGS` against this cluster; its stdout."""
        try:
            done = subprocess.run([sys.executable, "-m", "cluster", *args], cwd=REPO,
                                  env=self.env, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"python -m cluster {' '.join(args)} did not finish within "
                             f"{COMMAND_TIMEOUT_S:g} s") from None
        if done.returncode != 0:
            raise SystemExit(f"python -m cluster {' '.join(args)} failed ({done.returncode}): "
                             f"{done.stderr.strip()[-2000:]}")
        return done.stdout

    def ready(self, replicas: int) -> dict:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"`python -m cluster up` exited ({self.process.returncode}); "
                                 f"see its log")
            try:
                body = httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                body = {}
            if body.get("status") == "ready" and body.get("workers") == replicas \
                    and not body.get("reloading"):
                return body
            time.sleep(0.5)
        raise SystemExit(f"the cluster is not ready with {replicas} replicas after "
                         f"{READY_TIMEOUT_S:g} s; see its log")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)  # Ctrl-C: `up` shuts Ray down and returns
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_cluster(model: Path, replicas: int, work: Path) -> ClusterService:
    port = free_port()
    env = {**os.environ, "SENSEVOICE_MODEL_DIR": str(model),
           "SENSEVOICE_CLUSTER_REPLICAS": str(replicas), "SENSEVOICE_CLUSTER_PORT": str(port),
           "SENSEVOICE_CLUSTER_HOST": "127.0.0.1"}
    with open(work / f"cluster-{replicas}.log", "wb") as log:  # the child keeps its own
        process = subprocess.Popen([sys.executable, "-m", "cluster", "up"], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    return ClusterService("cluster", process, port, env)


def cpu_line(threads: int) -> str:
    name, flags = cpu_model_and_flags()
    shown = [flag for flag in CPU_FLAGS if flag in flags]
    return (f"CPU: {name}; flags: {' '.join(shown) or 'none of ' + ' '.join(CPU_FLAGS)}; "
            f"{len(os.sched_getaffinity(0))} usable cores; {threads} torch thread(s) per "
            f"worker and per replica (SENSEVOICE_THREADS)")


def measure(systems: dict[str, Service | ClusterService], args: argparse.Namespace,
            audio: bytes) -> dict[str, Run]:
    runs = {name: Run() for name in systems}
    for _ in range(args.rounds):
        for name in ("supervisor", "cluster", "cluster", "supervisor"):
            load(systems[name], args.clients, args.seconds / 2, audio, runs[name],  # type: ignore[arg-type]
                 args.settle)
    return runs


def reload_times(supervisor: Service, fleet: ClusterService, paths: list[Path], count: int
                 ) -> dict[str, list[float]]:
    """count reloads of each system, alternating between paths[1] and paths[0] (one
    unmeasured round trip first), supervisor and cluster in turn."""
    times: dict[str, list[float]] = {"supervisor": [], "cluster": []}
    client = supervisor.client()
    try:
        for index in range(2 + count):
            target = paths[(index + 1) % 2]
            outcome = client.hot_reload_model(target)
            result = json.loads(fleet.command("reload", str(target), "--json"))
            if not outcome.ok or not result["ok"]:
                raise SystemExit(f"a reload to {target} failed: supervisor {outcome.error}; "
                                 f"cluster {result.get('failures')}")
            if index >= 2:
                times["supervisor"].append(outcome.seconds)
                times["cluster"].append(result["seconds"])
    finally:
        client.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "model")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="measured per system and replica count (two halves: A B B A)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds of load before each measured half, not counted")
    parser.add_argument("--rounds", type=int, default=1, help="A B B A rounds")
    parser.add_argument("--reloads", type=int, default=3, help="measured reloads per system")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker and per replica")
    args = parser.parse_args()
    model = args.model.resolve()
    work = Path(tempfile.mkdtemp(prefix="svcluster", dir="/tmp"))
    cache = Path(os.environ.setdefault("SENSEVOICE_CACHE_DIR", "/tmp/sensevoice-bench-cache"))
    copy = second_model(model, cache / "cluster-bench")
    # Both systems' processes read these (children inherit this environment).
    os.environ.update(SENSEVOICE_THREADS=str(args.threads),
                      SENSEVOICE_MODEL_ROOTS=f"{model.parent},{copy.parent}",
                      SENSEVOICE_ENABLE_FILE_WATCH="false",
                      # Both models' L2 snapshots stay (the copy's and the original's), and a
                      # fresh load of the copy (its first) may take minutes on a busy machine.
                      SENSEVOICE_KEEP_SNAPSHOTS="4", SENSEVOICE_HOTRELOAD_TIMEOUT="600")
    settings = Settings()
    audio = clip_bytes()
    print(cpu_line(args.threads))
    print(f"model: {model}; clip {CLIP_S:g} s ({len(audio) // 1024} KiB FLAC); {args.clients} "
          f"clients; {args.seconds:g} s measured per system after {args.settle:g} s settling, "
          f"{args.rounds} A-B-B-A round(s); batching wait {settings.batch_wait_ms:g} ms; "
          f"logs in {work}", flush=True)
    rows: list[str] = []
    for replicas in args.replicas:
        os.environ["SENSEVOICE_WORKERS"] = str(replicas)  # the supervisor's, as replicas
        supervisor = start(f"supervisor-{replicas}", model, settings.batch_wait_ms, work)
        fleet: ClusterService | None = None
        try:
            # One after the other: the first load of a full-size model builds its L2 snapshot
            # (minutes on 2 cores); the cluster's replicas then load from it.
            wait_ready(supervisor)
            assert supervisor.status is not None
            print(f"supervisor: {len(supervisor.status.workers)} worker(s), torch threads "
                  f"{[w.threads for w in supervisor.status.workers]}", flush=True)
            started = time.monotonic()
            fleet = start_cluster(model, replicas, work)
            ready = fleet.ready(replicas)
            status = json.loads(fleet.command("status", "--json"))
            print(f"{replicas} replica(s): up and ready in {time.monotonic() - started:.1f} s, "
                  f"serving {ready['fingerprint'][:8]}; torch threads "
                  f"{[r['report']['threads'] for r in status['replicas'] if r['report']]}",
                  flush=True)
            systems: dict[str, Service | ClusterService] = {"supervisor": supervisor,
                                                           "cluster": fleet}
            for system in systems.values():  # warm: page in, prime kernels
                load(system, 2, 3.0, audio, Run())  # type: ignore[arg-type]
            for name, run in measure(systems, args, audio).items():
                rate = len(run.latencies) / run.seconds
                rows.append(f"{replicas:>8} {name:>10} {rate:>7.2f} {rate * CLIP_S:>9.1f} "
                            f"{percentile(run.latencies, 50):>7.3f} "
                            f"{percentile(run.latencies, 99):>7.3f} {len(run.errors):>6}")
                print(rows[-1], flush=True)
            if args.reloads > 0:
                for name, values in reload_times(supervisor, fleet, [model, copy],
                                                 args.reloads).items():
                    rows.append(f"{replicas:>8} {name:>10} reload: median "
                                f"{statistics.median(values):.2f} s, max {max(values):.2f} s "
                                f"over {len(values)}")
                    print(rows[-1], flush=True)
        finally:
            if fleet is not None:
                fleet.stop()
            supervisor.process.terminate()
            supervisor.process.wait(timeout=60)
    print(f"\n{'replicas':>8} {'system':>10} {'req/s':>7} {'audio s/s':>9} {'p50 s':>7} "
          f"{'p99 s':>7} {'failed':>6}")
    print("\n".join(rows))
    print("\nfor later, on a quiet machine: SENSEVOICE_COMPUTE_CHECK=false python "
          "bench/cluster.py --model /tmp/full --seconds 40 --rounds 2")


if __name__ == "__main__":
    main()
