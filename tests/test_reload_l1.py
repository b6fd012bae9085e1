"""L1 reloads: the serving model, unchanged, asked for again is answered without a new worker.

The decision (supervisor/unchanged.py) on real files and a real L3 record; then through the
real service: no process started, well under a second, what status, the page and /metrics
say, and the cases that must not be L1 (force_fresh, a touched file, another model). Last, a
request queued while a reload switches is served by the new worker.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model_factory import write_hf
from sensevoice_core.compute import served_fingerprint
from sensevoice_core.layout import model_files
from sensevoice_core.path_cache import PathCache
from sensevoice_core.protocol import (
    ModelInfo,
    ReloadRequest,
    TranscribeReply,
    TranscribeRequest,
    encode,
)
from service import OrderedClient, Service, start_service, stopped
from supervisor.unchanged import unchanged_verdict
from ui.metrics import ServiceMetrics
from ui.views import reload_summary, status_markdown

CLIP = Path(__file__).parent / "data" / "demo_eval" / "en_02.flac"


# ----------------------------------------------------------------- the decision, on files

def serving_info(model_dir: Path, cache_dir: Path, compute_type: str = "float32") -> ModelInfo:
    """What a worker reports after loading model_dir, with its L3 record written as a load
    writes it (hashed now)."""
    cache = PathCache(cache_dir)
    record = cache.record_for(model_files(model_dir))
    cache.store(record)
    return ModelInfo(model_dir=record.model_dir, layout=record.layout,
                     fingerprint=served_fingerprint(record.fingerprint, compute_type),
                     short_ids=record.short_ids(), cache_level="L2", load_s=0.1,
                     file_sha256={role: f.sha256 for role, f in record.files.items()},
                     file_paths={role: f.path for role, f in record.files.items()},
                     steps_s={}, warmup_s=0.1, compute_type=compute_type)


@pytest.fixture
def served(tmp_path: Path) -> tuple[Path, Path, ModelInfo]:
    model_dir = write_hf(tmp_path / "models" / "a").resolve()
    cache_dir = tmp_path / "cache"
    return model_dir, cache_dir, serving_info(model_dir, cache_dir)


def test_unchanged_files_are_a_hit(served):
    model_dir, cache_dir, info = served
    assert unchanged_verdict(str(model_dir), info, cache_dir).hit
    assert unchanged_verdict(None, info, cache_dir).hit  # None: the served directory


def test_a_reduced_compute_type_compares_its_served_fingerprint(tmp_path: Path):
    model_dir = write_hf(tmp_path / "a").resolve()
    info = serving_info(model_dir, tmp_path / "cache", compute_type="int8")
    assert unchanged_verdict(None, info, tmp_path / "cache").hit
    as_float32 = info.model_copy(update={"compute_type": "float32"})
    assert not unchanged_verdict(None, as_float32, tmp_path / "cache").hit


def test_touching_a_file_is_a_miss(served):
    model_dir, cache_dir, info = served
    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    verdict = unchanged_verdict(None, info, cache_dir)
    assert not verdict.hit and "no L3 entry" in verdict.reason


def test_rewriting_a_file_with_its_mtime_set_back_is_a_miss(served):
    """Same size, same mtime, same bytes even: the ctime moved, so it is hashed again."""
    model_dir, cache_dir, info = served
    config = model_dir / "config.json"
    stat = config.stat()
    config.write_bytes(config.read_bytes())
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert config.stat().st_mtime_ns == stat.st_mtime_ns
    assert not unchanged_verdict(None, info, cache_dir).hit


def test_a_replaced_file_is_a_miss(served):
    model_dir, cache_dir, info = served
    weights = model_dir / "model.safetensors"
    staging = model_dir / "staging"
    shutil.copy2(weights, staging)  # same bytes and mtime, another inode
    os.replace(staging, weights)
    assert not unchanged_verdict(None, info, cache_dir).hit


def test_same_files_in_another_directory_are_a_miss(served, tmp_path: Path):
    """A copy has the same fingerprint, but the reload moves the service to the copy's
    directory (watcher, status, later reloads): only a worker loading from it does that."""
    model_dir, cache_dir, info = served
    copy = model_dir.parent / "copy"
    shutil.copytree(model_dir, copy)
    assert serving_info(copy, cache_dir).fingerprint == info.fingerprint  # L3 knows it too
    verdict = unchanged_verdict(str(copy), info, cache_dir)
    assert not verdict.hit and "another directory" in verdict.reason


def test_an_edited_l3_entry_is_a_miss(served):
    model_dir, cache_dir, info = served
    path = cache_dir / "model_path.json"
    content = json.loads(path.read_text())
    entry = content["entries"][str(model_dir)]
    entry["files"]["weights"]["sha256"] = "0" * 64  # its fingerprint no longer adds up
    path.write_text(json.dumps(content))
    assert not unchanged_verdict(None, info, cache_dir).hit
    entry["files"]["weights"]["sha256"] = "f" * 64
    entry["fingerprint"] = "f" * 64  # and the fingerprint is not what serves
    path.write_text(json.dumps(content))
    assert not unchanged_verdict(None, info, cache_dir).hit


@pytest.mark.parametrize("damage", [b"", b"{not json", b'{"version": 2, "entries": 7}'])
def test_an_unreadable_l3_is_a_miss(served, damage: bytes):
    _, cache_dir, info = served
    (cache_dir / "model_path.json").write_bytes(damage)
    assert not unchanged_verdict(None, info, cache_dir).hit


def test_an_oversized_l3_is_not_read(served):
    _, cache_dir, info = served
    path = cache_dir / "model_path.json"
    with open(path, "ab") as handle:  # still valid JSON, padded past the limit
        handle.write(b" " * (5 << 20))
    verdict = unchanged_verdict(None, info, cache_dir)
    assert not verdict.hit and "MiB" in verdict.reason


def test_no_l3_entry_or_a_missing_file_or_no_model_is_a_miss(served, tmp_path: Path):
    model_dir, cache_dir, info = served
    assert not unchanged_verdict(None, info, tmp_path / "empty-cache").hit
    assert not unchanged_verdict(None, None, cache_dir).hit
    (model_dir / "am.mvn").unlink()
    verdict = unchanged_verdict(None, info, cache_dir)
    assert not verdict.hit and "cannot be checked" in verdict.reason


def test_the_supervisor_still_does_not_import_torch():
    code = ("import sys, supervisor.supervisor, supervisor.unchanged; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# ----------------------------------------------------------------- a green's warm-up

def mapping_rss_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (from /proc/self/smaps)."""
    rss, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and ":" not in line.split(" ", 1)[0]:
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            rss += int(line.split()[1])
    return rss


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only")
def test_populate_maps_every_page_of_the_snapshot_at_once(tmp_path: Path):
    import torch

    from sensevoice_core.snapshot import populate

    path = tmp_path / "pages.bin"
    path.write_bytes(os.urandom(8 << 20))
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=8 << 20)
    assert mapping_rss_kib(path) < 4096  # mapped, hardly any page touched yet
    how = populate(storage, 8 << 20)
    assert how in ("populate", "willneed")
    if how == "populate":  # Linux 5.14+
        assert mapping_rss_kib(path) == 8 << 10
    assert bytes(storage[:16]) == path.read_bytes()[:16]  # a private mapping, unchanged


