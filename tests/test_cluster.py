"""Cluster mode on a real two-node Ray cluster (one per module: starting one costs most of
the time): the HTTP ingress, fleet reloads under traffic, a broken reload rolled back, a
killed replica replaced, and the `python -m cluster` CLI against it."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from cluster_fixture import REPO, RunningCluster, running_cluster
from model_factory import copy_demo_model, nudge_weights

from cluster.types import FleetReloadResult, ReplicaReport
from sensevoice_core.exit_codes import EXIT_FAILED, EXIT_USAGE
from sensevoice_core.settings import Settings
from supervisor.reload_path import ReloadRefused

# ray is imported by the fixture and inside the tests, once this module runs at all.
pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install -e '.[cluster]'")
pytestmark = pytest.mark.slow

HELLO = REPO / "ui" / "examples" / "en_02.flac"  # "Hello world." with ITN
FINGERPRINT = "x-sensevoice-fingerprint"
REPLACE_TIMEOUT_S = 120.0
STUCK_S = 3.0  # a request unanswered this long is held by a stopped replica


@dataclass
class Models:
    root: Path  # SENSEVOICE_MODEL_ROOTS
    a: Path  # served first
    b: Path  # a's weights nudged: another fingerprint, the same transcripts
    broken: Path  # a's weights cut in half


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("cluster-models")
    a, b, broken = (copy_demo_model(root / name) for name in ("a", "b", "broken"))
    nudge_weights(b)
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    return Models(root, a, b, broken)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, models: Models):
    with running_cluster(tmp_path_factory.mktemp("cluster"), models.a, [models.root]) as running:
        yield running


def reports() -> list[ReplicaReport]:
    """The live model replicas' last reports (this process is connected to the cluster)."""
    from cluster.fleet import live_reports

    return live_reports(10.0)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def serving_fingerprints() -> set[str]:
    return {r.model.fingerprint for r in reports() if r.model is not None}


def transcribe(http: httpx.Client, response_format: str = "json", audio: bytes | None = None,
               name: str = HELLO.name) -> httpx.Response:
    return http.post("/v1/audio/transcriptions",
                     files={"file": (name, HELLO.read_bytes() if audio is None else audio)},
                     data={"model": "whisper-1", "response_format": response_format})


@dataclass
class Sent:
    started: float  # time.monotonic() when the request was sent
    status: int
    fingerprint: str | None
    body: str


@dataclass
class HttpTraffic:
    """Clients each sending the clip back to back through the ingress, from threads.

        with HttpTraffic(fleet.url, clients=2) as traffic:
            ...  # reload, kill a replica
        assert not traffic.failed()
    """

    url: str
    clients: int = 2
    sent: list[Sent] = field(default_factory=list)
    pending: dict[int, float] = field(default_factory=dict)  # client -> its request's start
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _run(self, client: int) -> None:
        audio = HELLO.read_bytes()
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while not self._stop.is_set():
                started = self.pending[client] = time.monotonic()
                try:
                    response = transcribe(http, audio=audio)
                    self.sent.append(Sent(started, response.status_code,
                                          response.headers.get(FINGERPRINT), response.text))
                except httpx.HTTPError as e:
                    self.sent.append(Sent(started, 0, None, repr(e)))
                del self.pending[client]

    def waiting_longer_than(self, seconds: float) -> list[float]:
        """When the requests still unanswered after `seconds` were sent."""
        now = time.monotonic()
        return [started for started in list(self.pending.values()) if now - started > seconds]

    def wait_for_more(self, count: int, timeout: float = 60.0) -> None:
        target = len(self.sent) + count
        wait_for(lambda: len(self.sent) >= target, timeout, f"{count} more replies")

    def failed(self) -> list[Sent]:
        return [s for s in self.sent if s.status != 200]

    def __enter__(self) -> HttpTraffic:
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(self.clients)]
        for thread in self._threads:
            thread.start()
        self.wait_for_more(2 * self.clients)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)


