"""Run the real service (supervisor + workers) as a subprocess for a test, and stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import zmq

from sensevoice_core.client import ServiceError, SupervisorClient
from sensevoice_core.protocol import (
    ReplyMessage,
    ServiceStatus,
    StatusRequest,
    decode_reply,
    encode,
)
from sensevoice_core.settings import Settings

REPO = Path(__file__).resolve().parent.parent


# Every service and UI process a test started; conftest kills any still running at the end,
# so a test that fails before its stop() leaves nothing behind.
STARTED: list[subprocess.Popen] = []


def process_alive(pid: int) -> bool:
    """Alive and not a zombie (an exited child nobody has reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@dataclass
class Service:
    process: subprocess.Popen
    address: str
    log_path: Path
    client: SupervisorClient
    seen_pids: set[int]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> ServiceStatus:
        status = self.client.status()
        self.seen_pids.update(w.pid for w in status.workers)
        return status

    def wait_until(self, condition, timeout: float = 60.0, what: str = "condition") -> ServiceStatus:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"supervisor exited ({self.process.returncode}) waiting for "
                                     f"{what}:\n{self.log()}")
            try:
                status = self.status()
                if condition(status):
                    return status
            except ServiceError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()}")

    def wait_ready(self, standby: bool = True, timeout: float = 90.0) -> ServiceStatus:
        def ready(status: ServiceStatus) -> bool:
            roles = [w.role for w in status.workers]
            return (status.model is not None and "serving" in roles
                    and (not standby or "standby" in roles) and not status.reloading)
        return self.wait_until(ready, timeout, "a serving worker" + (" and a standby" * standby))

    def serving_pid(self) -> int:
        return next(w.pid for w in self.status().workers if w.role == "serving")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop the supervisor; assert it exits and leaves no worker behind."""
        try:
            self.status()
        except ServiceError:
            pass
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"supervisor did not stop on {sig}:\n{self.log()}")
        deadline = time.monotonic() + 5
        while any(process_alive(pid) for pid in self.seen_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        orphans = [pid for pid in self.seen_pids if process_alive(pid)]
        assert not orphans, f"worker processes left running: {orphans}\n{self.log()}"
        return code


def start_service(work_dir: Path, model_dir: Path | None, wait: bool = True,
                  standby: bool = True, umask: int | None = None,
                  address: str | None = None, **env: str) -> Service:
    """Start `python -m supervisor` in work_dir, with its own cache and socket.

    env: SENSEVOICE_* settings by their lower-case suffix; client_curve_dir (not a setting) is
    the test client's CURVE directory, curve_dir by default.
    """
    client_curve_dir = env.pop("client_curve_dir", env.get("curve_dir"))
    work_dir.mkdir(parents=True, exist_ok=True)
    if address is None:
        socket_dir = tempfile.mkdtemp(prefix="sv", dir="/tmp")  # ipc paths must be short
        address = f"ipc://{socket_dir}/s.ipc"
    environment = {
        **os.environ,
        "SENSEVOICE_CACHE_DIR": str(work_dir / "cache"),
        "SENSEVOICE_SUPERVISOR_ADDRESS": address,
        "SENSEVOICE_THREADS": "1",
        "SENSEVOICE_WARM_STANDBY": "true" if standby else "false",
        "SENSEVOICE_LOG_LEVEL": "DEBUG",
        **{f"SENSEVOICE_{key.upper()}": value for key, value in env.items()},
    }
    if model_dir is not None:
        environment["SENSEVOICE_MODEL_DIR"] = str(model_dir)
    log_path = work_dir / "service.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "supervisor"], cwd=work_dir,
                                   env=environment, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL,
                                   preexec_fn=None if umask is None else lambda: os.umask(umask))
    address = address.replace("//0.0.0.0:", "//127.0.0.1:")  # where clients connect
    client = SupervisorClient(address, Settings(supervisor_address=address,
                                                curve_dir=client_curve_dir))
    service = Service(process, address, log_path, client, set())
    STARTED.append(process)
    if wait:
        deadline = time.monotonic() + 30
        while (address.startswith("ipc://") and not Path(address[6:]).exists()
               and time.monotonic() < deadline):
            if process.poll() is not None:
                break
            time.sleep(0.02)
        service.wait_ready(standby=standby)
    return service


class BackgroundTraffic:
    """One client sending a clip back to back from a thread, collecting replies and failures.

        with BackgroundTraffic(service, clip) as traffic:
            ...  # reload, kill workers
        assert not traffic.failures
    """

    def __init__(self, service: Service, clip: Path):
        self.service = service
        self.clip = clip
        self.replies: list = []
        self.times: list[float] = []  # time.monotonic() when each reply arrived
        self.failures: list[ServiceError] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        client = SupervisorClient(self.service.address,
                                  Settings(supervisor_address=self.service.address))
        while not self._stop.is_set():
            try:
                self.replies.append(client.transcribe(self.clip))
                self.times.append(time.monotonic())
            except ServiceError as e:
                self.failures.append(e)
        client.close()

    def wait_for_more(self, count: int = 3, timeout: float = 30.0) -> None:
        """Wait until `count` more replies have arrived; AssertionError after `timeout`."""
        target = len(self.replies) + count
        deadline = time.monotonic() + timeout
        while len(self.replies) < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.replies)} replies, {target} expected after "
                                     f"{timeout:g} s; failures: {self.failures[-3:]}\n"
                                     f"{self.service.log()}")
            time.sleep(0.01)

    def __enter__(self) -> BackgroundTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP a process for the block: what the supervisor sent it waits, unread, in its socket."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if process_alive(pid):
            os.kill(pid, signal.SIGCONT)


class OrderedClient:
    """One DEALER socket to the supervisor, which handles one connection's messages in the
    order they were sent: so once `barrier()` has its status reply, every message sent before
    it has been handled.

        with OrderedClient(service.address) as client:
            first = client.send(ReloadRequest(...))
            status = client.barrier()  # the reload request has been handled
            outcome = client.reply(first).outcome
    """

    def __init__(self, address: str):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.replies: dict[str | None, ReplyMessage] = {}

    def send(self, message, payload: bytes | None = None) -> str:
        self.socket.send_multipart(encode(message, payload))
        return message.request_id

    def reply(self, request_id: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while request_id not in self.replies:
            left = deadline - time.monotonic()
            assert left > 0 and self.socket.poll(left * 1000), f"no reply to {request_id}"
            reply = decode_reply(self.socket.recv_multipart())
            self.replies[reply.request_id] = reply
        return self.replies.pop(request_id)

    def barrier(self, timeout: float = 10.0) -> ServiceStatus:
        """The supervisor's status once it has handled every message sent before."""
        return self.reply(self.send(StatusRequest()), timeout).status

    def __enter__(self) -> OrderedClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.socket.close()
        self.context.term()
