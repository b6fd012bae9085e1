"""What bench/swap.py observes from outside the service: the memory of each service process by
role (from /proc/PID/smaps_rollup), the CPU, the second model directory a swap alternates with,
and percentiles. Torch-free: the bench process must not compete with the service for memory.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cpuinfo import cpu_model_and_flags

from sensevoice_core.client import ServiceError, SupervisorClient
from sensevoice_core.compute import machine_features
from sensevoice_core.layout import model_files
from sensevoice_core.protocol import ServiceStatus
from sensevoice_core.settings import Settings

# The order roles are printed in; "unlisted": a service process that status does not name.
ROLE_ORDER = ("supervisor", "fork server", "serving", "warming", "loading", "standby",
              "starting", "draining", "unlisted")
SAMPLE_S = 0.05  # reading smaps_rollup of a 2 GiB process costs milliseconds of CPU


@dataclass(frozen=True)
class Memory:
    """KiB from smaps_rollup: proportional set size (a page shared by n processes counts 1/n
    in each), its anonymous and file-backed parts (a mapped L2 snapshot is file-backed, shared
    through the page cache), and the resident set size (every page counted whole)."""

    pss: int = 0
    anon: int = 0
    file: int = 0
    rss: int = 0

    def __add__(self, other: Memory) -> Memory:
        return Memory(self.pss + other.pss, self.anon + other.anon, self.file + other.file,
                      self.rss + other.rss)


def memory_of(pid: int) -> Memory | None:
    """None when the process is gone (or not readable)."""
    values: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Pss", "Pss_Anon", "Pss_File", "Rss"):
                values[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    if "Pss" not in values:
        return None  # a zombie maps nothing
    return Memory(values["Pss"], values.get("Pss_Anon", 0), values.get("Pss_File", 0),
                  values.get("Rss", 0))


def descendants(root: int) -> list[int]:
    """Every live process under `root` (children, their children...), found through /proc:
    forked workers are reparented to the supervisor, a fork server's children stay its own."""
    parent_of: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[0] != "Z":
            parent_of[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parent_of.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    return found


def roles_of(status: ServiceStatus) -> dict[int, str]:
    roles = {status.supervisor_pid: "supervisor"}
    roles.update({worker.pid: worker.role for worker in status.workers})
    if status.fork_server_pid is not None:
        roles[status.fork_server_pid] = "fork server"
    return roles


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    by_pid: dict[int, tuple[str, Memory]]  # pid -> (role, memory)

    @property
    def total(self) -> Memory:
        return sum((memory for _, memory in self.by_pid.values()), Memory())

    def by_role(self) -> dict[str, tuple[int, Memory]]:
        """role -> (how many processes, their summed memory), in ROLE_ORDER, then others."""
        summed: dict[str, tuple[int, Memory]] = {}
        for role, memory in self.by_pid.values():
            count, total = summed.get(role, (0, Memory()))
            summed[role] = (count + 1, total + memory)
        order = [*ROLE_ORDER, *sorted(set(summed) - set(ROLE_ORDER))]
        return {role: summed[role] for role in order if role in summed}

    def serving_worker(self) -> Memory | None:
        """One serving worker (the largest when there are several)."""
        serving = [m for role, m in self.by_pid.values() if role == "serving"]
        return max(serving, key=lambda m: m.pss) if serving else None


def sample(client: SupervisorClient, supervisor_pid: int) -> Sample:
    """Every service process's memory, with the role status gives it; "unlisted": one status
    does not name (a worker on its way out, or one forked since status was read)."""
    try:
        roles = roles_of(client.status(timeout=5))
    except ServiceError:
        roles = {supervisor_pid: "supervisor"}
    by_pid = {}
    for pid in [supervisor_pid, *descendants(supervisor_pid)]:
        memory = memory_of(pid)
        if memory is not None:
            role = roles.get(pid, "unlisted")
            by_pid[pid] = (role, memory)
    return Sample(time.monotonic(), by_pid)


class MemorySampler(threading.Thread):
    """Samples every SAMPLE_S while `active` is set (a swap), through its own client."""

    def __init__(self, address: str, supervisor_pid: int):
        super().__init__(daemon=True)
        self.address, self.supervisor_pid = address, supervisor_pid
        self.samples: list[Sample] = []
        self.active = threading.Event()
        self.stopped = threading.Event()

    def run(self) -> None:
        client = SupervisorClient(self.address, Settings(supervisor_address=self.address))
        try:
            while not self.stopped.wait(SAMPLE_S):
                if self.active.is_set():
                    self.samples.append(sample(client, self.supervisor_pid))
        finally:
            client.close()

    def peak(self, start: float, end: float) -> Sample | None:
        window = [s for s in self.samples if start <= s.at <= end]
        return max(window, key=lambda s: s.total.pss) if window else None

    def stop(self) -> None:
        self.stopped.set()
        self.join()


def start_method(status: ServiceStatus) -> str:
    """How the workers were started, per status: fork, spawn, or both (a fallback)."""
    methods = sorted({w.start_method for w in status.workers if w.start_method is not None})
    return "/".join(methods) if methods else "an unreported method"


def cpu_line() -> str:
    """The CPU's model name, its fast paths (AVX2, AVX-512, AMX: yes or no), usable cores."""
    name, flags = cpu_model_and_flags()
    has = {"AVX2": "avx2", "AVX-512": "avx512f", "AMX": "amx_tile"}
    paths = ", ".join(f"{label} {'yes' if flag in flags else 'no'}" for label, flag in has.items())
    return (f"{name}; {paths}; fast paths: {machine_features('cpu').describe()}; "
            f"{len(os.sched_getaffinity(0))} usable cores")


def second_model(model: Path, into: Path) -> Path:
    """A copy of `model` with the same weights (symbolic links: linking would change the
    originals' ctime and so their L3 identity) and one more newline at the end of its config
    (YAML or JSON, either way the same model): another fingerprint, so a reload to it is a real
    swap (a reload of the unchanged model is an L1 hit and starts no worker). An earlier run's
    copy in `into` is reused, so that its L2 snapshot is too."""
    files = model_files(model)  # ModelFileError names what is missing
    copy = into / f"{model.name}-b"
    wanted: dict[str, bytes | Path] = {}
    for path in sorted(model.iterdir()):
        if path == files.config:
            wanted[path.name] = path.read_bytes() + b"\n"
        elif path.is_file():
            wanted[path.name] = path.resolve()
    if copy.is_dir() and sorted(p.name for p in copy.iterdir()) == sorted(wanted) and all(
            (copy / name).read_bytes() == value if isinstance(value, bytes)
            else (copy / name).is_symlink() and (copy / name).resolve() == value
            for name, value in wanted.items()):
        return copy
    if copy.exists():
        raise SystemExit(f"{copy} is not this bench's copy of {model}; remove it or pick "
                         f"another --cache")
    copy.mkdir(parents=True)
    for name, value in wanted.items():
        if isinstance(value, bytes):
            (copy / name).write_bytes(value)
        else:
            (copy / name).symlink_to(value)
    return copy


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
