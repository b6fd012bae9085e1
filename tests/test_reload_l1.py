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
import torch
from model_factory import copy_demo_model, write_hf
from pydantic import ValidationError
from service import OrderedClient, Service, start_service, stopped

from sensevoice_core.compute import served_fingerprint
from sensevoice_core.errors import ServiceError
from sensevoice_core.layout import model_files
from sensevoice_core.load_report import LoadReport
from sensevoice_core.path_cache import MAX_L3_ENTRIES, PathCache
from sensevoice_core.protocol import (
    ModelInfo,
    ReloadRequest,
    TranscribeReply,
    TranscribeRequest,
    encode,
)
from sensevoice_core.settings import Settings
from supervisor.unchanged import unchanged_verdict
from ui.metrics import ServiceMetrics
from ui.views import reload_summary, status_markdown

CLIP = Path(__file__).parent / "data" / "demo_eval" / "en_02.flac"


# ----------------------------------------------------------------- the decision, on files

def serving_info(model_dir: Path, cache_dir: Path, compute_type: str = "float32") -> ModelInfo:
    """What a worker reports after loading model_dir (sensevoice_core.serving.model_info, which
    takes the identities from L3), with its L3 record written as a load writes it."""
    from sensevoice_core.serving import model_info

    cache = PathCache(cache_dir)
    record = cache.record_for(model_files(model_dir))
    cache.store(record)
    report = LoadReport(level="L2", model_dir=Path(record.model_dir), layout=record.layout,
                        fingerprint=served_fingerprint(record.fingerprint, compute_type),
                        short_ids=record.short_ids(), snapshot=None,
                        file_sha256={role: f.sha256 for role, f in record.files.items()},
                        file_paths={role: f.path for role, f in record.files.items()},
                        compute_type=compute_type)
    return model_info(report, 0.1, Settings(cache_dir=cache_dir))


@pytest.fixture
def served(tmp_path: Path) -> tuple[Path, Path, ModelInfo]:
    model_dir = write_hf(tmp_path / "models" / "a").resolve()
    cache_dir = tmp_path / "cache"
    return model_dir, cache_dir, serving_info(model_dir, cache_dir)


def test_unchanged_files_are_a_hit(served):
    model_dir, _, info = served
    assert set(info.file_identities) == {"weights", "config", "tokenizer", "cmvn"}
    assert unchanged_verdict(str(model_dir), info).hit
    assert unchanged_verdict(None, info).hit  # None: the served directory


def test_the_decision_reads_no_cache_file(served):
    """L3 replaced by a FIFO nobody writes (a read would block the supervisor's loop for
    ever): the decision only stats the model files."""
    _, cache_dir, info = served
    l3 = cache_dir / "model_path.json"
    l3.unlink()
    os.mkfifo(l3)
    started = time.monotonic()
    assert unchanged_verdict(None, info).hit
    assert time.monotonic() - started < 0.5


def test_a_reduced_compute_type_compares_its_served_fingerprint(tmp_path: Path):
    model_dir = write_hf(tmp_path / "a").resolve()
    info = serving_info(model_dir, tmp_path / "cache", compute_type="int8")
    assert unchanged_verdict(None, info).hit
    as_float32 = info.model_copy(update={"compute_type": "float32"})
    verdict = unchanged_verdict(None, as_float32)
    assert not verdict.hit and "float32" in verdict.reason


def test_touching_a_file_is_a_miss(served):
    model_dir, _, info = served
    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    verdict = unchanged_verdict(None, info)
    assert not verdict.hit and "weights file" in verdict.reason and "touched" in verdict.reason


def test_rewriting_a_file_with_its_mtime_set_back_is_a_miss(served):
    """Same size, same mtime, same bytes even: the ctime moved, so it is hashed again."""
    model_dir, _, info = served
    config = model_dir / "config.json"
    stat = config.stat()
    config.write_bytes(config.read_bytes())
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert config.stat().st_mtime_ns == stat.st_mtime_ns
    assert not unchanged_verdict(None, info).hit


def test_a_replaced_file_is_a_miss(served):
    model_dir, _, info = served
    weights = model_dir / "model.safetensors"
    staging = model_dir / "staging"
    shutil.copy2(weights, staging)  # same bytes and mtime, another inode
    os.replace(staging, weights)
    assert not unchanged_verdict(None, info).hit


def test_a_flipped_file_link_is_a_miss(tmp_path: Path):
    """The weights are a symbolic link into a release directory; the link moves to another
    release's weights (each file unchanged): another file serves the same name now."""
    model_dir = write_hf(tmp_path / "a").resolve()
    releases = tmp_path / "releases"
    for name, seed in (("v1", 1), ("v2", 2)):
        write_hf(releases / name, seed=seed)
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors").symlink_to(releases / "v1" / "model.safetensors")
    info = serving_info(model_dir, tmp_path / "cache")
    assert unchanged_verdict(None, info).hit
    staging = model_dir / "staging"
    staging.symlink_to(releases / "v2" / "model.safetensors")
    os.replace(staging, model_dir / "model.safetensors")
    verdict = unchanged_verdict(None, info)
    assert not verdict.hit and "v2" in verdict.reason


