"""Reload on model file changes (SENSEVOICE_ENABLE_FILE_WATCH) through the real service."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import watchfiles

from model_factory import write_hf
from service import Service, start_service
from supervisor.watcher import is_complete, watch_filter

QUIET_S = 0.5


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_hf(root / "a", seed=1)
    write_hf(root / "b", seed=2)
    write_hf(root / "c", seed=3)
    return root


@pytest.fixture(scope="module")
def service(models: Path, tmp_path_factory: pytest.TempPathFactory):
    served = models / "served"
    shutil.copytree(models / "a", served)
    running = start_service(tmp_path_factory.mktemp("service"), served,
                            enable_file_watch="true", watch_quiet_s=str(QUIET_S))
    running.wait_until(lambda s: s.watching == str(served.resolve()), 30, "the watcher")
    yield running
    assert running.stop() == 0


def swaps(service: Service) -> int:
    return service.log().count("Swapped model successfully")


def settle(service: Service, seconds: float = 3 * QUIET_S + 1.5) -> None:
    """Long enough for a debounced, quiet-period-checked reload to have started and finished."""
    time.sleep(seconds)
    service.wait_until(lambda s: not s.reloading, 30, "no reload in progress")


def replace_atomically(source: Path, target: Path) -> None:
    staging = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, staging)
    os.replace(staging, target)


def test_atomic_replace_of_the_weights_triggers_exactly_one_reload(service: Service, models: Path):
    served = Path(service.status().model.model_dir)
    before, count = service.status().model.fingerprint, swaps(service)
    replace_atomically(models / "b" / "model.safetensors", served / "model.safetensors")
    status = service.wait_until(lambda s: s.model.fingerprint != before, 30, "a watch reload")
    settle(service)
    assert swaps(service) == count + 1
    assert status.last_reload.origin == "watch" and status.last_reload.ok
    assert status.model.file_sha256["weights"] != before


def test_slow_partial_copy_triggers_nothing_until_complete(service: Service, models: Path):
    served = Path(service.status().model.model_dir)
    before, count = service.status().model.fingerprint, swaps(service)
    data = (models / "c" / "model.safetensors").read_bytes()
    half = len(data) // 2
    with open(served / "model.safetensors", "wb") as handle:  # in place, like a plain `cp`
        for start in range(0, half, max(half // 8, 1)):
            handle.write(data[start:min(start + max(half // 8, 1), half)])
            handle.flush()
            time.sleep(0.1)
        time.sleep(4 * QUIET_S)  # a stall longer than the quiet period, mid-copy
        assert swaps(service) == count and service.status().model.fingerprint == before
        assert "Reload failed" not in service.log()
        handle.write(data[half:])
    service.wait_until(lambda s: s.model.fingerprint != before, 30, "the reload after the copy")
    settle(service)
    assert swaps(service) == count + 1
    assert "Reload failed" not in service.log()


def test_touching_files_without_changing_them_does_not_reload(service: Service):
    served = Path(service.status().model.model_dir)
    count = swaps(service)
    for name in ("model.safetensors", "config.json"):
        (served / name).write_bytes((served / name).read_bytes())
    settle(service)
    assert swaps(service) == count
    assert "checksums are unchanged; not reloading" in service.log()


def test_python_file_change_warns_and_does_not_reload(service: Service):
    served = Path(service.status().model.model_dir)
    count = swaps(service)
    (served / "modeling_sensevoice.py").write_text("print('never run')\n")
    settle(service)
    assert swaps(service) == count
    assert "modeling_sensevoice.py changed" in service.log()
    assert "restart the service to run changed code" in service.log()


def test_editor_files_are_ignored(service: Service):
    served = Path(service.status().model.model_dir)
    log_size = len(service.log())
    for name in (".config.json.swp", "config.json~", "#config.json#", "4913", "notes.txt"):
        (served / name).write_text("x")
    settle(service)
    assert "[WATCH]" not in service.log()[log_size:]


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
