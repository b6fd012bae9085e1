"""Subtitle files offered for download by the page, in a folder of this process's own.

The folder lies in Gradio's upload folder, so Gradio serves the files where they are (no
copy). Its name is random (paths reach callers: no pid in them); the owner's pid is in a file
inside. It is removed when the process exits, and one left by a process that was killed is
recognised (its pid is gone) and removed at the next start.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from sensevoice_core.atomic import write_bytes_atomic
from sensevoice_core.processes import pid_alive
from sensevoice_core.result import Segment
from sensevoice_core.subtitles import SubtitleOptions, to_srt

FOLDER_PREFIX = "sensevoice-srt-"
OWNER_FILE = "owner.pid"
KEEP_S = 3600  # files older than this are deleted when the next one is written
UNOWNED_GRACE_S = 60  # a folder without its owner file yet may be another UI starting


def owner_alive(folder: Path) -> bool:
    try:
        pid = (folder / OWNER_FILE).read_text().strip()
    except OSError:
        try:
            return time.time() - folder.stat().st_mtime < UNOWNED_GRACE_S
        except OSError:
            return True  # gone meanwhile
    return not pid.isdigit() or pid_alive(int(pid))


class SubtitleFiles:
    def __init__(self, root: Path):
        self.folder = root / f"{FOLDER_PREFIX}{uuid.uuid4().hex[:16]}"

    def open(self) -> None:
        """Create this process's folder, removing folders whose process is gone."""
        parent = self.folder.parent
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f"{FOLDER_PREFIX}*"):
            if not owner_alive(stale):
                shutil.rmtree(stale, ignore_errors=True)
        self.folder.mkdir()
        (self.folder / OWNER_FILE).write_text(str(os.getpid()))

    def write(self, segments: Sequence[Segment], stem: str, options: SubtitleOptions) -> str:
        """The SRT of segments (cues cut at their words, if they have any) as a file named
        after stem; its path."""
        now = time.time()
        for old in self.folder.glob("*.srt"):  # keep the folder from growing without end
            try:
                if now - old.stat().st_mtime > KEEP_S:
                    old.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
        target = self.folder / f"{stem}-{uuid.uuid4().hex[:8]}.srt"
        write_bytes_atomic(target, to_srt(segments, options).encode("utf-8"))
        return str(target)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