def test_same_files_in_another_directory_are_a_miss(served, tmp_path: Path):
    """A copy has the same fingerprint, but the reload moves the service to the copy's
    directory (watcher, status, later reloads): only a worker loading from it does that."""
    model_dir, cache_dir, info = served
    copy = model_dir.parent / "copy"
    shutil.copytree(model_dir, copy)
    assert serving_info(copy, cache_dir).fingerprint == info.fingerprint  # L3 knows it too
    verdict = unchanged_verdict(str(copy), info)
    assert not verdict.hit and "another directory" in verdict.reason


def test_a_worker_reports_no_identities_from_an_edited_l3_entry(tmp_path: Path):
    """The worker takes identities only from an entry that vouches for exactly the checksums
    it loaded; without them the supervisor never answers L1."""
    from sensevoice_core.serving import model_info

    model_dir = write_hf(tmp_path / "a").resolve()
    cache_dir = tmp_path / "cache"
    info = serving_info(model_dir, cache_dir)
    path = cache_dir / "model_path.json"
    content = json.loads(path.read_text())
    entry = content["entries"][str(model_dir)]
    entry["files"]["weights"]["sha256"] = "0" * 64  # its fingerprint no longer adds up
    path.write_text(json.dumps(content))
    report = LoadReport(level="L2", model_dir=model_dir, layout=info.layout,
                        fingerprint=info.fingerprint, short_ids=info.short_ids, snapshot=None,
                        file_sha256=info.file_sha256, file_paths=info.file_paths)
    edited = model_info(report, 0.1, Settings(cache_dir=cache_dir))
    assert edited.file_identities == {}
    verdict = unchanged_verdict(None, edited)
    assert not verdict.hit and "no file identities" in verdict.reason
    for damage in (b"", b"{not json", b'{"version": 2, "entries": 7}'):
        path.write_bytes(damage)
        assert model_info(report, 0.1, Settings(cache_dir=cache_dir)).file_identities == {}
    assert model_info(report, 0.1,
                      Settings(cache_dir=tmp_path / "empty")).file_identities == {}


def test_a_missing_file_or_no_model_is_a_miss(served):
    model_dir, _, info = served
    assert not unchanged_verdict(None, None).hit
    (model_dir / "am.mvn").unlink()
    verdict = unchanged_verdict(None, info)
    assert not verdict.hit and "cannot be checked" in verdict.reason


def test_l3_keeps_the_newest_entries(tmp_path: Path):
    """A service reloaded to versioned directories: L3 keeps MAX_L3_ENTRIES, dropping the
    entries stored longest ago; storing an old one again makes it the newest."""
    model_dir = write_hf(tmp_path / "a").resolve()
    cache = PathCache(tmp_path / "cache")
    record = cache.record_for(model_files(model_dir))
    names = [f"/releases/v{i}" for i in range(MAX_L3_ENTRIES + 6)]
    for name in names:
        cache.store(record.model_copy(update={"model_dir": name}))
    cache.store(record.model_copy(update={"model_dir": names[10]}))  # used again
    cache.store(record)
    content = cache.read()
    assert len(content.entries) == MAX_L3_ENTRIES
    kept = [name for name in names[7:] if name != names[10]] + [names[10], str(model_dir)]
    assert list(content.entries) == kept  # v0-v6 dropped: stored longest ago
    assert content.last_model_dir == str(model_dir)


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
    from sensevoice_core.warmup import warm_up

    calls = []
    hook = demo_model.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        seconds = warm_up(demo_model)
    finally:
        hook.remove()
    assert calls == [1] and demo_model._vad is not None and seconds > 0


def nan_model(directory: Path) -> Path:
    """The demo model with a NaN CTC bias: it loads, and every score it makes is NaN."""
    from safetensors.torch import load_file, save_file

    copy_demo_model(directory)
    weights = load_file(directory / "model.safetensors")
    weights["ctc.ctc_lo.bias"] = torch.full_like(weights["ctc.ctc_lo.bias"], float("nan"))
    save_file(weights, directory / "model.safetensors")
    return directory


WARMUP_FAILURE = ("warm-up: ValidationError: Segment.no_speech_prob: Input should be a finite "
                  "number (got nan)")


def test_a_warm_up_failure_names_the_stage_and_the_field(tmp_path: Path):
    from sensevoice_core.warmup import describe_failure, warm_up
    from sensevoice_core import load_model

    with pytest.raises(ValidationError) as error:
        warm_up(load_model(nan_model(tmp_path / "nan"), compute_type="float32"))
    assert describe_failure("warm-up", error.value) == WARMUP_FAILURE
    assert describe_failure("load", RuntimeError("first line\nsecond")) == \
        "load: RuntimeError: first line"
    assert describe_failure("canary", OSError()) == "canary: OSError: (no message)"


