"""Reload when the served model's files change on disk (SENSEVOICE_ENABLE_FILE_WATCH).

A thread watches the served model directory with watchfiles. After a change it waits until
the model files have stopped changing (same size and mtime across a quiet period, and a
weights file that is complete), compares checksums with the model being served, and only
then sends an ordinary reload request to the supervisor, like any other client. Changes to
``*.py`` files are code, which a reload never runs: they get a warning to restart instead.
"""

from __future__ import annotations

import json
import logging
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import watchfiles

from sensevoice_core.layout import HF_WEIGHTS, MODEL_FILE_NAMES, OFFICIAL_WEIGHTS
from sensevoice_core.protocol import ModelInfo, ReloadRequest

logger = logging.getLogger("sensevoice.supervisor")

EDITOR_SUFFIXES = (".swp", ".swx", ".swo", ".tmp", ".part", ".crdownload", "~", ".bak")
# unchanged: files touched, checksums the same; code_changed: *.py changed (warned, never
# loaded); reloads: reloads the watcher asked for (their outcomes count in reload_counts).
WATCH_OUTCOMES = ("unchanged", "code_changed", "reloads")
WATCH_TIMEOUT_MS = 500  # how often the thread looks at its stop event and the served directory


def is_editor_file(name: str) -> bool:
    return name.startswith((".", "#", "~")) or name.endswith(EDITOR_SUFFIXES) or name == "4913"


def watch_filter(change: watchfiles.Change, path: str) -> bool:
    name = Path(path).name
    return not is_editor_file(name) and (name in MODEL_FILE_NAMES or name.endswith(".py"))


def is_complete(path: Path) -> bool:
    """Whether a weights file is whole: a copy in progress is not, however long it pauses."""
    try:
        if path.suffix == ".safetensors":
            with open(path, "rb") as handle:
                header_size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(header_size))
            end = max((entry["data_offsets"][1] for key, entry in header.items()
                       if key != "__metadata__"), default=0)
            return path.stat().st_size == 8 + header_size + end
        if path.suffix == ".pt":
            with zipfile.ZipFile(path) as archive:  # reads the central directory at the end
                return bool(archive.namelist())
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        return False
    return True


def file_states(directory: Path) -> dict[str, tuple[int, int]]:
    states = {}
    for name in MODEL_FILE_NAMES:
        try:
            stat = (directory / name).stat()
        except OSError:
            continue
        states[name] = (stat.st_size, stat.st_mtime_ns)
    return states


class ModelWatcher:
    def __init__(self, reload: Callable[[ReloadRequest], threading.Event],
                 served: Callable[[], ModelInfo | None], quiet_s: float):
        # Hands the request to the supervisor's loop (thread-safe); the event is set when that
        # reload is over. In-process, so it needs no client keys on a CURVE address.
        self.reload = reload
        self.served = served
        self.quiet_s = quiet_s
        self.stop_event = threading.Event()
        self.directory: Path | None = None  # being watched (set once its watch is in place)
        # What it decided, for the status. Every key exists from the start: the loop's thread
        # copies the dict while this one counts, which is safe as long as no key is added.
        self.counts: dict[str, int] = dict.fromkeys(WATCH_OUTCOMES, 0)
        self.thread = threading.Thread(target=self.run, name="model-watcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                model = self.served()
                if model is None:
                    self.stop_event.wait(WATCH_TIMEOUT_MS / 1000)
                    continue
                self.watch(Path(model.model_dir))
        except Exception:  # a watcher failure must not take the service down
            logger.exception("[WATCH] file watching stopped after an error; reloads by API "
                             "and the UI still work")

    def watch(self, directory: Path) -> None:
        """Watch one directory until told to stop or until another directory is served."""
        for changes in watchfiles.watch(directory, watch_filter=watch_filter,
                                        stop_event=self.stop_event, yield_on_timeout=True,
                                        rust_timeout=WATCH_TIMEOUT_MS, debounce=200,
                                        recursive=False, raise_interrupt=False):
            if self.directory != directory:  # the first yield: the watch is in place
                self.directory = directory
                logger.info("[WATCH] watching %s for model changes", directory)
            model = self.served()
            if model is None or Path(model.model_dir) != directory:
                return
            names = {Path(path).name for _, path in changes}
            if names:
                logger.debug("[WATCH] events in %s: %s", directory, ", ".join(sorted(names)))
            code = sorted(name for name in names if name.endswith(".py"))
            if code:
                self.counts["code_changed"] += 1
                logger.warning("[WATCH] %s changed in %s: code is never reloaded from a model "
                               "directory; restart the service to run changed code",
                               ", ".join(code), directory)
            if names - set(code):
                self.reload_when_stable(directory, model)

    def reload_when_stable(self, directory: Path, model: ModelInfo) -> None:
        states = self.wait_until_stable(directory)
        if states is None:
            return
        changed = self.changed_roles(model)
        if not changed:
            self.counts["unchanged"] += 1
            logger.info("[WATCH] model files in %s touched but their checksums are unchanged; "
                        "not reloading", directory)
            return
        logger.info("[WATCH] %s changed in %s; reloading", ", ".join(changed), directory)
        self.counts["reloads"] += 1
        done = self.reload(ReloadRequest(path=str(directory), origin="watch"))
        # Wait for the outcome (the supervisor logs it): changes seen meanwhile are then
        # compared with the model that is serving after it, not the one before.
        while not done.wait(0.2):
            if self.stop_event.is_set():
                return

    def wait_until_stable(self, directory: Path) -> dict[str, tuple[int, int]] | None:
        """File states once nothing changed for quiet_s and the weights are whole; None on stop."""
        previous = file_states(directory)
        while not self.stop_event.wait(self.quiet_s):
            current = file_states(directory)
            weights = [directory / n for n in (HF_WEIGHTS, OFFICIAL_WEIGHTS) if n in current]
            if current == previous and all(is_complete(path) for path in weights):
                return current
            previous = current
        return None

    def changed_roles(self, model: ModelInfo) -> list[str]:
        """Roles whose file now differs from what the served model was loaded from."""
        from sensevoice_core.path_cache import sha256_file

        changed = []
        for role, path in model.file_paths.items():
            try:
                digest = sha256_file(Path(path))
            except OSError:
                changed.append(role)  # gone or unreadable: let the reload report it
                continue
            if digest != model.file_sha256.get(role):
                changed.append(role)
        return changed