def test_two_replicas_on_two_nodes_and_the_cli_status(fleet: RunningCluster):
    live = reports()
    assert len(live) == 2
    assert {r.node_id for r in live} == set(fleet.node_ids)  # one replica on each node
    assert all(r.model is not None and r.error is None for r in live)
    assert len({r.model.fingerprint for r in live}) == 1
    for report in live:  # each node built its own L2 snapshot, in its own cache directory
        assert list((fleet.cache_dirs[report.node_id] / "snapshots").glob("*.safetensors"))
    shown = fleet.cli("status", "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert {r["replica_id"]: r["node_id"] for r in status["replicas"]} == \
        {r.replica_id: r.node_id for r in live}
    assert {(r["report"]["model"]["fingerprint"], r["pid"]) for r in status["replicas"]} == \
        {(r.model.fingerprint, r.pid) for r in live}
    assert {r["state"] for r in status["replicas"]} == {"RUNNING"}


def test_the_http_api_through_the_ingress(fleet: RunningCluster, models: Models):
    (fingerprint,) = serving_fingerprints()
    with httpx.Client(base_url=fleet.url, timeout=60) as http:
        assert http.get("/health").json() == {"status": "ok"}
        ready = http.get("/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json() | {"reloading": False} == {
            "status": "ready", "fingerprint": fingerprint, "workers": 2, "reloading": False,
            "model_dir": str(models.a)}  # a loopback caller sees the directory
        listed = http.get("/v1/models")
        assert listed.status_code == 200 and listed.json()["data"], listed.text
        plain = transcribe(http)
        assert plain.status_code == 200, plain.text
        assert plain.json() == {"text": "Hello world."}
        assert plain.headers[FINGERPRINT] == fingerprint
        verbose = transcribe(http, "verbose_json").json()
        assert verbose["text"] == "Hello world." and verbose["fingerprint"] == fingerprint
        assert verbose["segments"][0]["text"] == "Hello world."
        assert "sensevoice_" in http.get("/metrics").text
        srt = transcribe(http, "srt")
        assert srt.status_code == 200 and srt.text.startswith("1\n00:00:")
        assert "Hello world." in srt.text
        with http.stream("POST", "/v1/audio/transcriptions", data={"stream": "true"},
                         files={"file": (HELLO.name, HELLO.read_bytes())}) as streamed:
            assert streamed.status_code == 200
            events = [json.loads(line[len("data: "):]) for line in streamed.iter_lines()
                      if line.startswith("data: {")]
        assert events[-1]["type"] == "transcript.text.done"
        assert events[-1]["text"] == "Hello world."
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="unused", max_retries=0)
    with HELLO.open("rb") as audio:
        assert client.audio.transcriptions.create(model="whisper-1", file=audio).text == \
            "Hello world."
    client.close()


@pytest.mark.parametrize(("audio", "name", "says"), [
    (b"", "empty.wav", "empty.wav is empty"),
    (b"this is not audio" * 50, "junk.wav", "junk.wav"),
])
def test_empty_or_garbage_audio_is_answered_400(fleet: RunningCluster, audio: bytes, name: str,
                                               says: str):
    with httpx.Client(base_url=fleet.url, timeout=60) as http:
        response = transcribe(http, audio=audio, name=name)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_audio" and says in error["message"], error


def test_reload_paths_that_are_not_allowed_are_refused_before_anything_changes(
        fleet: RunningCluster, models: Models):
    from cluster.fleet import reload_fleet

    before = {(r.replica_id, r.generation, r.model.fingerprint) for r in reports()}
    settings = Settings(model_roots=[models.root])
    for path, says in ((str(REPO / "model"), "outside the allowed model roots"),
                       ("cluster-models/a", "is relative"),
                       (str(models.root / "missing"), "is not a directory")):
        with pytest.raises(ReloadRefused, match=says):
            reload_fleet(path, False, settings)
    refused = fleet.cli("reload", str(REPO / "model"))
    assert refused.returncode == EXIT_USAGE, refused.stderr
    assert "outside the allowed model roots" in refused.stderr
    assert {(r.replica_id, r.generation, r.model.fingerprint) for r in reports()} == before


