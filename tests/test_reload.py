"""Blue-green hot reload through the real service: triggers, coalescing, failures, strategies."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from model_factory import write_hf
from service import BackgroundTraffic, OrderedClient, Service, start_service, stopped

from sensevoice_core.client import ServiceError
from sensevoice_core.protocol import ReloadRequest

pytestmark = pytest.mark.slow

CLIP = Path(__file__).parent / "data" / "demo_eval" / "en_02.flac"


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service").resolve()


@pytest.fixture(scope="module")
def service(models: Path, work_dir: Path):
    # work_dir is a model root too: tests change copies there, never the session's models.
    running = start_service(work_dir, models / "a", model_roots=f"{models},{work_dir}")
    yield running
    assert running.stop() == 0


def fingerprint_of(service: Service, path: Path) -> str:
    outcome = service.client.hot_reload_model(path)
    assert outcome.ok, outcome
    return outcome.new_fingerprint


def test_reload_to_another_model_changes_the_serving_fingerprint(service: Service, models: Path):
    before = service.client.transcribe(CLIP).fingerprint
    outcome = service.client.hot_reload_model(models / "b")
    assert outcome.ok and outcome.error is None
    assert outcome.old_fingerprint == before != outcome.new_fingerprint
    assert outcome.model_dir == str((models / "b").resolve())
    assert outcome.cache_level in ("fresh", "L2") and 0 < outcome.seconds < 30
    assert service.client.transcribe(CLIP).fingerprint == outcome.new_fingerprint
    assert "[HOTRELOAD] Swapped model successfully: reloaded from " + str((models / "b").resolve()) \
        in service.log()
    back = service.client.hot_reload_model(models / "a")
    assert back.ok and back.new_fingerprint == before


def test_continuous_client_sees_no_failure_across_ten_reloads(service: Service, models: Path):
    fingerprints = {path: fingerprint_of(service, models / path) for path in ("b", "a")}
    service.wait_ready()
    order = ["b", "a"] * 6  # 12 reloads, each to the other model
    with BackgroundTraffic(service, CLIP) as traffic:
        traffic.wait_for_more()
        for name in order:
            outcome = service.client.hot_reload_model(models / name)
            assert outcome.ok, outcome
            assert outcome.new_fingerprint == fingerprints[name]
            traffic.wait_for_more()
    replies, failures = traffic.replies, traffic.failures
    assert not failures, failures
    assert all(reply.fingerprint in fingerprints.values() for reply in replies)
    sequence = [reply.fingerprint for reply in replies]
    switches = sum(a != b for a, b in zip(sequence, sequence[1:]))
    runs = [(fp[:4], sum(1 for _ in group)) for fp, group in itertools.groupby(sequence)]
    assert switches == len(order), f"{switches} switches for {len(order)} reloads: {runs}"
    assert sequence[-1] == fingerprints["a"]


def test_reload_of_the_same_model_comes_from_l2_once_a_file_was_touched(service: Service,
                                                                         models: Path,
                                                                         work_dir: Path):
    copy = Path(shutil.copytree(models / "a", work_dir / "a-touched"))
    assert service.client.hot_reload_model(copy).ok
    serving = service.status().model
    assert service.client.hot_reload_model().cache_level == "L1"  # unchanged: test_reload_l1
    weights = copy / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    outcome = service.client.hot_reload_model()
    assert outcome.ok and outcome.new_fingerprint == serving.fingerprint
    assert outcome.cache_level == "L2"
    assert outcome.model_dir == serving.model_dir


def test_force_fresh_reloads_from_the_model_files(service: Service):
    outcome = service.client.hot_reload_model(force_fresh=True)
    assert outcome.ok and outcome.cache_level == "fresh"
    assert service.client.hot_reload_model().cache_level == "L1"


def test_broken_model_leaves_the_old_one_serving(service: Service, models: Path):
    serving = service.status().model.fingerprint
    outcome = service.client.hot_reload_model(models / "broken")
    assert not outcome.ok and outcome.new_fingerprint is None
    assert "model.safetensors" in outcome.error
    assert outcome.old_fingerprint == serving
    assert service.client.transcribe(CLIP).fingerprint == serving
    assert service.status().last_reload == outcome
    assert f"[HOTRELOAD] Reload failed, still serving {service.status().model.model_dir}" \
        in service.log()


def test_reload_outside_the_model_roots_is_refused(service: Service, tmp_path: Path):
    elsewhere = write_hf(tmp_path / "elsewhere")
    with pytest.raises(ServiceError) as error:
        service.client.hot_reload_model(elsewhere)
    assert error.value.code == "reload_refused"
    assert "outside the allowed model roots" in error.value.message
    assert "SENSEVOICE_MODEL_ROOTS" in error.value.message
    with pytest.raises(ServiceError, match="not a directory"):
        service.client.hot_reload_model(Path(service.status().model.model_dir).parent / "missing")


def test_triggers_during_a_swap_coalesce_into_one_more_swap(service: Service, models: Path):
    """Six triggers while a swap warms: the first is that swap, the other five share one more."""
    status = service.wait_ready()
    swaps = status.reload_counts.get("ok", 0)
    standby = next(w.pid for w in status.workers if w.role == "standby")
    with OrderedClient(service.address) as client:
        with stopped(standby):  # the first reload's green, held in "warming"
            sent = [client.send(ReloadRequest(path=str(models / "b"))) for _ in range(6)]
            held = client.barrier()
            assert held.reloading
            assert [w.role for w in held.workers if w.pid == standby] == ["warming"]
        outcomes = [client.reply(request_id).outcome for request_id in sent]
    assert all(outcome.ok for outcome in outcomes), outcomes
    assert [outcome.coalesced for outcome in outcomes] == [1, 5, 5, 5, 5, 5]
    assert all(outcome == outcomes[1] for outcome in outcomes[2:])  # one swap answered five
    assert service.status().reload_counts["ok"] == swaps + 2
    fingerprint_of(service, models / "a")


def test_sighup_reloads_the_served_model(service: Service):
    swaps = service.wait_ready().reload_counts.get("ok", 0)
    service.process.send_signal(signal.SIGHUP)
    status = service.wait_until(lambda s: s.reload_counts.get("ok", 0) == swaps + 1, 30,
                                "a SIGHUP reload")
    assert status.last_reload.origin == "cli" and status.last_reload.ok


def test_command_line_reload_and_status(service: Service, models: Path):
    environment = {**os.environ, "SENSEVOICE_SUPERVISOR_ADDRESS": service.address}
    status = subprocess.run([sys.executable, "-m", "supervisor", "status"], env=environment,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and '"fingerprint"' in status.stdout
    failed = subprocess.run([sys.executable, "-m", "supervisor", "reload", str(models / "broken")],
                            env=environment, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and '"ok": false' in failed.stdout
    transcribed = subprocess.run([sys.executable, "-m", "supervisor", "transcribe", str(CLIP),
                                  "missing.flac", "--json"], env=environment,
                                 capture_output=True, text=True, timeout=60)
    lines = [json.loads(line) for line in transcribed.stdout.splitlines()]
    assert transcribed.returncode == 1  # one of the two files is missing
    assert lines[0]["file"] == str(CLIP) and "error" not in lines[0]
    assert lines[1]["file"] == "missing.flac" and "no such file" in lines[1]["error"]


def test_reload_api_is_importable_from_loader_and_client():
    from sensevoice_core.client import hot_reload_model as from_client
    from sensevoice_core.loader import hot_reload_model as from_loader

    assert from_loader is from_client


def test_reload_timeout_abandons_the_new_worker(models: Path, tmp_path: Path):
    running = start_service(tmp_path, models / "a", hotreload_timeout="0.05")
    try:
        serving = running.status().model.fingerprint
        outcome = running.client.hot_reload_model(models / "b")
        assert not outcome.ok and "SENSEVOICE_HOTRELOAD_TIMEOUT" in outcome.error
        assert running.client.transcribe(CLIP).fingerprint == serving
        running.wait_ready()  # a new standby replaces the abandoned one
    finally:
        assert running.stop() == 0


def test_stop_first_strategy_swaps_and_recovers_from_a_failed_load(models: Path, tmp_path: Path):
    running = start_service(tmp_path, models / "a", swap_strategy="stop_first", standby=False)
    try:
        serving = running.status().model.fingerprint
        outcome = running.client.hot_reload_model(models / "b")
        assert outcome.ok and outcome.new_fingerprint != serving
        assert running.client.transcribe(CLIP).fingerprint == outcome.new_fingerprint
        failed = running.client.hot_reload_model(models / "broken")
        assert not failed.ok
        # The old worker was stopped first, so the last good model is loaded again.
        reply = running.client.transcribe(CLIP)
        assert reply.fingerprint == outcome.new_fingerprint
        assert "stop_first" in running.log()
    finally:
        assert running.stop() == 0


def test_reload_without_warm_standby_spawns_a_worker(models: Path, tmp_path: Path):
    running = start_service(tmp_path, models / "a", standby=False)
    try:
        outcome = running.client.hot_reload_model(models / "b")
        assert outcome.ok
        running.wait_until(lambda s: [w.role for w in s.workers] == ["serving"], 30,
                           "the old worker to drain, with no standby spawned")
    finally:
        assert running.stop() == 0


def test_a_copied_model_directory_can_be_reloaded(service: Service, models: Path, tmp_path: Path):
    copy = models / "copy"
    shutil.copytree(models / "b", copy, dirs_exist_ok=True)
    outcome = service.client.hot_reload_model(copy)
    assert outcome.ok and outcome.model_dir == str(copy.resolve())
    fingerprint_of(service, models / "a")


@pytest.mark.parametrize("bad_path", ["/" + "a" * 300 + "/model", "/tmp/nul\x00byte",
                                      "~no-such-user-here/model"])
def test_unusable_reload_paths_are_refused_and_the_service_keeps_serving(service: Service,
                                                                         bad_path: str):
    serving = service.status().model.fingerprint
    request = ReloadRequest(path=bad_path)
    with pytest.raises(ServiceError) as error:
        service.client.reload(request, timeout=10)
    assert error.value.code == "reload_refused"
    assert service.client.transcribe(CLIP).fingerprint == serving


def test_a_superseded_reload_request_is_told_so(service: Service, models: Path):
    """Requests queued behind a running swap coalesce only when they ask for the same model."""
    status = service.wait_ready()
    swaps = status.reload_counts.get("ok", 0)
    standby = next(w.pid for w in status.workers if w.role == "standby")
    with OrderedClient(service.address) as client:
        with stopped(standby):  # the first swap's green, held in "warming"
            first = client.send(ReloadRequest(path=str(models / "b")))
            queued = client.send(ReloadRequest(path=str(models / "a")))  # waits its turn...
            latest = client.send(ReloadRequest(path=str(models / "b")))  # ...and is replaced
            assert client.barrier().reloading
            superseded = client.reply(queued).outcome  # answered at once
        first, latest = client.reply(first).outcome, client.reply(latest).outcome
    b = str((models / "b").resolve())
    assert not superseded.ok and superseded.new_fingerprint is None
    assert superseded.requested_path == str((models / "a").resolve())
    assert superseded.error == f"superseded by a later reload request for {b}"
    assert first.ok and first.requested_path == b and first.coalesced == 1
    assert latest.ok and latest.requested_path == b and latest.coalesced == 1
    assert latest.new_fingerprint == first.new_fingerprint
    assert service.status().reload_counts["ok"] == swaps + 2
    fingerprint_of(service, models / "a")


def test_reload_with_two_serving_workers(models: Path, tmp_path: Path):
    running = start_service(tmp_path, models / "a", workers="2")
    try:
        running.wait_until(lambda s: sum(w.role == "serving" for w in s.workers) == 2, 60,
                           "two serving workers")
        for target in ("b", "a", "b"):
            outcome = running.client.hot_reload_model(models / target)
            assert outcome.ok, outcome
            status = running.wait_until(
                lambda s: [w.fingerprint for w in s.workers if w.role == "serving"]
                == [outcome.new_fingerprint] * 2, 60, "both workers on the new model")
            assert status.model.fingerprint == outcome.new_fingerprint
        assert running.status().worker_restarts == 0
    finally:
        assert running.stop() == 0
