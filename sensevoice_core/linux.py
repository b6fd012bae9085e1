"""The few Linux libc calls the service makes through ctypes (prctl, madvise), in one place.

Each returns None on success, else why not (another OS, no glibc, an old kernel), so callers
decide whether that matters.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
MADV_WILLNEED = 3
MADV_POPULATE_READ = 22  # Linux 5.14+; older kernels answer EINVAL
COMM_BYTES = 15  # a thread name (comm) holds 15 bytes and the NUL


@functools.cache
def libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def prctl(option: int, value: int | ctypes.Array) -> str | None:
    """prctl(option, value): None, or why it failed."""
    lib = libc()
    if lib is None or not hasattr(lib, "prctl"):
        return f"{sys.platform} has no prctl"
    lib.prctl.restype = ctypes.c_int
    if lib.prctl(option, value, 0, 0, 0) != 0:
        return f"prctl({option}) failed: {os.strerror(ctypes.get_errno())}"
    return None


def set_process_name(name: str) -> str | None:
    """The name ps -o comm, top and pgrep show (its first 15 bytes)."""
    return prctl(PR_SET_NAME, ctypes.create_string_buffer(name.encode(errors="replace")[:COMM_BYTES]))


def madvise(address: int, nbytes: int, advice: int) -> str | None:
    """madvise over [address, address + nbytes) (address page-aligned): None, or why not."""
    lib = libc()
    if lib is None or not hasattr(lib, "madvise"):
        return f"{sys.platform} has no madvise"
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.madvise.restype = ctypes.c_int
    if lib.madvise(address, nbytes, advice) != 0:
        return f"madvise({advice}) failed: {os.strerror(ctypes.get_errno())}"
    return None