# ----------------------------------------------------------------- through the service

@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service").resolve()


@pytest.fixture(scope="module")
def service(models: Path, work_dir: Path):
    """SENSEVOICE_MODEL_DIR is a symbolic link (work_dir/current -> models/a), as a deploy
    that flips a link configures it; work_dir is a model root too, for copies."""
    (work_dir / "current").symlink_to(models / "a")
    # Batching off: a worker holds one request, so the others wait in the supervisor's queue.
    running = start_service(work_dir, work_dir / "current", batch_wait_ms="0",
                            model_roots=f"{models},{work_dir}")
    yield running
    assert running.stop() == 0


def flip(link: Path, target: Path) -> None:
    """Point the link at target atomically (ln -sfn target link.new && mv -T link.new link)."""
    staging = link.with_name(link.name + ".new")
    staging.symlink_to(target)
    os.replace(staging, link)


def workers_of(service: Service) -> list[tuple[str, int, str]]:
    return [(w.worker_id, w.pid, w.role) for w in service.wait_ready().workers]


def test_an_unchanged_reload_is_an_l1_hit_with_no_new_worker(service: Service):
    before = workers_of(service)
    status = service.status()
    l1_hits, oks = status.reload_levels.get("L1", 0), status.reload_counts.get("ok", 0)
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
    assert after.last_reload == outcome and after.reload_levels["L1"] == l1_hits + 1
    # Outcomes and cache levels are counted apart: each sums to the reloads it counts.
    assert after.reload_counts == {**status.reload_counts, "ok": oks + 1}
    assert set(after.reload_counts) <= {"ok", "failed", "refused"}
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
            f'{float(status.reload_levels["L1"])}') in metrics
    assert 'sensevoice_reloads_total{outcome="ok"}' in metrics  # the existing name stays


def test_force_fresh_is_never_l1(service: Service):
    before = workers_of(service)
    outcome = service.client.hot_reload_model(force_fresh=True)
    assert outcome.ok and outcome.cache_level == "fresh"
    assert workers_of(service) != before  # a new worker serves
    assert service.client.hot_reload_model().cache_level == "L1"


def test_a_touched_weights_file_is_not_l1_and_still_reloads(service: Service, models: Path,
                                                            work_dir: Path):
    copy = work_dir / "a-copy"  # the session's models/a stays untouched for other modules
    shutil.copytree(models / "a", copy)
    assert service.client.hot_reload_model(copy).ok
    weights = copy / "model.safetensors"
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


def test_a_pathless_reload_follows_a_flipped_model_dir_link(service: Service, models: Path,
                                                            work_dir: Path):
    """A deploy flips SENSEVOICE_MODEL_DIR's link to another release and asks for a reload
    without a path: the new release loads (never "unchanged (L1)" for the old one)."""
    link = work_dir / "current"
    assert service.client.hot_reload_model(link).ok  # the service serves the configured link
    flip(link, models / "c")
    # The served directory asked for by name (as the file watcher asks): unchanged, L1, and
    # the service still follows the link.
    assert service.client.hot_reload_model(models / "a").cache_level == "L1"
    outcome = service.client.hot_reload_model()
    assert outcome.ok and outcome.cache_level != "L1", outcome
    assert outcome.model_dir == str((models / "c").resolve())
    assert outcome.new_fingerprint != outcome.old_fingerprint
    assert service.client.hot_reload_model().cache_level == "L1"  # and now c is unchanged
    # Pinned: an explicit other directory serves until the link is asked for again.
    assert service.client.hot_reload_model(models / "b").ok
    flip(link, models / "a")
    assert service.client.hot_reload_model().model_dir == str((models / "b").resolve())
    assert service.client.hot_reload_model(link).model_dir == str((models / "a").resolve())
    flip(link, work_dir / "no-such-release")
    with pytest.raises(ServiceError) as refused:  # follows the link again: a dangling one
        service.client.hot_reload_model()
    assert refused.value.code == "reload_refused"
    assert "no-such-release" in refused.value.message and "not a directory" in refused.value.message
    assert service.status().model.model_dir == str((models / "a").resolve())  # still serving
    flip(link, models / "a")


def test_a_reload_to_a_model_that_breaks_at_warm_up_says_where_and_why(service: Service,
                                                                      work_dir: Path):
    serving = service.status().model
    outcome = service.client.hot_reload_model(nan_model(work_dir / "nan"))
    assert not outcome.ok and outcome.error.endswith(f"): {WARMUP_FAILURE}"), outcome
    line = next(line for line in service.log().splitlines()
                if "[HOTRELOAD] Reload failed" in line and "warm-up:" in line)
    assert line.endswith(WARMUP_FAILURE)
    assert service.status().model == serving
