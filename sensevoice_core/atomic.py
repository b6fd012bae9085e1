"""Atomic writes: build in a temporary sibling, then rename into place.

A reader never sees a half-written file or directory, and a failure leaves the previous
content untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

DIRECTORY_MODE = 0o755
FILE_MODE = 0o644


@contextmanager
def staged_directory(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; on success it becomes ``target`` by rename.

    With replace=False an existing non-empty target raises FileExistsError before anything is
    written; with replace=True it is swapped out only after the new content is complete.
    """
    if target.exists() and any(target.iterdir()) and not replace:
        raise FileExistsError(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        # mkdtemp and some writers create owner-only modes; a model directory is for reading.
        os.chmod(staging, DIRECTORY_MODE)
        for path in staging.iterdir():
            os.chmod(path, FILE_MODE)
        if target.exists():
            # Two renames: for a moment target is absent, never half-written; a failure of the
            # second puts the old content back.
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, retired / target.name)
            try:
                os.replace(staging, target)
            except OSError:
                os.replace(retired / target.name, target)
                raise
            finally:
                shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: Path, mode: int = FILE_MODE) -> Iterator[BinaryIO]:
    """Yield a handle to a temporary file beside path; on success it is fsynced, given mode
    and renamed over path. On failure it is removed and path is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as handle:
        handle.write(data)