def test_a_fleet_reload_under_traffic_loses_no_request(fleet: RunningCluster, models: Models):
    (old,) = serving_fingerprints()
    pids = {r.replica_id: r.pid for r in reports()}
    with HttpTraffic(fleet.url, clients=2) as traffic:
        reloaded = fleet.cli("reload", str(models.b), "--json")
        returned = time.monotonic()
        traffic.wait_for_more(4)
    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
    result = FleetReloadResult.model_validate_json(reloaded.stdout)
    assert result.ok and result.fingerprint not in (None, old), result
    assert not traffic.failed(), traffic.failed()[:3]
    assert {s.fingerprint for s in traffic.sent} == {old, result.fingerprint}
    assert {s.fingerprint for s in traffic.sent if s.started > returned} == {result.fingerprint}
    after = reports()
    assert {r.model.fingerprint for r in after} == {result.fingerprint}
    # Ray's lightweight update: reconfigure() on the running replicas, none restarted.
    assert {r.replica_id: r.pid for r in after} == pids


def test_a_reload_to_a_broken_model_keeps_the_old_one_everywhere(fleet: RunningCluster,
                                                                 models: Models):
    (old,) = serving_fingerprints()
    replicas = {r.replica_id for r in reports()}
    with HttpTraffic(fleet.url, clients=2) as traffic:
        reloaded = fleet.cli("reload", str(models.broken), "--json")
        traffic.wait_for_more(2)
    assert reloaded.returncode == EXIT_FAILED, reloaded.stdout + reloaded.stderr
    result = FleetReloadResult.model_validate_json(reloaded.stdout)
    assert not result.ok and result.rolled_back and result.fingerprint is None
    assert result.failures and set(result.failures) <= replicas, result.failures
    assert all(why for why in result.failures.values())
    assert not traffic.failed(), traffic.failed()[:3]
    assert {s.fingerprint for s in traffic.sent} == {old}
    after = reports()
    assert {r.replica_id for r in after} == replicas
    assert {r.model.fingerprint for r in after} == {old}
    shown = json.loads(fleet.cli("status", "--json").stdout)
    assert shown["last_reload"]["ok"] is False
    assert shown["last_reload"]["failures"] == result.failures


def test_a_killed_replica_is_replaced_and_its_requests_are_not_lost(fleet: RunningCluster):
    (fingerprint,) = serving_fingerprints()
    victim, survivor = sorted(reports(), key=lambda r: r.node_id != fleet.node_ids[1])
    with HttpTraffic(fleet.url, clients=2) as traffic:
        # Stopped first, so that requests are in flight on it when it dies: a client whose
        # request went there waits (the other replica answers in well under a second).
        os.kill(victim.pid, signal.SIGSTOP)
        wait_for(lambda: traffic.waiting_longer_than(STUCK_S), REPLACE_TIMEOUT_S,
                 "a request held by the stopped replica")
        os.kill(victim.pid, signal.SIGKILL)
        held = list(traffic.pending.values())  # in flight when it died
        replaced = wait_for(lambda: [r for r in reports()
                                     if r.replica_id not in (victim.replica_id,
                                                             survivor.replica_id)
                                     and r.model is not None],
                            REPLACE_TIMEOUT_S, "a replacement replica serving")
        traffic.wait_for_more(4)
    (new,) = replaced
    assert new.pid != victim.pid and new.model.fingerprint == fingerprint
    assert new.model.cache_level == "L2"  # its node's snapshot, built by the one it replaced
    assert new.node_id == victim.node_id  # the freed CPU; one replica per node again
    # What the killed replica held is retried on the other one, or fails with a clear error.
    outcomes = {s.started: s for s in traffic.sent}
    for started in held:
        outcome = outcomes[started]
        assert outcome.status == 200 or (
            outcome.status in (502, 503) and json.loads(outcome.body)["error"]["message"]), \
            outcome
    assert not [s for s in traffic.failed() if s.started not in held], traffic.failed()
    assert {s.fingerprint for s in traffic.sent if s.status == 200} == {fingerprint}


