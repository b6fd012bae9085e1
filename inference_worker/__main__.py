"""python -m inference_worker --backend ADDRESS --worker-id ID [--parent-pid PID]

Started by the supervisor, not by hand. Exit codes (sensevoice_core.exit_codes): 0 stopped,
3 could not boot, 4 the model it was asked to load failed (the supervisor does not respawn it
in a loop).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from sensevoice_core.cli import settings_or_exit
from sensevoice_core.exit_codes import EXIT_BOOT_ERROR
from sensevoice_core.logs import configure_logging


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
    configure_logging(f"worker {args.worker_id}", settings.log_level)
    try:
        import torch

        from inference_worker.worker import InferenceWorker, die_with_parent, prewarm
    except ImportError as e:
        logging.getLogger("sensevoice.worker").error("cannot import the model code: %s", e)
        return EXIT_BOOT_ERROR
    if args.parent_pid:
        die_with_parent(args.parent_pid)
    threads, why = pick_threads(settings.threads, settings.workers)
    torch.set_num_threads(threads)
    logging.getLogger("sensevoice.worker").info("torch threads: %d (%s)", threads, why)
    worker = InferenceWorker(args.worker_id, args.backend, settings)

    def on_sigterm(signum: int, frame: object) -> None:
        if args.parent_pid and os.getppid() != args.parent_pid:
            # The supervisor died (PR_SET_PDEATHSIG): answers would have nowhere to go.
            os._exit(0)
        worker.request_stop(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    if idle_boot:
        # Before any thread exists: threads inherit the policy of the thread creating them.
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    prewarm()
    code = worker.run()
    # Skip the interpreter's teardown (every module and tensor finalised one by one): the
    # socket is closed and the logs are flushed; the OS reclaims the rest at once.
    logging.shutdown()
    os._exit(code)


def pick_threads(setting: int, workers: int) -> tuple[int, str]:
    """Torch's intra-op threads for this worker, and why (SENSEVOICE_THREADS; 0: auto).

    Auto divides the cores this process may run on among the SENSEVOICE_WORKERS serving
    workers, at least one each, so that they never oversubscribe the cores. The warm standby
    and a reload's green are not counted: a standby computes nothing until it serves (it then
    replaces a worker), and a green warms up on one thread (worker.warm_up) and serves only
    once the worker it replaces drains, so the overlap is that drain's last requests.
    """
    if setting > 0:
        return setting, "SENSEVOICE_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    threads = max(1, cores // workers)
    return threads, (f"auto: {cores} usable core{'s' if cores != 1 else ''} / {workers} "
                     f"serving worker{'s' if workers != 1 else ''}; set SENSEVOICE_THREADS "
                     f"to override")


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
