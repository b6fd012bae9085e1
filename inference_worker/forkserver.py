"""python -m inference_worker.forkserver --backend ADDRESS --parent-pid PID (the supervisor's).

Imports torch once, pays prewarm() on one thread, then forks workers on request (JSON lines on
stdin/stdout); they share its pages copy-on-write. Hazards, measured on 2 Zen 3 cores:
- Never fork with a second thread: a parent that ran a forward on 2 torch threads left its
  child hung in its first parallel op (libgomp's team is gone). numpy's OpenBLAS starts a pool
  at import, so the supervisor sets OPENBLAS_NUM_THREADS=1 here (workers' numpy BLAS: 1 thread);
  a fork is refused unless /proc/self/task holds this one thread.
- CUDA state does not survive fork: this process never touches CUDA (refuses if it did); a
  worker initialises CUDA itself. No ZeroMQ context exists here: each worker makes its own.
- torch.set_num_threads(1) before any op; the child's pick_threads count works (its team
  starts there). Child RNGs are reseeded; single-threaded, no logging lock is held at a fork.
- Killed (kill -9): workers keep serving (they are the supervisor's children); the supervisor
  spawns while it restarts this. Stopped (SIGSTOP): a fork request times out, the supervisor
  kills it and spawns under a new worker id (a late fork's Hello is ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, NoReturn

from sensevoice_core.cli import settings_or_exit
from sensevoice_core.exit_codes import EXIT_BOOT_ERROR
from sensevoice_core.linux import set_process_name
from sensevoice_core.logs import configure_logging

logger = logging.getLogger("sensevoice.forkserver")

REPARENT_WAIT_S = 10.0  # a forked worker waits up to this long to become the supervisor's child


def main(argv: list[str] | None = None) -> int:  # exits the process when done
    parser = argparse.ArgumentParser(prog="python -m inference_worker.forkserver")
    parser.add_argument("--backend", required=True, help="the supervisor's worker socket")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--blas-threads", default="",
                        help="the workers' OPENBLAS_NUM_THREADS (empty: unset); this process "
                             "runs with 1, set before numpy was imported: no BLAS thread pool")
    args = parser.parse_args(argv)
    fresh = FreshSignals.now()  # what `python -m inference_worker` starts with
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when this stops
    settings = settings_or_exit(EXIT_BOOT_ERROR)
    configure_logging("fork server", settings.log_level)
    # Requests come on stdin, answers leave on a private copy of stdout; fd 1 becomes stderr,
    # so that nothing a library prints can corrupt an answer.
    requests = os.fdopen(0, "rb", buffering=0)
    answers = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    try:
        import numpy
        import torch

        torch.set_num_threads(1)  # before any op: no OpenMP team may exist at a fork
        from inference_worker.__main__ import run_worker
        from inference_worker.worker import die_with_parent, prewarm
    except ImportError as e:
        logger.error("cannot import the model code: %s", e)
        return EXIT_BOOT_ERROR
    die_with_parent(args.parent_pid)
    prewarm()
    if args.blas_threads:  # for the workers' own children
        os.environ["OPENBLAS_NUM_THREADS"] = args.blas_threads
    else:
        os.environ.pop("OPENBLAS_NUM_THREADS", None)
    answer(answers, {"ready": True, "pid": os.getpid()})
    logger.info("ready to fork workers")

    def start_worker(worker_id: str) -> NoReturn:
        """In the forked worker (the supervisor's child now): never returns."""
        try:
            wait_until_child_of(args.parent_pid)
            set_process_name(f"sv-worker {worker_id}")
            null = os.open(os.devnull, os.O_RDWR)  # before fd 0 (requests) is free
            requests.close()
            answers.close()
            os.dup2(null, 0)  # stdin: /dev/null, as subprocess.DEVNULL gives a spawned one
            os.close(null)
            fresh.restore()
            random.seed()
            numpy.random.seed()
            torch.seed()
            settings_now = settings_or_exit(EXIT_BOOT_ERROR)
            os._exit(run_worker(worker_id, args.backend, args.parent_pid, settings_now,
                                idle_boot=False, prewarmed=True))
        except BaseException:  # must never return into the server's loop
            logging.getLogger("sensevoice.worker").exception("forked worker %s failed to start",
                                                             worker_id)
        os._exit(EXIT_BOOT_ERROR)

    for line in requests:
        try:
            request = json.loads(line)
            worker_id = str(request["worker_id"])  # a standby needs no idle boot here
            deadline = float(request["deadline"])
        except (ValueError, KeyError, TypeError) as e:
            answer(answers, {"error": f"unreadable fork request: {e}", "permanent": False})
            continue
        refusal = why_not_fork(torch.cuda.is_initialized(), deadline)
        if refusal is not None:
            answer(answers, {"error": refusal[0], "permanent": refusal[1]})
            continue
        try:
            pid = double_fork(start_worker, worker_id)
        except OSError as e:
            answer(answers, {"error": f"fork failed: {e}", "permanent": False})
            continue
        answer(answers, {"pid": pid})
    logging.shutdown()  # stdin closed: the supervisor is stopping
    os._exit(0)  # no teardown of torch's modules one by one


@dataclass(frozen=True)
class FreshSignals:
    """The signal dispositions and mask of a freshly started Python (SIGPIPE and SIGXFSZ
    ignored, its SIGINT handler, and what this process inherited), for a forked worker to
    start from exactly what a spawned one has: a worker left with SIGPIPE at SIG_DFL dies at
    its first log line once the log reader is gone."""

    handlers: tuple[tuple[int, Callable | int], ...]
    mask: frozenset[int]

    @classmethod
    def now(cls) -> FreshSignals:
        handlers = []
        for sig in signal.valid_signals():
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                continue
            handler = signal.getsignal(sig)
            if handler is not None:  # None: set outside Python, left as inherited
                handlers.append((int(sig), handler))
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        return cls(tuple(handlers), frozenset(int(s) for s in mask))

    def restore(self) -> None:
        for sig, handler in self.handlers:
            try:
                signal.signal(sig, handler)
            except (OSError, ValueError):  # a signal Python may not set (SIGRTMIN+n in use)
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)