# ---------------------------------------------------------------------------------------------
# F1 (review 18 fixes: cluster/replica.py, cluster/fleet.py, cluster/deploy.py)
# ---------------------------------------------------------------------------------------------


def test_health_check_and_report_do_not_need_a_request_slot(fleet: RunningCluster):
    """Async methods run on the replica's event loop, not in the threadpool bounded by
    max_ongoing_requests: a replica whose every slot holds a long request is not killed as
    unhealthy (review finding 1)."""
    import inspect

    from ray import serve

    from cluster.replica import SenseVoiceModel
    from cluster.types import APP_NAME, MODEL_DEPLOYMENT

    for method in ("check_health", "report", "reconfigure"):
        assert inspect.iscoroutinefunction(getattr(SenseVoiceModel.func_or_class, method)), method
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=APP_NAME)
    assert handle.report.remote().result(timeout_s=30).replica_id in \
        {r.replica_id for r in reports()}


def test_the_registry_lives_on_the_head_and_heartbeats_refill_it(fleet: RunningCluster):
    """Pinned to the head node, restarted when it dies, refilled by the replicas' heartbeats
    (idle replicas included); reading it forgets nothing (review finding 4)."""
    import ray

    from cluster.fleet import REPORT_INTERVAL_S, fleet_view, registry

    actor = registry()
    assert ray.get(actor.node_id.remote(), timeout=10) == fleet.node_ids[0]
    ray.get(actor.live.remote([]), timeout=10)  # asks for no replica: forgets none
    assert all(view.report is not None for view in fleet_view())
    ray.kill(actor, no_restart=False)

    def all_reported() -> bool:
        try:
            views = fleet_view()
        except (TimeoutError, ray.exceptions.RayError):  # restarting
            return False
        return len(views) == 2 and all(
            v.report is not None and v.age_s is not None and v.age_s < 2 * REPORT_INTERVAL_S
            for v in views)

    wait_for(all_reported, 6 * REPORT_INTERVAL_S, "every replica's report in the restarted "
             "registry")


def test_one_reload_at_a_time_and_the_claim_comes_before_the_read(fleet: RunningCluster,
                                                                  models: Models):
    import ray

    from cluster.deploy import FleetError, deployed_config, fleet_config
    from cluster.fleet import registry, reload_fleet

    before = fleet_config(deployed_config())
    assert ray.get(registry().claim_reload.remote("someone", time.time() + 60), timeout=10)
    try:
        with pytest.raises(FleetError, match="another fleet reload is under way"):
            reload_fleet(str(models.a), False, Settings(model_roots=[models.root]))
    finally:
        ray.get(registry().record_reload.remote("someone", None), timeout=10)
    assert fleet_config(deployed_config()) == before


def test_a_path_outside_the_replicas_own_roots_is_refused_by_them_and_rolled_back(
        fleet: RunningCluster, models: Models):
    """The CLI's roots are looser than the nodes': the replicas refuse, and the refusal is
    the generation's error (review finding 14); the rollback completes (finding 3)."""
    from cluster.deploy import deployed_config, fleet_config
    from cluster.fleet import reload_fleet

    (old,) = serving_fingerprints()
    before = fleet_config(deployed_config())
    result = reload_fleet(str(REPO / "model"), False, Settings(model_roots=[REPO]))
    assert not result.ok and result.rolled_back and result.fingerprint is None, result
    assert result.failures and all("outside the allowed model roots" in why
                                   for why in result.failures.values()), result.failures
    after = fleet_config(deployed_config())
    assert (after.model_dir, after.generation) == (before.model_dir, result.generation + 1)
    assert serving_fingerprints() == {old}


