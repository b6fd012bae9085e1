"""Which files the page may read: those Gradio received as uploads, and the bundled examples.

A Gradio API caller can name any path in a file value ({"path": "/etc/passwd", ...}). Mounted
with ``mount_gradio_app``, Gradio never checks it (only ``launch()`` turns its check on) and
copies the file into its cache before any handler runs, on the event loop: a FIFO or
/dev/zero stalls the whole process; a URL is downloaded. So ``ui.gradio_guard`` refuses a
request naming any other file before Gradio sees it, and the handler checks again before it
reads. One sentence for every refusal, whether the path exists or not; nothing outside the
allowed folders is opened or even stat'ed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
REFUSED = ("Only audio uploaded to this page (or one of its example clips) can be "
           "transcribed; upload the file and try again.")


def allowed_roots() -> tuple[Path, ...]:
    """Gradio's upload folder (GRADIO_TEMP_DIR, or <tmp>/gradio) and the examples folder."""
    return Path(get_upload_folder()).resolve(), EXAMPLES_DIR


def allowed_file(path: str) -> Path | None:
    """path with symlinks resolved, when it is a regular file in an allowed folder."""
    if not path or "://" in path or "\0" in path:
        return None
    resolved = Path(os.path.abspath(path)).resolve()  # lstat and readlink only: opens nothing
    if not any(resolved.is_relative_to(root) for root in allowed_roots()):
        return None
    try:
        return resolved if stat.S_ISREG(os.stat(resolved).st_mode) else None
    except OSError:
        return None


def uploaded_file(path: str) -> Path:
    """The file a handler may read, or the refusal as a sentence for the page."""
    allowed = allowed_file(path)
    if allowed is None:
        raise gr.Error(REFUSED, print_exception=False)
    return allowed