def answer(stream: BinaryIO, message: dict[str, object]) -> None:
    stream.write(json.dumps(message).encode() + b"\n")


def thread_names() -> list[str]:
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:  # it exited meanwhile
            pass
    return names


def why_not_fork(cuda_initialised: bool, deadline: float) -> tuple[str, bool] | None:
    """Why this process may not fork now, and whether that lasts; None: it may."""
    threads = thread_names()
    if len(threads) != 1:
        why = (f"the fork server runs {len(threads)} threads ({', '.join(threads)}); a fork "
               f"could leave the worker waiting on a lock or an OpenMP team that no longer "
               f"exists")
        return why, True
    if cuda_initialised:
        return "the fork server initialised CUDA, which a forked child cannot use", True
    if time.monotonic() > deadline:
        return "the request's deadline passed before it was read", False
    return None


def double_fork(child: Callable[[str], NoReturn], worker_id: str) -> int:
    """Run child(worker_id) in a grandchild whose parent exits at once, so that it is
    reparented to the nearest subreaper (the supervisor). Returns its pid."""
    read_end, write_end = os.pipe()
    intermediate = os.fork()
    if intermediate == 0:
        try:
            os.close(read_end)
            worker = os.fork()
            if worker == 0:
                os.close(write_end)
                child(worker_id)
            os.write(write_end, str(worker).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        os.waitpid(intermediate, 0)
        text = b""
        while chunk := os.read(read_end, 64):
            text += chunk
    finally:
        os.close(read_end)
    if not text:
        raise OSError("the intermediate process exited without forking the worker")
    return int(text)


def wait_until_child_of(parent_pid: int) -> None:
    """Wait (milliseconds) until the intermediate has exited and this process belongs to the
    supervisor (a subreaper), which can then wait for it like any child."""
    give_up = time.monotonic() + REPARENT_WAIT_S
    while os.getppid() != parent_pid:
        if time.monotonic() > give_up:
            os._exit(EXIT_BOOT_ERROR)
        time.sleep(0.001)


if __name__ == "__main__":
    sys.exit(main())