def test_warm_up_runs_the_model_once_and_loads_the_vad(demo_model):
    from inference_worker.worker import warm_up

    calls = []
    hook = demo_model.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        seconds = warm_up(demo_model)
    finally:
        hook.remove()
    assert calls == [1] and demo_model._vad is not None and seconds > 0


# ----------------------------------------------------------------- through the service

@pytest.fixture(scope="module")
def service(models: Path, tmp_path_factory: pytest.TempPathFactory):
    # Batching off: a worker holds one request, so the others wait in the supervisor's queue.
    running = start_service(tmp_path_factory.mktemp("service"), models / "a", batch_wait_ms="0")
    yield running
    assert running.stop() == 0


def workers_of(service: Service) -> list[tuple[str, int, str]]:
    return [(w.worker_id, w.pid, w.role) for w in service.wait_ready().workers]


def test_an_unchanged_reload_is_an_l1_hit_with_no_new_worker(service: Service):
    before = workers_of(service)
    status = service.status()
    l1_hits = status.reload_counts.get("L1", 0)
    started = time.monotonic()
    outcome = service.client.hot_reload_model()
    took = time.monotonic() - started
    assert outcome.ok and outcome.cache_level == "L1", outcome
    assert outcome.old_fingerprint == outcome.new_fingerprint == status.model.fingerprint
    assert outcome.model_dir == status.model.model_dir
    assert outcome.seconds < 1.0 and took < 1.0
    after = service.status()
    assert [(w.worker_id, w.pid, w.role) for w in after.workers] == before  # none spawned
    assert not after.reloading and after.model == status.model
    assert after.last_reload == outcome and after.reload_counts["L1"] == l1_hits + 1
    assert "[HOTRELOAD] Reload answered from L1" in service.log()
    assert service.client.transcribe(CLIP).fingerprint == status.model.fingerprint


