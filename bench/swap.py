"""Blue-green swap under load, on the full-size random fixture (not a test; prints figures).

    python ../shared/tools/make_full_fixture.py /tmp/sensevoice-full
    python bench/swap.py --model /tmp/sensevoice-full [--swaps 5] [--clip tests/data/zh.mp3]

Starts the real service (supervisor + worker + warm standby), runs one client that sends the
clip back to back, and prints:
- swap time: reload request -> first reply served by the new worker (same weights, L2 hit,
  warm standby ready), per swap and median;
- latency p50/p99 of the steady client before any swap, during swaps (requests overlapping
  [reload request, first reply from the new worker + 1 s]), and while the spent standby is
  replaced afterwards (a torch import competing for the same cores);
- failed requests;
- memory of all service processes: peak sum of RSS and of PSS (shared pages split between the
  processes that map them) during swaps, against one serving worker alone in steady state.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sensevoice_core.client import ServiceError, SupervisorClient
from sensevoice_core.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def memory_kib(pid: int) -> tuple[int, int]:
    """(Rss, Pss) of one process in KiB; zeros if it is gone."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "Rss":
                rss = int(value.split()[0])
            elif key == "Pss":
                pss = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, pss


def service_pids(supervisor_pid: int) -> list[int]:
    pids = [supervisor_pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == supervisor_pid:
            pids.append(int(stat.parent.name))
    return pids


class MemorySampler(threading.Thread):
    """Samples only while `active` is set: reading smaps_rollup of a 2 GiB process costs
    milliseconds of CPU, which would slow the very requests being timed."""

    def __init__(self, supervisor_pid: int):
        super().__init__(daemon=True)
        self.supervisor_pid = supervisor_pid
        self.samples: list[tuple[float, int, int]] = []  # (time, sum rss, sum pss)
        self.stop_event = threading.Event()
        self.active = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.1):
            if not self.active.is_set():
                continue
            totals = [memory_kib(pid) for pid in service_pids(self.supervisor_pid)]
            self.samples.append((time.monotonic(), sum(t[0] for t in totals),
                                 sum(t[1] for t in totals)))

    def peak(self, start: float, end: float) -> tuple[int, int]:
        window = [s for s in self.samples if start <= s[0] <= end]
        return max(s[1] for s in window), max(s[2] for s in window)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--clip", type=Path, default=REPO / "tests" / "data" / "zh.mp3")
    parser.add_argument("--steady-s", type=float, default=20.0)
    parser.add_argument("--timeline", action="store_true", help="print each request near a swap")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="swap-bench-"))
    address = f"ipc://{work}/s.ipc"
    env = {**os.environ, "SENSEVOICE_MODEL_DIR": str(args.model.resolve()),
           "SENSEVOICE_CACHE_DIR": str(work / "cache"), "SENSEVOICE_SUPERVISOR_ADDRESS": address}
    log = open(work / "service.log", "wb")
    supervisor = subprocess.Popen([sys.executable, "-m", "supervisor"], env=env, cwd=work,
                                  stdout=log, stderr=subprocess.STDOUT)
    client = SupervisorClient(address, Settings(supervisor_address=address))

    def wait_standby(timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status = client.status()
                roles = {w.role: w.pid for w in status.workers}
                if status.model and set(roles) == {"serving", "standby"} and len(status.workers) == 2:
                    return roles["serving"]
            except ServiceError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"service not ready; see {work / 'service.log'}")

    try:
        wait_standby()
        print(f"first start: {client.status().model.cache_level} load in "
              f"{client.status().model.load_s:.2f} s")
        audio = args.clip.read_bytes()
        replies: list[tuple[float, float, int, bool]] = []  # sent, received, worker pid, ok
        stop = threading.Event()

        def traffic() -> None:
            own = SupervisorClient(address, Settings(supervisor_address=address))
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    reply = own.transcribe(audio)
                    replies.append((sent, time.monotonic(), reply.worker_pid, True))
                except ServiceError:
                    replies.append((sent, time.monotonic(), 0, False))
            own.close()

        sampler = MemorySampler(supervisor.pid)
        sampler.start()
        thread = threading.Thread(target=traffic)
        thread.start()
        time.sleep(args.steady_s)
        steady_end = time.monotonic()
        steady = [r[1] - r[0] for r in replies if r[3]]
        serving_pid = wait_standby()
        single_rss, single_pss = memory_kib(serving_pid)
        steady_total_pss = sum(memory_kib(pid)[1] for pid in service_pids(supervisor.pid))
        swap_times, switch_times, windows, respawn_windows = [], [], [], []
        for _ in range(args.swaps):
            wait_standby()
            time.sleep(2.0)  # let the standby's start-up settle
            sampler.active.set()
            requested = time.monotonic()
            outcome = client.hot_reload_model()
            if not outcome.ok:
                raise SystemExit(f"reload failed: {outcome.error}")
            new_pid = next(w.pid for w in client.status().workers if w.role == "serving")
            while not any(r[2] == new_pid for r in replies):
                time.sleep(0.005)
            first_new = min(r[1] for r in replies if r[2] == new_pid)
            if args.timeline:
                for sent, received, pid, ok in replies:
                    if received > requested - 1 and sent < first_new + 0.5:
                        print(f"  request sent {sent - requested:+.3f} s, answered "
                              f"{received - requested:+.3f} s by pid {pid}"
                              f"{' (new)' if pid == new_pid else ''}")
            swap_times.append(first_new - requested)
            switch_times.append(outcome.seconds)
            windows.append((requested, first_new + 1.0))
            time.sleep(max(0.0, first_new + 1.0 - time.monotonic()))
            sampler.active.clear()
            wait_standby()
            respawn_windows.append((first_new + 1.0, time.monotonic()))
        stop.set()
        thread.join()
        sampler.stop_event.set()
        sampler.join()

        def latencies(spans: list[tuple[float, float]]) -> list[float]:
            return [r[1] - r[0] for r in replies if r[3] and r[0] > steady_end and any(
                r[0] < end and r[1] > start for start, end in spans)]

        during = latencies(windows)
        respawn = latencies(respawn_windows)
        failed = sum(not r[3] for r in replies)
        peaks = [sampler.peak(start, end) for start, end in windows]
        peak_rss = max(p[0] for p in peaks)
        peak_pss = max(p[1] for p in peaks)
        print(f"clip {args.clip.name}, {len(replies)} requests, {failed} failed")
        print(f"swap time (reload request -> first reply from the new worker, L2 + warm standby): "
              f"median {statistics.median(swap_times):.3f} s, max {max(swap_times):.3f} s "
              f"[{', '.join(f'{t:.3f}' for t in swap_times)}]")
        print(f"  of which reload request -> traffic switched (L2 load + warm-up + health "
              f"check): median {statistics.median(switch_times):.3f} s; the rest is the "
              f"client's request in flight on the old worker, then its first on the new one")
        print(f"latency steady:        p50 {percentile(steady, .5) * 1000:.0f} ms, "
              f"p99 {percentile(steady, .99) * 1000:.0f} ms ({len(steady)} requests)")
        print(f"latency during swaps:  p50 {percentile(during, .5) * 1000:.0f} ms, "
              f"p99 {percentile(during, .99) * 1000:.0f} ms ({len(during)} requests); "
              f"p99 ratio {percentile(during, .99) / percentile(steady, .99):.2f}x")
        if respawn:
            print(f"latency while the standby is replaced: p50 {percentile(respawn, .5) * 1000:.0f}"
                  f" ms, p99 {percentile(respawn, .99) * 1000:.0f} ms ({len(respawn)} requests)")
        gib = 1024 * 1024
        print(f"memory, one serving worker alone: RSS {single_rss / gib:.2f} GiB, "
              f"PSS {single_pss / gib:.2f} GiB")
        print(f"memory, all processes in steady state (supervisor, worker, standby): "
              f"PSS {steady_total_pss / gib:.2f} GiB")
        print(f"memory, peak during swaps, all processes: RSS sum {peak_rss / gib:.2f} GiB "
              f"({peak_rss / single_rss:.2f}x), PSS sum {peak_pss / gib:.2f} GiB "
              f"({peak_pss / single_pss:.2f}x one worker)")
    finally:
        client.close()
        supervisor.terminate()
        supervisor.wait(60)
        log.close()


if __name__ == "__main__":
    main()
