"""bench/swap.py's figures per start method, and how they are printed beside issue 17's targets."""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from swap_probe import Memory, Sample, median, percentile

from sensevoice_core.protocol import ServiceStatus

GIB = 1024 * 1024  # KiB per GiB


@dataclass(frozen=True)
class SwapMemory:
    condition: str  # idle or traffic
    before: Sample
    peak: Sample
    after: Sample

    def ratio(self) -> float | None:
        """Total PSS at the peak over one serving worker's RSS before the swap: every page it
        maps counted whole, what it would take alone (its PSS is smaller by what it shares
        with the fork server, the standby and the other workers)."""
        worker = self.before.serving_worker()
        return self.peak.total.pss / worker.rss if worker and worker.rss else None

    def ratio_beyond_new_weights(self) -> float | None:
        """The same, less the new model's own file-backed pages (the green's: "warming", or
        "serving" beside a "draining" blue): what the swap costs beyond holding a second model,
        the part the fork server can save. A swap to the same weights (a touched file) maps
        one snapshot and would cost about this."""
        worker = self.before.serving_worker()
        roles = self.peak.by_role()
        green = roles.get("warming") or (roles.get("serving") if "draining" in roles else None)
        if not worker or not worker.rss or green is None:
            return None
        return (self.peak.total.pss - green[1].file) / worker.rss


