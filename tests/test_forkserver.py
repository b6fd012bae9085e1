"""Workers forked by the fork server (SENSEVOICE_WORKER_START=fork, the default) against spawned
ones, reloads under traffic, and the fork server killed, stopped, or fed garbage."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from model_factory import DEMO_MODEL
from service import BackgroundTraffic, Service, process_alive, start_service, stopped

from sensevoice_core.client import SupervisorClient
from sensevoice_core.settings import Settings
from supervisor.launch import leave_idle_priority, reap_orphans

pytestmark = pytest.mark.slow

EVAL = Path(__file__).parent / "data" / "demo_eval"
REFS = {ref["file"]: ref for ref in json.loads((EVAL / "refs.json").read_text())}
CLIPS = ["en_00.flac", "en_02.flac", "zh_04.flac"]
TRAFFIC_CLIP = EVAL / "en_02.flac"


@pytest.fixture(scope="module")
def forked(tmp_path_factory: pytest.TempPathFactory):
    running = start_service(tmp_path_factory.mktemp("forked"), DEMO_MODEL, worker_start="fork")
    yield running
    server = running.status().fork_server_pid
    assert running.stop() == 0
    assert server is not None and not process_alive(server), "the fork server outlived the stop"


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory):
    running = start_service(tmp_path_factory.mktemp("spawned"), DEMO_MODEL, worker_start="spawn")
    yield running
    assert running.stop() == 0


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def comparable(reply) -> dict:
    """What a transcription says, without where and how fast it ran."""
    return reply.model_dump(exclude={"request_id", "worker_pid", "inference_s"})


def test_workers_are_forked_children_of_the_supervisor_and_a_standby_starts_fast(forked: Service):
    status = forked.wait_ready()
    server = status.fork_server_pid
    assert server is not None and process_alive(server)
    assert threads_of(server) == 1  # what makes forking it safe
    assert {w.start_method for w in status.workers} == {"fork"}
    for worker in status.workers:
        assert parent_of(worker.pid) == status.supervisor_pid, "not reparented to the supervisor"
    standby = next(w for w in status.workers if w.role == "standby")
    print(f"\nforked standby: asked for -> Hello in {standby.start_s:.3f} s")
    assert standby.start_s is not None and standby.start_s < 20.0  # spawned: seconds of import


def test_forked_and_spawned_workers_give_the_same_results(forked: Service, spawned: Service):
    assert {w.start_method for w in spawned.wait_ready().workers} == {"spawn"}
    assert spawned.status().fork_server_pid is None
    for name in CLIPS:
        for use_itn in (False, True):
            a = forked.client.transcribe(EVAL / name, use_itn=use_itn, word_timestamps=True)
            b = spawned.client.transcribe(EVAL / name, use_itn=use_itn, word_timestamps=True)
            assert comparable(a) == comparable(b), name
            assert a.text == REFS[name]["withitn" if use_itn else "woitn"]
            assert a.token_ids and a.segments[0].tokens


def traits(pid: int, home: Path) -> dict[str, object]:
    """What a worker process inherits: signal dispositions and mask, stdin, umask, cwd, nice,
    and its open files (sockets and anonymous inodes left out: zmq's own); paths under its
    service's directory `home` relative to it."""
    fields = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    targets = [os.readlink(f"/proc/{pid}/fd/{fd}").replace(str(home), "HOME")
               for fd in os.listdir(f"/proc/{pid}/fd")]
    files = sorted({t for t in targets if not t.startswith(("socket:", "anon_inode:"))})
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {"SigIgn": fields["SigIgn"], "SigBlk": fields["SigBlk"], "SigCgt": fields["SigCgt"],
            "stdin": os.readlink(f"/proc/{pid}/fd/0"), "umask": fields.get("Umask"),
            "cwd": os.readlink(f"/proc/{pid}/cwd").replace(str(home), "HOME"), "nice": int(stat[16]), "files": files}


def test_a_forked_worker_starts_from_what_a_spawned_one_has(forked: Service, spawned: Service):
    """SIGPIPE still ignored (else it dies at its first log line once the log reader is gone),
    stdin /dev/null (not zmq's eventfd), and nothing of the fork server's left open."""
    fork = next(w for w in forked.wait_ready(standby=False).workers if w.role == "serving")
    spawn = next(w for w in spawned.wait_ready(standby=False).workers if w.role == "serving")
    a = traits(fork.pid, forked.log_path.parent)
    b = traits(spawn.pid, spawned.log_path.parent)
    assert a["stdin"] == "/dev/null"
    assert int(str(a["SigIgn"]), 16) & (1 << (signal.SIGPIPE - 1)), "SIGPIPE not ignored"
    assert a == b
    comm = Path(f"/proc/{fork.pid}/comm").read_text().strip()
    assert comm == f"sv-worker {fork.worker_id}", "ps cannot tell a worker from the fork server"


def test_twenty_reloads_under_traffic_fail_no_request(forked: Service):
    """Each reload's new standby is forked while the client's requests are in flight; every
    forked worker serves the clip right (its own sockets, locks and RNG state)."""
    expected = REFS[TRAFFIC_CLIP.name]["woitn"]
    forked.wait_ready()
    serving: list[int] = []
    with BackgroundTraffic(forked, TRAFFIC_CLIP) as traffic:
        traffic.wait_for_more()
        for _ in range(20):
            outcome = forked.client.hot_reload_model(force_fresh=True)
            assert outcome.ok, outcome
            traffic.wait_for_more(1)
            serving.append(forked.serving_pid())
    assert not traffic.failures, traffic.failures
    assert len(set(serving)) == 20  # a new worker each time
    assert {reply.text for reply in traffic.replies} == {expected}
    assert set(serving) <= {reply.worker_pid for reply in traffic.replies}
    status = forked.wait_ready()
    assert {w.start_method for w in status.workers} == {"fork"}
    # A fork past FORK_TIMEOUT_S on a saturated machine falls back to spawn, which is fine as
    # long as no request failed and forking stayed the rule.
    assert forked.log().count("Spawning worker") <= 5


def test_a_killed_fork_server_is_restarted_and_workers_keep_serving(forked: Service):
    server = forked.wait_ready().fork_server_pid
    assert server is not None
    before = forked.log()
    os.kill(server, signal.SIGKILL)
    assert forked.client.transcribe(TRAFFIC_CLIP).text == REFS[TRAFFIC_CLIP.name]["woitn"]
    status = forked.status()
    # The reload takes the standby; the next one waits for the restarting server (its last
    # start-up was quick) rather than import torch beside it.
    assert forked.client.hot_reload_model(force_fresh=True).ok
    status = forked.wait_until(
        lambda s: any(w.role == "standby" and w.start_method == "fork" and w.pid not in
                      {x.pid for x in status.workers} for w in s.workers), 60, "a forked standby")
    assert status.fork_server_pid not in (None, server)
    log = forked.log()[len(before):]
    assert f"The fork server (pid {server}) was killed by SIGKILL" in log
    assert "waits for the fork server" in log and "Spawning worker" not in log, log
    assert forked.client.transcribe(TRAFFIC_CLIP).text == REFS[TRAFFIC_CLIP.name]["woitn"]


def test_a_stopped_fork_server_is_replaced_and_the_reload_spawns(forked: Service):
    """The fork request the stopped server never answers does not stall the loop (status is
    answered meanwhile); its worker is spawned under a new id, which the log names."""
    before = forked.wait_ready()
    server = before.fork_server_pid
    assert server is not None
    status_client = SupervisorClient(forked.address, Settings(supervisor_address=forked.address))
    slowest = 0.0
    try:
        with stopped(server), ThreadPoolExecutor(1) as pool:
            reload = pool.submit(forked.client.hot_reload_model, force_fresh=True)
            while not reload.done() or "so it was killed" not in forked.log():
                asked = time.monotonic()
                status_client.status()
                slowest = max(slowest, time.monotonic() - asked)
                time.sleep(0.02)
            assert reload.result().ok
    finally:
        status_client.close()
    print(f"\nslowest status while the fork request went unanswered: {slowest * 1000:.0f} ms")
    assert slowest < 1.0, "the supervisor's loop waited for the stopped fork server"
    log = forked.log()
    assert "did not answer a fork request within 2 s (stopped or stuck), so it was killed" in log
    spawned_as = re.search(r"Spawning worker (w\d+) \(forked as (w\d+): unanswered\)", log)
    assert spawned_as is not None and spawned_as[1] != spawned_as[2], \
        "the spawned worker reused the id of the unanswered fork request, or the log hides it"
    status = forked.wait_until(lambda s: any(w.worker_id == spawned_as[1] and w.role == "standby"
                                             for w in s.workers), 90, "the spawned standby")
    assert next(w for w in status.workers if w.worker_id == spawned_as[1]).start_method == "spawn"
    assert not process_alive(server)
    assert forked.client.transcribe(TRAFFIC_CLIP).text == REFS[TRAFFIC_CLIP.name]["woitn"]
    forked.wait_until(lambda s: s.fork_server_pid not in (None, server), 60, "a new fork server")


def log_match(service: Service, start: int, pattern: str, timeout: float = 30.0) -> re.Match:
    """The first match of `pattern` in the service's log after offset `start`, once written."""
    deadline = time.monotonic() + timeout
    while (found := re.search(pattern, service.log()[start:])) is None:
        assert time.monotonic() < deadline, f"no {pattern!r} in:\n{service.log()[start:]}"
        time.sleep(0.02)
    return found


def test_a_fork_server_killed_with_a_request_in_hand(forked: Service):
    """The request it never answered is spawned under a new id; the server is restarted."""
    server = forked.wait_ready().fork_server_pid
    assert server is not None
    with stopped(server):
        start = len(forked.log())
        assert forked.client.hot_reload_model(force_fresh=True).ok  # takes the standby
        asked = log_match(forked, start, rf"Asked the fork server \(pid {server}\) for worker "
                                         rf"(w\d+)")
        os.kill(server, signal.SIGKILL)
    lost = asked[1]
    spawned_as = log_match(forked, start, rf"Spawning worker (w\d+) \(forked as {lost}: "
                                          rf"unanswered\): the fork server was killed by SIGKILL")
    status = forked.wait_until(lambda s: any(w.worker_id == spawned_as[1] and w.role == "standby"
                                             for w in s.workers), 90, "the spawned standby")
    assert lost not in {w.worker_id for w in status.workers}
    forked.wait_until(lambda s: s.fork_server_pid not in (None, server), 60, "a new fork server")
    assert forked.client.transcribe(TRAFFIC_CLIP).text == REFS[TRAFFIC_CLIP.name]["woitn"]


def test_a_standby_starved_on_idle_cpu_is_moved_to_normal_priority():
    """leave_idle_priority on a real process at SCHED_IDLE (as a spawned standby starts)."""
    code = ("import os, time\n"
            "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
            "print(flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"\n"
        assert os.sched_getscheduler(child.pid) == os.SCHED_IDLE
        assert leave_idle_priority(child.pid)
        assert os.sched_getscheduler(child.pid) == os.SCHED_OTHER
        assert not leave_idle_priority(child.pid)  # already normal: nothing to do
        assert not leave_idle_priority(0), "pid 0 (a fork not answered yet) is not this process"
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def start_fork_server(**env: str) -> subprocess.Popen:
    """The fork server on its own, as the test process's child (nothing is forked here)."""
    return subprocess.Popen(
        [sys.executable, "-m", "inference_worker.forkserver", "--backend", "ipc:///nonexistent",
         "--parent-pid", str(os.getpid())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env={**os.environ, **env})


def ask(server: subprocess.Popen, line: bytes | None, timeout: float = 120.0) -> dict:
    assert server.stdin is not None and server.stdout is not None
    if line is not None:
        server.stdin.write(line + b"\n")
        server.stdin.flush()
    assert select.select([server.stdout], [], [], timeout)[0], "the fork server did not answer"
    return json.loads(server.stdout.readline())


def test_the_fork_server_refuses_bad_requests_and_forks_only_single_threaded():
    quiet = start_fork_server(OPENBLAS_NUM_THREADS="1")
    pooled = start_fork_server(OPENBLAS_NUM_THREADS="2")  # numpy's BLAS pool: a second thread
    try:
        assert ask(quiet, None)["ready"] and ask(pooled, None)["ready"]
        assert threads_of(quiet.pid) == 1
        garbage = ask(quiet, b"\xff not json")
        assert "unreadable fork request" in garbage["error"] and not garbage["permanent"]
        missing = ask(quiet, b'{"worker_id": "w9"}')
        assert "unreadable fork request" in missing["error"]
        late = ask(quiet, json.dumps({"worker_id": "w9", "standby": True,
                                      "deadline": time.monotonic() - 1}).encode())
        assert "deadline passed" in late["error"] and not late["permanent"]
        refused = ask(pooled, json.dumps({"worker_id": "w9", "standby": True,
                                          "deadline": time.monotonic() + 60}).encode())
        assert refused["permanent"] and "runs 2 threads" in refused["error"]
        for server in (quiet, pooled):
            assert server.stdin is not None
            server.stdin.close()  # end of requests: it exits
            assert server.wait(30) == 0
    finally:
        for server in (quiet, pooled):
            if server.poll() is None:
                server.kill()
                server.wait()
            for pipe in (server.stdin, server.stdout):
                if pipe is not None:
                    pipe.close()


def test_start_up_answers_while_the_fork_server_imports_and_a_kill_takes_it_along(
        tmp_path: Path):
    """While the first fork server imports torch, status is answered at once and a request
    waits for the first (forked) worker; a killed supervisor leaves no process behind."""
    running = start_service(tmp_path, DEMO_MODEL, wait=False, worker_start="fork")
    socket = Path(running.address[len("ipc://"):])
    deadline = time.monotonic() + 30
    while not socket.exists():
        assert time.monotonic() < deadline and running.process.poll() is None, running.log()
        time.sleep(0.01)
    asked = time.monotonic()
    early = running.client.status()
    assert time.monotonic() - asked < 10.0, "status waited for the fork server's start-up"
    assert early.model is None
    reply = running.client.transcribe(TRAFFIC_CLIP)  # sent before any worker exists
    assert reply.text == REFS[TRAFFIC_CLIP.name]["woitn"]
    status = running.wait_ready()
    server = status.fork_server_pid
    assert server is not None and {w.start_method for w in status.workers} == {"fork"}
    assert running.stop(signal.SIGKILL) == -signal.SIGKILL  # asserts no worker is left
    deadline = time.monotonic() + 5
    while process_alive(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(server), "the fork server outlived a killed supervisor"


def fork_server_of(supervisor: subprocess.Popen, timeout: float = 30.0) -> int:
    """The pid of the supervisor's fork server, once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in Path(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children").read_text() \
                .split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"inference_worker.forkserver" in cmdline:
                return int(pid)
        assert supervisor.poll() is None
        time.sleep(0.005)
    raise AssertionError("no fork server started")


def test_a_fork_server_stopped_at_start_does_not_keep_the_service_from_serving(
        tmp_path: Path):
    """The first worker is spawned at once when the first server is seen stopped (not after
    its 120 s start-up bound); once it runs again, workers are forked."""
    running = start_service(tmp_path, DEMO_MODEL, wait=False, worker_start="fork")
    try:
        server = fork_server_of(running.process)
        with stopped(server):
            asked = time.monotonic()
            reply = running.client.transcribe(TRAFFIC_CLIP)
            took = time.monotonic() - asked
            assert reply.text == REFS[TRAFFIC_CLIP.name]["woitn"]
            status = running.status()
            assert status.fork_server_pid is None  # not ready: stopped
            serving = next(w for w in status.workers if w.pid == reply.worker_pid)
            assert serving.start_method == "spawn"
        print(f"\nfirst request with the fork server stopped: answered in {took:.1f} s")
        log = running.log()
        assert f"Waiting for the fork server (pid {server}) to import torch" in log
        assert f"The fork server (pid {server}) is stopped: spawning the first worker" in log
        running.wait_until(lambda s: s.fork_server_pid == server, 120, "the server ready")
        assert running.client.hot_reload_model(force_fresh=True).ok
        running.wait_until(lambda s: any(w.start_method == "fork" for w in s.workers), 60,
                           "a forked worker (the green, or the standby that followed)")
    finally:
        assert running.stop() == 0


def test_orphans_are_reaped_and_known_children_left_to_their_owners():
    """reap_orphans on real children: an unknown exited child (as a subreaper adopts) is
    reaped; a subprocess.Popen child in `known` keeps its exit code for Popen."""
    owned = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    orphan = os.fork()
    if orphan == 0:
        os._exit(5)
    for pid in (owned.pid, orphan):  # until both are zombies, reaping neither
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    assert reap_orphans({owned.pid}) == [(orphan, 5)]
    assert reap_orphans({owned.pid}) == []
    assert owned.wait(5) == 7
    assert reap_orphans(set()) == []  # nothing exited: nothing read
