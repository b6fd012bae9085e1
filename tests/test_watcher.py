"""Reload on model file changes (SENSEVOICE_ENABLE_FILE_WATCH) through the real service.

A change that must not reload is followed by one that must, and the test waits for that
reload: the watcher handles changes one after another, so by then it has handled the first.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest
import watchfiles
from service import Service, start_service, stopped

from sensevoice_core.client import ServiceError
from supervisor.watcher import is_complete, watch_filter

QUIET_S = 0.5


@pytest.fixture(scope="module")
def service(models: Path, tmp_path_factory: pytest.TempPathFactory):
    served = models / "served"
    shutil.copytree(models / "a", served)
    running = start_service(tmp_path_factory.mktemp("service"), served,
                            enable_file_watch="true", watch_quiet_s=str(QUIET_S))
    running.wait_until(lambda s: s.watching == str(served.resolve()), 30, "the watcher")
    yield running
    assert running.stop() == 0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def served_dir(service: Service) -> Path:
    return Path(service.status().model.model_dir)


def other_weights(service: Service, models: Path) -> Path:
    """The weights of a model that is not the one being served."""
    serving = service.status().model.file_sha256["weights"]
    return next(path for path in (models / name / "model.safetensors" for name in "abc")
                if sha256(path) != serving)


def reloaded_to(service: Service, weights: Path) -> dict[str, int]:
    """Wait until the served model has these weights; the reload counts then."""
    expected = sha256(weights)
    status = service.wait_until(lambda s: s.model.file_sha256["weights"] == expected, 30,
                                f"a watch reload to {weights}")
    assert status.last_reload.origin == "watch" and status.last_reload.ok
    return status.reload_counts


def replace_atomically(source: Path, target: Path) -> None:
    staging = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, staging)
    os.replace(staging, target)


def change_weights(service: Service, models: Path) -> dict[str, int]:
    """A change that reloads, and the reload counts once it has."""
    weights = other_weights(service, models)
    replace_atomically(weights, served_dir(service) / "model.safetensors")
    return reloaded_to(service, weights)


def log_since(service: Service, offset: int) -> str:
    return service.log()[offset:]


def test_atomic_replace_of_the_weights_triggers_exactly_one_reload(service: Service, models: Path):
    before = service.status().reload_counts
    change_weights(service, models)
    after = change_weights(service, models)  # nothing came between the two
    assert after.get("ok", 0) == before.get("ok", 0) + 2
    assert after.get("failed", 0) == before.get("failed", 0)


def test_slow_partial_copy_triggers_nothing_until_complete(service: Service, models: Path):
    before = service.status().reload_counts
    weights = other_weights(service, models)
    data = weights.read_bytes()
    half, chunk = len(data) // 2, max(len(data) // 16, 1)
    with open(served_dir(service) / "model.safetensors", "wb") as handle:  # in place, like `cp`
        # The scenario, not an ordering: a slow copy that stalls longer than the quiet period.
        for start in range(0, half, chunk):
            handle.write(data[start:min(start + chunk, half)])
            handle.flush()
            time.sleep(0.1)
        time.sleep(4 * QUIET_S)
        handle.write(data[half:])
    after = reloaded_to(service, weights)
    assert after.get("ok", 0) == before.get("ok", 0) + 1  # the half-copied file never loaded
    assert after.get("failed", 0) == before.get("failed", 0)


def test_touching_files_without_changing_them_does_not_reload(service: Service, models: Path):
    served = served_dir(service)
    status = service.status()
    before, unchanged = status.reload_counts, status.watch_counts["unchanged"]
    for name in ("model.safetensors", "config.json"):
        (served / name).write_bytes((served / name).read_bytes())
    service.wait_until(lambda s: s.watch_counts["unchanged"] == unchanged + 1, 30,
                       "the watcher to compare checksums")
    after = change_weights(service, models)
    assert after.get("ok", 0) == before.get("ok", 0) + 1  # only the real change reloaded


def test_python_file_change_warns_and_does_not_reload(service: Service, models: Path):
    status, offset = service.status(), len(service.log())
    before, code_changed = status.reload_counts, status.watch_counts["code_changed"]
    (served_dir(service) / "modeling_sensevoice.py").write_text("print('never run')\n")
    service.wait_until(lambda s: s.watch_counts["code_changed"] == code_changed + 1, 30,
                       "the warning about code")
    after = change_weights(service, models)
    assert after.get("ok", 0) == before.get("ok", 0) + 1
    assert "restart the service to run changed code" in log_since(service, offset)


def test_editor_files_are_ignored(service: Service, models: Path):
    served = served_dir(service)
    offset = len(service.log())
    editor_files = (".config.json.swp", "config.json~", "#config.json#", "4913", "notes.txt")
    for name in editor_files:
        (served / name).write_text("x")
    change_weights(service, models)
    # Every batch of events the watcher took is logged (at DEBUG); none held an editor file.
    batches = [line for line in log_since(service, offset).splitlines() if "[WATCH] events" in line]
    assert batches and not any(name in line for line in batches for name in editor_files)


def test_watch_filter_and_completeness(tmp_path: Path, models: Path):
    assert watch_filter(watchfiles.Change.modified, "/m/model.safetensors")
    assert watch_filter(watchfiles.Change.added, "/m/tokenizer.py")
    assert not watch_filter(watchfiles.Change.added, "/m/.model.safetensors.tmp")
    assert not watch_filter(watchfiles.Change.added, "/m/readme.md")
    weights = (models / "a" / "model.safetensors").read_bytes()
    partial = tmp_path / "model.safetensors"
    partial.write_bytes(weights[:-1])
    assert not is_complete(partial)
    partial.write_bytes(weights)
    assert is_complete(partial)
    pt = tmp_path / "model.pt"
    import torch

    torch.save({"x": torch.zeros(1000)}, pt)
    assert is_complete(pt)
    pt.write_bytes(pt.read_bytes()[:-30])
    assert not is_complete(pt)


def test_a_reload_that_lands_before_the_first_load_starts_the_watcher(models: Path,
                                                                      tmp_path: Path):
    """The first model may arrive through a reload's switch (the first worker still loading):
    the watcher starts then too, and the reload path is held to SENSEVOICE_MODEL_DIR's parent."""
    served = tmp_path / "models" / "served"
    shutil.copytree(models / "a", served)
    # Spawned: a forked worker says hello within milliseconds, past the "starting" window.
    service = start_service(tmp_path / "service", served, wait=False, standby=False,
                            worker_start="spawn",
                            enable_file_watch="true", watch_quiet_s=str(QUIET_S),
                            hotreload_timeout="120")
    try:
        status = service.wait_until(lambda s: [w.role for w in s.workers] == ["starting"], 30,
                                    "the first worker importing torch")
        first = status.workers[0].pid
        with stopped(first):  # it never says hello: no model serves before the reload
            with pytest.raises(ServiceError) as refused:
                service.client.hot_reload_model("/etc")
            assert refused.value.code == "reload_refused"
            assert str(served.parent) in refused.value.message
            outcome = service.client.hot_reload_model()
        assert outcome.ok and outcome.old_fingerprint is None
        status = service.wait_until(lambda s: s.watching == str(served.resolve()), 30,
                                    "the watcher")
        assert first not in [w.pid for w in status.workers]
    finally:
        assert service.stop() == 0