def test_status_the_page_and_metrics_say_l1(service: Service):
    outcome = service.client.hot_reload_model(Path(service.status().model.model_dir))
    assert outcome.cache_level == "L1"
    status = service.status()
    assert "L1" in reload_summary(outcome) and "no new worker" in reload_summary(outcome)
    assert "**Last reload** ✅ Model unchanged" in status_markdown(status)
    metrics = ServiceMetrics(lambda: status, lambda: 0, 1).render().decode()
    assert (f'sensevoice_reloads_by_cache_level_total{{level="L1"}} '
            f'{float(status.reload_counts["L1"])}') in metrics
    assert 'sensevoice_reloads_total{outcome="ok"}' in metrics  # the existing name stays


def test_force_fresh_is_never_l1(service: Service):
    before = workers_of(service)
    outcome = service.client.hot_reload_model(force_fresh=True)
    assert outcome.ok and outcome.cache_level == "fresh"
    assert workers_of(service) != before  # a new worker serves
    assert service.client.hot_reload_model().cache_level == "L1"


def test_a_touched_weights_file_is_not_l1_and_still_reloads(service: Service):
    weights = Path(service.status().model.model_dir) / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    serving = service.status().model.fingerprint
    outcome = service.client.hot_reload_model()
    assert outcome.ok and outcome.cache_level == "L2", outcome  # hashed: same fingerprint
    assert outcome.new_fingerprint == serving
    assert service.client.hot_reload_model().cache_level == "L1"  # L3 knows the new identity


def test_a_reload_to_another_model_is_not_l1(service: Service, models: Path):
    outcome = service.client.hot_reload_model(models / "b")
    assert outcome.ok and outcome.cache_level in ("L2", "fresh")
    assert outcome.old_fingerprint != outcome.new_fingerprint
    back = service.client.hot_reload_model(models / "a")
    assert back.ok and back.cache_level != "L1"


def test_a_request_queued_while_the_reload_switches_is_served_by_green(service: Service,
                                                                      models: Path):
    """Blue is held (SIGSTOP) with one request; the next waits in the queue. The reload's
    green takes the queued one as soon as it serves, while blue is still held."""
    status = service.wait_ready()
    blue = next(w.pid for w in status.workers if w.role == "serving")
    audio = CLIP.read_bytes()
    target = models / ("b" if status.model.model_dir != str((models / "b").resolve()) else "a")
    with OrderedClient(service.address) as client:
        with stopped(blue):
            held, queued = TranscribeRequest(), TranscribeRequest()
            for request in (held, queued):
                client.socket.send_multipart(encode(request, audio))
            service.wait_until(lambda s: s.in_flight == 1 and s.queued == 1, 10,
                               "one request held by blue, one queued")
            reload = client.send(ReloadRequest(path=str(target)))
            outcome = client.reply(reload).outcome
            assert outcome.ok, outcome
            reply = client.reply(queued.request_id, timeout=30)  # blue is still stopped
            assert isinstance(reply, TranscribeReply), reply
            assert reply.fingerprint == outcome.new_fingerprint and reply.worker_pid != blue
        first = client.reply(held.request_id, timeout=30)  # blue finishes it, or its retry
        assert isinstance(first, TranscribeReply), first
