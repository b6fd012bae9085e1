"""L1: whether a reload asks for exactly the model already serving, decided without a worker.

Torch-free (the supervisor never imports torch): a ``stat`` per model file against the L3
record (``model_path.json``), no hashing. The reload is an L1 hit only when

- it asks for the directory being served (after check_reload_path resolved it);
- L3 holds an entry for that directory, consistent with its own checksums, written by this
  code version, and every file still has the identity it had when it was hashed (device,
  inode, size, mtime and ctime: a file rewritten with its mtime set back has a new ctime);
- that entry's fingerprint, served in the serving model's compute type, is the serving
  model's fingerprint.

Anything else (no entry, a touched or replaced file, an unreadable or hand-edited L3, another
directory) is a miss, and the reload takes the blue-green path, which hashes what it must
(and may well find the same fingerprint: an L2 reload).

Another directory holding the same files is a miss on purpose: the reload moves the service
to that directory (the file watcher, the status and later reloads follow it), which only a
worker loading from it does. Trust: L1 believes L3 exactly as far as an L2 load does (which
serves the snapshot L3 names once the snapshot's header agrees with L3's checksums); whoever
can rewrite the cache directory can mislabel either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sensevoice_core.compute import served_fingerprint
from sensevoice_core.errors import SenseVoiceError
from sensevoice_core.layout import model_files
from sensevoice_core.path_cache import PathCache
from sensevoice_core.protocol import ModelInfo

# The supervisor's loop reads L3 itself: a file far larger than any real one (a few KiB per
# model directory) is not parsed there, and the reload takes the usual path.
MAX_L3_BYTES = 4 << 20


@dataclass(frozen=True)
class L1Verdict:
    hit: bool
    reason: str  # why not, for the debug log; "unchanged" on a hit


def unchanged_verdict(path: str | None, serving: ModelInfo | None,
                      cache_dir: Path) -> L1Verdict:
    """Whether the model at `path` (absolute and resolved, or None for the served one) is the
    serving model, with its files unchanged since they were hashed."""
    if serving is None:
        return L1Verdict(False, "no model is serving")
    if path is not None and path != serving.model_dir:
        return L1Verdict(False, f"another directory than the served {serving.model_dir}")
    cache = PathCache(cache_dir)
    try:
        l3_bytes = cache.path.stat().st_size
    except OSError as e:
        return L1Verdict(False, f"no L3 at {cache.path} ({e.strerror})")
    if l3_bytes > MAX_L3_BYTES:
        return L1Verdict(False, f"{cache.path} is over {MAX_L3_BYTES >> 20} MiB")
    try:
        files = model_files(serving.model_dir)
        record = cache.unchanged_record(files)
    except (SenseVoiceError, OSError, ValueError, RuntimeError) as e:
        return L1Verdict(False, f"the model files cannot be checked: {e}")
    if record is None:
        return L1Verdict(False, f"no L3 entry in {cache.path} matches the files as they are "
                                f"now (changed, touched, or never hashed)")
    if record.model_dir != serving.model_dir:
        return L1Verdict(False, f"L3 names {record.model_dir}, not {serving.model_dir}")
    if served_fingerprint(record.fingerprint, serving.compute_type) != serving.fingerprint:
        return L1Verdict(False, f"the files' fingerprint {record.fingerprint[:16]} is not the "
                                f"serving one {serving.fingerprint[:16]}")
    return L1Verdict(True, "unchanged")