def test_a_reload_that_breaks_off_after_its_deploy_is_rolled_back(
        fleet: RunningCluster, models: Models, monkeypatch: pytest.MonkeyPatch):
    """Any exception once the new config is deployed (here the wait for it) puts the previous
    config back, and the result says so (review finding 3)."""
    import cluster.fleet as fleet_module
    from cluster.deploy import deployed_config, fleet_config

    (old,) = serving_fingerprints()
    before = fleet_config(deployed_config())
    target = models.a if before.model_dir != str(models.a) else models.b
    real_wait = fleet_module.wait_generation
    waits: list[int] = []

    def wait_that_breaks_once(generation: int, timeout_s: float):
        waits.append(generation)
        if len(waits) == 1:
            raise TimeoutError("the controller did not answer")
        return real_wait(generation, timeout_s)

    monkeypatch.setattr(fleet_module, "wait_generation", wait_that_breaks_once)
    result = fleet_module.reload_fleet(str(target), False, Settings(model_roots=[models.root]))
    assert not result.ok and result.rolled_back, result
    assert "TimeoutError" in result.failures[fleet_module.FLEET_FAILURE]
    assert waits == [before.generation + 1, before.generation + 2]
    after = fleet_config(deployed_config())
    assert (after.model_dir, after.generation) == (before.model_dir, before.generation + 2)
    assert {(r.generation, r.model.fingerprint) for r in reports()} == \
        {(before.generation + 2, old)}


def test_a_poll_that_times_out_is_no_news(fleet: RunningCluster, models: Models,
                                          monkeypatch: pytest.MonkeyPatch):
    import cluster.fleet as fleet_module
    from cluster.deploy import deployed_config, fleet_config

    (old,) = serving_fingerprints()
    before = fleet_config(deployed_config())
    target = models.a if before.model_dir != str(models.a) else models.b
    real_view = fleet_module.fleet_view
    polls: list[float] = []

    def view_that_times_out_once(timeout_s: float = 10.0):
        polls.append(timeout_s)
        if len(polls) == 2:  # the first poll of the wait (the first call reads the fleet)
            raise TimeoutError("the controller did not answer")
        return real_view(timeout_s)

    monkeypatch.setattr(fleet_module, "fleet_view", view_that_times_out_once)
    result = fleet_module.reload_fleet(str(target), False, Settings(model_roots=[models.root]))
    assert result.ok and result.fingerprint not in (None, old), result
    assert len(polls) > 2
    assert serving_fingerprints() == {result.fingerprint}


def test_a_generation_that_is_not_one_model_is_a_failure():
    """Replicas that applied the new generation but serve different files (a path that holds
    different copies on different nodes) fail the reload (review finding 8)."""
    from cluster.fleet import disagreeing
    from sensevoice_core.protocol import ModelInfo

    def report(replica_id: str, generation: int, fingerprint: str | None) -> ReplicaReport:
        model = ModelInfo.model_construct(fingerprint=fingerprint) if fingerprint else None
        return ReplicaReport(replica_id=replica_id, node_id="n", node_ip="127.0.0.1", pid=1,
                             started_at=0.0, reported_at=0.0, generation=generation,
                             model=model)

    same = [report("r1", 3, "f" * 64), report("r2", 4, "f" * 64), report("r3", 2, "e" * 64)]
    assert disagreeing(same, 3) == {}
    split = [report("r1", 3, "f" * 64), report("r2", 3, "e" * 64)]
    why = disagreeing(split, 3)
    assert set(why) == {"r1", "r2"} and "not one model" in why["r1"], why


def test_force_fresh_does_not_outlive_its_reload(fleet: RunningCluster, models: Models):
    """The deployed config keeps force_fresh after `reload --force-fresh`, but a replica
    started later (here a replacement) loads its node's L2 snapshot (review finding 7)."""
    from cluster.deploy import deployed_config, fleet_config
    from cluster.fleet import reload_fleet

    before = fleet_config(deployed_config())
    result = reload_fleet(before.model_dir, True, Settings(model_roots=[models.root]))
    assert result.ok, result
    assert {r.last_reload.cache_level for r in result.replicas if r.last_reload} == {"fresh"}
    assert fleet_config(deployed_config()).force_fresh
    known = {r.replica_id for r in reports()}
    victim = reports()[0]
    os.kill(victim.pid, signal.SIGKILL)
    (new,) = wait_for(lambda: [r for r in reports()
                               if r.replica_id not in known and r.model is not None],
                      REPLACE_TIMEOUT_S, "a replacement replica serving")
    assert new.model.fingerprint == result.fingerprint
    assert new.model.cache_level == "L2"
    wait_for(lambda: len(reports()) == 2 and victim.replica_id not in
             {r.replica_id for r in reports()}, REPLACE_TIMEOUT_S, "two replicas again")


