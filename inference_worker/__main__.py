"""python -m inference_worker --backend ADDRESS --worker-id ID [--parent-pid PID] [--standby]

Started by the supervisor, not by hand (or forked by inference_worker.forkserver, which then
calls run_worker). Exit codes (sensevoice_core.exit_codes): 0 stopped,
3 could not boot, 4 the model it was asked to load failed (the supervisor does not respawn it
in a loop).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from pathlib import Path

from sensevoice_core.cli import settings_or_exit
from sensevoice_core.exit_codes import EXIT_BOOT_ERROR
from sensevoice_core.logs import configure_logging
from sensevoice_core.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference_worker")
    parser.add_argument("--backend", required=True, help="the supervisor's worker socket")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--standby", action="store_true",
                        help="a spare: start up on idle CPU only, so serving is not slowed")
    args = parser.parse_args(argv)
    idle_boot = args.standby and enter_idle_priority()
    # Ctrl-C reaches the whole process group; the supervisor decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = settings_or_exit(EXIT_BOOT_ERROR)
    return run_worker(args.worker_id, args.backend, args.parent_pid, settings, idle_boot,
                      prewarmed=False)


def run_worker(worker_id: str, backend: str, parent_pid: int, settings: Settings,
               idle_boot: bool, prewarmed: bool) -> int:
    """A worker's life after its start, spawned (main) or forked (forkserver.py, where torch is
    imported and prewarm() was paid before the fork): exits the process when done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(f"worker {worker_id}", settings.log_level)
    try:
        import torch

        from inference_worker.worker import InferenceWorker, die_with_parent, prewarm
    except ImportError as e:
        logging.getLogger("sensevoice.worker").error("cannot import the model code: %s", e)
        return EXIT_BOOT_ERROR
    if parent_pid:
        die_with_parent(parent_pid)
    cores = usable_cores()
    threads, why = pick_threads(settings.threads, settings.workers, cores)
    torch.set_num_threads(threads)
    worker_log = logging.getLogger("sensevoice.worker")
    if settings.threads == 0 and settings.workers > cores:
        worker_log.warning("SENSEVOICE_WORKERS=%d is more than the %d usable cores: the "
                           "workers share cores; lower SENSEVOICE_WORKERS", settings.workers,
                           cores)
    worker_log.info("torch threads: %d (%s)", threads, why)
    worker = InferenceWorker(worker_id, backend, settings)

    def on_sigterm(signum: int, frame: object) -> None:
        if parent_pid and os.getppid() != parent_pid:
            # The supervisor died (PR_SET_PDEATHSIG): answers would have nowhere to go.
            os._exit(0)
        worker.request_stop(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    if idle_boot:
        # Before any thread exists: threads inherit the policy of the thread creating them.
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    if not prewarmed:
        prewarm()
    code = worker.run()
    # Skip the interpreter's teardown (every module and tensor finalised one by one): the
    # socket is closed and the logs are flushed; the OS reclaims the rest at once.
    logging.shutdown()
    os._exit(code)


def pick_threads(setting: int, workers: int, cores: int) -> tuple[int, str]:
    """Torch's intra-op threads for this worker, and why (SENSEVOICE_THREADS; 0: auto).

    Auto divides the usable cores (usable_cores(), read once by main) among the SENSEVOICE_WORKERS serving
    workers, at least one each: with more workers than cores they share cores (main warns).
    The warm standby and a reload's green are not counted: a standby computes nothing until
    it serves (it then replaces a worker), and a green warms up on one thread
    (warmup.warm_up) and serves only once the worker it replaces drains, so the overlap is
    that drain's last requests.
    """
    if setting > 0:
        return setting, "SENSEVOICE_THREADS"
    threads = max(1, cores // workers)
    return threads, (f"auto: {cores} usable core{'s' if cores != 1 else ''} / {workers} "
                     f"serving worker{'s' if workers != 1 else ''}; set SENSEVOICE_THREADS "
                     f"to override")


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota
    (docker --cpus, a Kubernetes CPU limit), rounded up."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def cgroup_cpu_quota(root: Path) -> float | None:
    """CPUs the cgroup allows (quota / period), None without a limit: cgroup v2's cpu.max
    ("max 100000" or "200000 100000"), else v1's cpu.cfs_quota_us / cpu.cfs_period_us."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def enter_idle_priority() -> bool:
    """SCHED_IDLE for the start-up (imports, first construction), if the OS lets us come back.

    A standby's start-up (mostly importing torch) is seconds of CPU after every reload; at
    idle priority it only takes CPU the serving worker leaves unused. Returns False, changing nothing, where switching back
    to normal scheduling would need privileges this process lacks.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return True
    except (AttributeError, OSError):
        return False


if __name__ == "__main__":
    sys.exit(main())
