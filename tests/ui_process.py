"""Run `python -m ui` as a subprocess for a test, on a free port, and stop it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service import STARTED

POLL_S = 0.05


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class UiProcess:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT, whatever address it listens on
    log_path: Path
    work_dir: Path  # its cwd; gradio/ is its GRADIO_TEMP_DIR, tmp/ its TMPDIR

    @property
    def upload_dir(self) -> Path:
        return self.work_dir / "gradio"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until(self, condition: Callable[[], bool], what: str,
                   timeout: float = 30.0) -> None:
        """Poll condition, failing at once if the UI exits, and after timeout."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.log()}")
            try:  # the pause between polls, ended early by the UI's exit
                self.process.wait(POLL_S)
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(f"the UI exited ({self.process.returncode}) waiting for "
                                 f"{what}:\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                raise AssertionError(f"the UI did not stop on SIGTERM:\n{self.log()}")


def start_ui(work_dir: Path, supervisor_address: str, **env: str) -> UiProcess:
    """Start the UI against a supervisor address and wait until /health answers.

    env: SENSEVOICE_* settings by their lower-case suffix (ui_host="0.0.0.0", max_queue="2").
    Its temporary files stay under work_dir (TMPDIR, GRADIO_TEMP_DIR).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "tmp").mkdir(exist_ok=True)
    port = free_port()
    environment = {
        **os.environ,
        "SENSEVOICE_SUPERVISOR_ADDRESS": supervisor_address,
        "SENSEVOICE_UI_PORT": str(port),
        "SENSEVOICE_CACHE_DIR": str(work_dir / "cache"),
        "GRADIO_TEMP_DIR": str(work_dir / "gradio"),
        "TMPDIR": str(work_dir / "tmp"),
        **{f"SENSEVOICE_{key.upper()}": value for key, value in env.items()},
    }
    log_path = work_dir / "ui.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "ui"], cwd=work_dir, env=environment,
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    STARTED.append(process)
    ui = UiProcess(process, f"http://127.0.0.1:{port}", log_path, work_dir)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(ui.url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    try:
        ui.wait_until(healthy, "/health to answer", timeout=60)
    except AssertionError:
        ui.stop()
        raise
    return ui