# ---------------------------------------------------------------------------------------------
# F2 (review 18 findings 2, 9, 13, 17, 20): cluster.json, the CLI without a cluster, the
# ingress's loopback rule, FleetClient's status cache. The first ones need no Ray.
# ---------------------------------------------------------------------------------------------

import socket  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from cluster.state import ClusterState, StateClaim, StateError, held, read_state  # noqa: E402
from sensevoice_core.errors import ServiceError  # noqa: E402


def cli_without_cluster(cache: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m cluster ARGS` with SENSEVOICE_CACHE_DIR=cache and no cluster address."""
    environ = {k: v for k, v in os.environ.items() if k != "SENSEVOICE_CLUSTER_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=REPO,
                          env={**environ, "SENSEVOICE_CACHE_DIR": str(cache), **env},
                          capture_output=True, text=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def owner_only(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    path.chmod(0o600)


def test_cluster_json_is_trusted_only_when_owner_only_and_well_formed(tmp_path: Path):
    path = tmp_path / "cluster.json"
    assert read_state(path) is None
    owner_only(path, '{"pid": 1, "address": "127.0.0.1:1", "auth": "token"}')
    assert read_state(path) == ClusterState(pid=1, address="127.0.0.1:1", auth="token")
    path.chmod(0o644)
    with pytest.raises(StateError, match="open to other users"):
        read_state(path)
    for raw in ('[1]', '{"address": "127.0.0.1:1"}', '{"pid": "x"}', '{"pid": 1, "x": 2}',
                'not json'):
        owner_only(path, raw)
        with pytest.raises(StateError, match="not a cluster.json `up` wrote") as refused:
            read_state(path)
        one_line(str(refused.value))
    path.unlink()
    (tmp_path / "elsewhere.json").symlink_to(tmp_path / "target")
    owner_only(tmp_path / "target", '{"pid": 1}')
    with pytest.raises(StateError, match="cannot read"):
        read_state(tmp_path / "elsewhere.json")


def test_one_up_holds_cluster_json_and_removes_only_its_own(tmp_path: Path):
    path = tmp_path / "cache" / "cluster.json"
    first = StateClaim.take(path)
    assert first is not None
    first.write(ClusterState(pid=os.getpid()))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert StateClaim.take(path) is None  # a second `up` neither takes it nor deletes it
    assert held(path) and read_state(path) == ClusterState(pid=os.getpid())
    first.release()
    assert not path.exists()
    owner_only(path, '{"pid": 999999999}')  # stale: its `up` was killed, nobody holds it
    assert not held(path)
    taken = StateClaim.take(path)
    assert taken is not None
    taken.release()
    assert not path.exists()
    third = StateClaim.take(path)
    path.unlink()
    owner_only(path, '{"pid": 1}')  # another's file in its place: not ours to remove
    third.release()
    assert read_state(path) == ClusterState(pid=1)


def test_down_signals_only_a_real_up_and_clears_a_stale_file(tmp_path: Path):
    cache = tmp_path / "cache"
    path = cache / "cluster.json"
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    fake_up = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                                "-m", "cluster", "up"])
    try:
        claim = StateClaim.take(path)  # held, as by a live `up`, but naming another process
        claim.write(ClusterState(pid=bystander.pid, address="127.0.0.1:1", auth="token"))
        done = cli_without_cluster(cache, "down")
        assert done.returncode == EXIT_FAILED
        assert "not your `python -m cluster up`; not signalled" in one_line(done.stderr)
        assert bystander.poll() is None
        claim.write(ClusterState(pid=fake_up.pid, address="127.0.0.1:1", auth="token"))
        done = cli_without_cluster(cache, "down")
        assert done.returncode == 0, done.stderr
        assert fake_up.wait(timeout=10) == -signal.SIGTERM
        claim.release()
        owner_only(path, ClusterState(pid=bystander.pid).model_dump_json())  # stale
        done = cli_without_cluster(cache, "status")
        assert done.returncode == EXIT_FAILED and "is stale" in one_line(done.stderr)
        done = cli_without_cluster(cache, "down")
        assert done.returncode == 0 and "was gone" in done.stdout, done.stderr
        assert not path.exists() and bystander.poll() is None
    finally:
        for process in (bystander, fake_up):
            process.kill()
            process.wait()


def test_the_cli_without_a_cluster_says_where_it_looked(tmp_path: Path):
    cache = tmp_path / "cache"
    for command in ("status", "down", "reload"):
        done = cli_without_cluster(cache, command)
        assert done.returncode == EXIT_FAILED
        assert str(cache.resolve() / "cluster.json") in one_line(done.stderr)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{probe.getsockname()[1]}"
    for command in ("status", "down"):  # ray.init would wait there forever
        done = cli_without_cluster(cache, command, SENSEVOICE_CLUSTER_ADDRESS=nobody)
        assert done.returncode == EXIT_FAILED
        assert f"no Ray cluster answers at {nobody}" in one_line(done.stderr)
    owner_only(cache / "cluster.json", '{"pid": 1, "address": "127.0.0.1:1"}')
    (cache / "cluster.json").chmod(0o666)
    done = cli_without_cluster(cache, "status")
    assert done.returncode == EXIT_FAILED and "not trusted" in one_line(done.stderr)


def test_up_refuses_a_port_in_use_and_a_second_up_in_one_line(tmp_path: Path, models: Models):
    cache = tmp_path / "cache"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli_without_cluster(cache, "up", SENSEVOICE_MODEL_DIR=str(models.a),
                                   SENSEVOICE_CLUSTER_PORT=str(port))
    assert done.returncode == EXIT_FAILED
    assert f"127.0.0.1:{port} is in use" in one_line(done.stderr)
    assert not (cache / "cluster.json").exists()
    claim = StateClaim.take(cache / "cluster.json")
    claim.write(ClusterState(pid=os.getpid()))
    try:
        done = cli_without_cluster(cache, "up", SENSEVOICE_MODEL_DIR=str(models.a),
                                   SENSEVOICE_CLUSTER_PORT=str(port))
    finally:
        claim.release()
    assert done.returncode == EXIT_FAILED
    assert "a cluster is up already" in one_line(done.stderr)


def test_the_ingress_decides_loopback_by_the_host_the_proxy_binds(
        fleet: RunningCluster, monkeypatch: pytest.MonkeyPatch):
    import cluster.ingress as ingress

    monkeypatch.setenv("SENSEVOICE_CLUSTER_HOST", "127.0.0.1")  # not what decides
    assert not ingress.cluster_settings("0.0.0.0").ui_is_loopback()
    assert not ingress.cluster_settings("192.0.2.7").ui_is_loopback()
    assert ingress.cluster_settings("127.0.0.1").ui_is_loopback()
    assert ingress.proxy_host() == "127.0.0.1"  # the fixture's deploy binds loopback

    def unreachable():
        raise ValueError("no controller")

    monkeypatch.setattr(ingress, "controller", unreachable)
    assert ingress.proxy_host() == ingress.UNKNOWN_HOST  # fails closed: internals hidden
    assert not ingress.cluster_settings(ingress.proxy_host()).ui_is_loopback()


def test_fleet_status_is_read_once_a_second_and_failures_are_unavailable(
        fleet: RunningCluster, monkeypatch: pytest.MonkeyPatch):
    from ray import serve

    import cluster.client as client
    from cluster.types import APP_NAME

    fleet_client = client.FleetClient(serve.get_deployment_handle("SenseVoiceModel", APP_NAME),
                                      Settings())
    from cluster.fleet import ReplicaView, fleet_view

    reads = []

    def counted(timeout_s: float) -> list[ReplicaView]:
        reads.append(timeout_s)
        return fleet_view(timeout_s)

    monkeypatch.setattr(client, "fleet_view", counted)
    first = fleet_client.status()
    second = fleet_client.status()
    assert len(reads) == 1 and len(first.workers) == 2
    assert all(w.report_age_s is not None and 0 <= w.report_age_s < 30 for w in first.workers)
    assert [(w.worker_id, w.pid) for w in second.workers] == \
        [(w.worker_id, w.pid) for w in first.workers]
    time.sleep(client.STATUS_CACHE_S + 0.1)

    def broken(timeout_s: float) -> list[ReplicaView]:
        raise KeyError("applications")  # e.g. a details dict without the key

    monkeypatch.setattr(client, "fleet_view", broken)
    with pytest.raises(ServiceError) as refused:
        fleet_client.status()
    assert refused.value.code == "unavailable" and "KeyError" in refused.value.message


def test_fleet_status_states_only_what_it_knows():
    from cluster.client import FleetReloads, fleet_status
    from cluster.fleet import LiveReplica, ReplicaView

    now = time.time()
    views = [ReplicaView(LiveReplica(f"r{i}", "node", "127.0.0.1", "RUNNING", 100 + i),
                         ReplicaReport(replica_id=f"r{i}", node_id="node", node_ip="127.0.0.1",
                                       pid=100 + i, started_at=now - 60, reported_at=now - 2,
                                       generation=0, model=None, in_flight=i),
                         age_s=2.0)
             for i in (1, 2)]
    views.append(ReplicaView(LiveReplica("r3", "node", "127.0.0.1", "STARTING", None), None))
    status = fleet_status(views, 0.5, FleetReloads(None, {}, {}), uptime_s=9.0, outstanding=10,
                          capacity=4, served=7, departed=0)
    assert [(w.worker_id, w.report_age_s, w.busy) for w in status.workers] == \
        [("r1", 2.5, True), ("r2", 2.5, True)]  # r3 has not reported: not a worker yet
    assert status.in_flight == 3  # as the replicas reported it
    assert status.queued == 6  # this ingress's calls beyond what the replicas take at once


def test_up_status_down_end_to_end(tmp_path: Path, models: Models):
    import shutil
    import tempfile

    cache, log = tmp_path / "cache", tmp_path / "up.log"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # socket paths must be short
    env = {**{k: v for k, v in os.environ.items() if k != "SENSEVOICE_CLUSTER_ADDRESS"},
           "SENSEVOICE_MODEL_DIR": str(models.a), "SENSEVOICE_CLUSTER_PORT": str(port),
           "SENSEVOICE_CACHE_DIR": str(cache), "SENSEVOICE_THREADS": "1", "RAY_TMPDIR": ray_tmp}
    with log.open("w") as output:
        up = subprocess.Popen([sys.executable, "-m", "cluster", "up"], cwd=REPO, env=env,
                              stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: "SenseVoice cluster up" in log.read_text() or up.poll() is not None,
                 REPLACE_TIMEOUT_S * 2, "`up` to deploy")
        assert up.poll() is None, log.read_text()[-2000:]
        path = cache / "cluster.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert read_state(path).pid == up.pid and held(path)
        ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=30).json()
        assert ready["status"] == "ready" and ready["model_dir"] == str(models.a)  # loopback
        shown = cli_without_cluster(cache, "status", "--json")
        assert shown.returncode == 0, shown.stderr
        assert len(json.loads(shown.stdout)["replicas"]) == 1
        done = cli_without_cluster(cache, "down")
        assert done.returncode == 0 and "stopped" in done.stdout, done.stderr
        assert up.wait(timeout=60) == 0
        assert not path.exists()
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)  # Ctrl-C: `up` shuts its Ray down
            try:
                up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
