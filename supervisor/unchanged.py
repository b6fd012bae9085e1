"""L1: whether a reload asks for exactly the model already serving, decided without a worker.

Torch-free (the supervisor never imports torch), and no model or cache file is read (the
official layout's small configuration.json names its tokenizer): a ``stat`` per model file
against the identities the serving worker reported in its ModelInfo (taken from the L3
entry that vouched for the checksums it loaded). The reload is an L1 hit only when

- it asks for the directory being served (after check_reload_path resolved it);
- the directory still names the same files (its layout picks the same paths, symbolic links
  followed) and every one still has the identity it had when it was hashed (device, inode,
  size, mtime and ctime: a file rewritten with its mtime set back has a new ctime);
- the serving fingerprint is its files' checksums served in its compute type by this code
  version (the supervisor's: a code change on disk is the file watcher's business).

Anything else (no identities reported, a touched or replaced file, another directory) is a
miss, and the reload takes the blue-green path, which hashes what it must (and may well find
the same fingerprint: an L2 reload).

Another directory holding the same files is a miss on purpose: the reload moves the service
to that directory (the file watcher, the status and later reloads follow it), which only a
worker loading from it does. Trust: L1 believes the identities exactly as far as an L2 load
believes L3 (the worker took them from the entry whose checksums it served); whoever can
rewrite the cache directory can mislabel either.
"""

from __future__ import annotations

from dataclasses import dataclass

from sensevoice_core.compute import served_fingerprint
from sensevoice_core.errors import SenseVoiceError
from sensevoice_core.layout import model_files
from sensevoice_core.path_cache import (
    ROLES,
    FileIdentity,
    code_version,
    fingerprint_of_checksums,
)
from sensevoice_core.protocol import ModelInfo


@dataclass(frozen=True)
class L1Verdict:
    hit: bool
    reason: str  # why not, for the debug log; "unchanged" on a hit


def unchanged_verdict(path: str | None, serving: ModelInfo | None) -> L1Verdict:
    """Whether the model at `path` (absolute and resolved, or None for the served one) is the
    serving model, with its files unchanged since they were hashed."""
    if serving is None:
        return L1Verdict(False, "no model is serving")
    if path is not None and path != serving.model_dir:
        return L1Verdict(False, f"{path} is another directory than the served "
                                f"{serving.model_dir}")
    if set(serving.file_identities) != set(ROLES) or set(serving.file_paths) != set(ROLES) \
            or set(serving.file_sha256) != set(ROLES):
        return L1Verdict(False, "the serving worker reported no file identities (no L3 entry "
                                "vouched for the checksums it loaded)")
    own = fingerprint_of_checksums(serving.file_sha256, code_version())
    if served_fingerprint(own, serving.compute_type) != serving.fingerprint:
        return L1Verdict(False, f"the serving fingerprint {serving.fingerprint[:16]} is not its "
                                f"files' checksums served in {serving.compute_type} by this "
                                f"code version")
    try:
        files = model_files(serving.model_dir)
        for role in ROLES:
            current = getattr(files, role).resolve()
            if str(current) != serving.file_paths[role]:
                return L1Verdict(False, f"the {role} file is now {current}, not the served "
                                        f"{serving.file_paths[role]}")
            if FileIdentity.of(current) != serving.file_identities[role]:
                return L1Verdict(False, f"the {role} file {current} changed or was touched "
                                        f"since it was hashed")
    except (SenseVoiceError, OSError, ValueError, RuntimeError) as e:
        return L1Verdict(False, f"the model files cannot be checked: {e}")
    return L1Verdict(True, "unchanged")