@dataclass
class Figures:
    """One start method's figures, pooled over its rounds."""

    start: str  # the SENSEVOICE_WORKER_START asked for
    method: str = ""  # what status says the workers were started by
    served: str = ""  # compute type and threads, from status
    idle_switch: list[float] = field(default_factory=list)
    idle_first: list[float] = field(default_factory=list)
    traffic_switch: list[float] = field(default_factory=list)
    traffic_first: list[float] = field(default_factory=list)
    before: list[float] = field(default_factory=list)
    during: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    requests: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    spawn: list[float] = field(default_factory=list)  # standbys' spawn request -> Hello
    l1_seconds: list[float] = field(default_factory=list)
    l1_round_trip: list[float] = field(default_factory=list)
    l1_levels: Counter[str] = field(default_factory=Counter)
    l1_new_processes: int = 0
    memory: list[SwapMemory] = field(default_factory=list)

    def note_service(self, status: ServiceStatus, method: str) -> None:
        assert status.model is not None
        threads = sorted({w.threads for w in status.workers if w.role == "serving"})
        serving = sum(w.role == "serving" for w in status.workers)
        self.method = method
        self.served = (f"{status.model.compute_type} ({status.model.compute_reason}), "
                       f"{serving} serving worker(s) x {'/'.join(map(str, threads))} torch "
                       f"thread(s)")

    def p99_ratio(self) -> float | None:
        if not self.before or not self.during:
            return None
        return percentile(self.during, .99) / percentile(self.before, .99)

    def median_swap(self) -> SwapMemory | None:
        """The swap whose peak ratio is the median one (the lower middle for an even count)."""
        ranked = sorted((m for m in self.memory if m.ratio() is not None),
                        key=lambda m: m.ratio() or 0.0)
        return ranked[(len(ranked) - 1) // 2] if ranked else None

    def failed(self) -> int:
        return sum(self.failures.values())


@dataclass(frozen=True)
class Row:
    label: str
    value: Callable[[Figures], float | None]
    unit: str  # "s", "ms", "x", "" (a count)
    limit: float | None = None  # the target: the value must be at most this
    target: str = ""  # how the target reads

    def cell(self, figures: Figures) -> str:
        value = self.value(figures)
        if value is None:
            return "not measured"
        shown = {"s": f"{value:.3f} s", "ms": f"{value * 1000:.1f} ms", "x": f"{value:.2f}x",
                 "": f"{value:g}"}[self.unit]
        if self.limit is None:
            return shown
        return f"{shown} {'met' if value <= self.limit else 'MISSED'}"


def latency(values: Callable[[Figures], list[float]], fraction: float) -> Callable[[Figures],
                                                                                   float | None]:
    return lambda f: percentile(values(f), fraction) if values(f) else None


def swap_ratio(f: Figures) -> float | None:
    swap = f.median_swap()
    return swap.ratio() if swap else None


def swap_ratio_beyond_weights(f: Figures) -> float | None:
    swap = f.median_swap()
    return swap.ratio_beyond_new_weights() if swap else None


ROWS = (
    Row("reload -> traffic switched, idle (median)", lambda f: median(f.idle_switch), "s",
        0.3, "<= 0.3 s"),
    Row("reload -> first reply, new model, idle", lambda f: median(f.idle_first), "s",
        0.5, "<= 0.5 s"),
    Row("reload -> traffic switched, traffic", lambda f: median(f.traffic_switch), "s"),
    Row("reload -> first reply, new model, traffic", lambda f: median(f.traffic_first), "s",
        1.0, "<= 1.0 s"),
    Row("latency p50 before swaps", latency(lambda f: f.before, .5), "s"),
    Row("latency p99 before swaps", latency(lambda f: f.before, .99), "s"),
    Row("latency p50 during swaps", latency(lambda f: f.during, .5), "s"),
    Row("latency p99 during swaps", latency(lambda f: f.during, .99), "s"),
    Row("latency p50 after swaps", latency(lambda f: f.after, .5), "s"),
    Row("latency p99 after swaps", latency(lambda f: f.after, .99), "s"),
    Row("p99 during / p99 before", Figures.p99_ratio, "x", 1.5, "<= 1.5x"),
    Row("failed requests", lambda f: float(f.failed()) if f.requests else None, "", 0, "0"),
    Row("total PSS at peak / one serving worker RSS", swap_ratio, "x", 1.15, "<= 1.15x"),
    Row("  the same, less the new model's weights", swap_ratio_beyond_weights, "x", 1.15,
        "<= 1.15x"),
    Row("standby spawn (request -> Hello, median)", lambda f: median(f.spawn), "s", 0.2,
        "<= 0.2 s"),
    Row("unchanged reload, L1 (outcome.seconds)", lambda f: median(f.l1_seconds), "ms", 0.02,
        "<= 20 ms"),
    Row("unchanged reload, client round trip", lambda f: median(f.l1_round_trip), "ms"),
    Row("processes started by unchanged reloads",
        lambda f: float(f.l1_new_processes) if f.l1_round_trip else None, "", 0, "0"),
)


def gib(kib: int) -> str:
    return f"{kib / GIB:.2f}"


def memory_cell(count: int, memory: Memory) -> str:
    return f"{count}x {gib(memory.pss)} ({gib(memory.anon)}/{gib(memory.file)})"


def print_memory(figures: Figures) -> None:
    swap = figures.median_swap()
    if swap is None:
        print(f"memory, {figures.start}: no swap sampled")
        return
    print(f"memory, {figures.start} ({swap.condition} swap with the median peak of "
          f"{len(figures.memory)}): processes x PSS GiB (anon/file)")
    stages = {"before": swap.before, "peak": swap.peak, "after": swap.after}
    tables = {name: stage.by_role() for name, stage in stages.items()}
    roles = [role for role in dict.fromkeys(r for t in tables.values() for r in t)]
    print(f"  {'role':<12}" + "".join(f"{name:>24}" for name in stages))
    for role in roles:
        cells = [memory_cell(*tables[name][role]) if role in tables[name] else "-"
                 for name in stages]
        print(f"  {role:<12}" + "".join(f"{cell:>24}" for cell in cells))
    totals = [memory_cell(len(stage.by_pid), stage.total) for stage in stages.values()]
    print(f"  {'total':<12}" + "".join(f"{cell:>24}" for cell in totals))
    worker = swap.before.serving_worker()
    if worker is not None:
        print(f"  one serving worker before: RSS {gib(worker.rss)} GiB (alone), PSS "
              f"{gib(worker.pss)} GiB; total PSS at the peak {gib(swap.peak.total.pss)} GiB "
              f"= {swap.ratio():.2f}x its RSS")


def print_report(args: argparse.Namespace, figures: dict[str, Figures], cpu: str,
                 settings: dict[str, str], ran: list[str], seconds: float, work: Path) -> None:
    starts = list(figures)
    order = " ".join(ran)
    print(f"CPU: {cpu}")
    print(f"settings: {' '.join(f'{k}={v}' for k, v in settings.items())}")
    for start, f in figures.items():
        if f.method:
            print(f"{start}: workers started by {f.method} (per status); served {f.served}")
    print(f"model: {args.model} and its copy (another fingerprint, same weights); clip "
          f"{args.clip.name}; {args.clients} clients under traffic; {args.swaps} swaps per "
          f"condition and service; services in order {order}; {seconds:.0f} s in all; logs "
          f"in {work}")
    width = 44
    print(f"{'figure':<{width}}" + "".join(f"{start:>22}" for start in starts) + "  target")
    for row in ROWS:
        cells = "".join(f"{row.cell(figures[start]):>22}" for start in starts)
        print(f"{row.label:<{width}}{cells}  {row.target}")
    for start, f in figures.items():
        counts = ", ".join(f"{n} {level}" for level, n in f.l1_levels.items()) or "none"
        failures = ", ".join(f"{n} {code}" for code, n in f.failures.items()) or "none"
        print(f"{start}: {f.requests} requests, failures: {failures}; unchanged reloads: "
              f"{counts}; {len(f.spawn)} standby spawns; "
              f"latencies from {len(f.before)}/{len(f.during)}/{len(f.after)} requests "
              f"before/during/after")
        for name, values in (("switched idle", f.idle_switch), ("first idle", f.idle_first),
                             ("switched traffic", f.traffic_switch),
                             ("first traffic", f.traffic_first), ("standby spawn", f.spawn)):
            if values:
                print(f"  {start} {name} (s): {' '.join(f'{v:.3f}' for v in values)}")
    for f in figures.values():
        print_memory(f)
