"""L2: one self-describing, inference-ready safetensors file per model directory and fingerprint.

The file holds the model's tensors, the CMVN vectors and the tokenizer's bytes, and its
metadata holds the dims, the frontend config, the source directory and its files' checksums,
and a sha256 of the data section, so it can be checked and loaded with nothing else. We write
and map it ourselves (the safetensors layout: u64 header length, JSON header, data) so that
loading is one ``mmap``: tensors are views of the file's pages, shared between processes
through the page cache, never copied and never unpickled. safetensors' own reader accepts
these files.

The data checksum is a sha256 over the sha256 of each DATA_CHUNK_BYTES chunk of the data
section, so that checking it runs on every core; reading the mapped pages to hash them also
maps the pages the first transcription would fault in anyway.

A model converted to a reduced compute type (convert.py) is stored converted: bf16/f16
weights (BF16/F16), int8 weights with fp32 scales (I8/F32). The metadata's ``compute_type``
names the type of the tensors (absent in older files: float32); ``compute_requested`` the
type the load asked for and ``compute_gate`` the accuracy gate's outcome, when they differ
(the gate fell back to a safer type, whose tensors the file then holds); for reduced types
``compute_checked`` and, for int8, ``int8_reduce_range`` (cache_compute.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sensevoice_core.atomic import atomic_file
from sensevoice_core.compute import CONCRETE_TYPES
from sensevoice_core.config import FrontendConfig, SenseVoiceDims
from sensevoice_core.convert import build_structure
from sensevoice_core.errors import SnapshotError
from sensevoice_core.frontend import CMVN
from sensevoice_core.linux import MADV_POPULATE_READ, MADV_WILLNEED, madvise
from sensevoice_core.loader import adopt_tensors, check_state_dict
from sensevoice_core.path_cache import FileIdentity, PathRecord
from sensevoice_core.pipeline import SenseVoice
from sensevoice_core.tokenizer import Tokenizer

SNAPSHOT_MAGIC = "sensevoice-snapshot"
CMVN_SHIFT, CMVN_SCALE, TOKENIZER_BYTES = "cmvn.shift", "cmvn.scale", "tokenizer.model"
MAX_HEADER_BYTES = 64 << 20
SNAPSHOT_MODE = 0o444
DATA_CHUNK_BYTES = 16 << 20  # small enough to keep 16 cores busy on a full-size model
OPEN_ATTEMPTS = 3  # the file was replaced (renamed over) while being opened: open the new one
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
           torch.int8: "I8", torch.uint8: "U8"}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


@dataclass(frozen=True)
class SnapshotSource:
    """The model directory a snapshot is built from, and its files' sha256 and size by role."""

    model_dir: str
    files: dict[str, tuple[str, int]]

    @classmethod
    def of(cls, record: PathRecord) -> SnapshotSource:
        return cls(model_dir=record.model_dir,
                   files={role: (rec.sha256, rec.size) for role, rec in record.files.items()})

    def to_metadata(self) -> dict[str, str]:
        files = {role: {"sha256": sha256, "size": size}
                 for role, (sha256, size) in sorted(self.files.items())}
        return {"source_dir": self.model_dir, "source_files": json.dumps(files)}

    @classmethod
    def from_metadata(cls, path: Path, metadata: dict[str, str]) -> SnapshotSource:
        try:
            files = json.loads(metadata["source_files"])
            return cls(model_dir=str(metadata["source_dir"]),
                       files={str(role): (str(entry["sha256"]), int(entry["size"]))
                              for role, entry in files.items()})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SnapshotError(path, f"bad source metadata ({type(e).__name__}: {e}); "
                                      "written by another version") from e


def snapshot_path(cache_dir: Path, fingerprint: str, model_dir: str) -> Path:
    """One snapshot per fingerprint and model directory: each is checked against its source
    directory, so two copies of one model each get their own rather than evicting each other."""
    directory_id = hashlib.sha256(model_dir.encode()).hexdigest()[:12]
    return cache_dir / "snapshots" / f"sensevoice-{fingerprint[:16]}-{directory_id}.safetensors"


def check_source(path: Path, metadata: dict[str, str], fingerprint: str,
                 expected: SnapshotSource) -> None:
    """Raise SnapshotError naming both sides unless the snapshot was built from exactly the
    expected files in the expected directory."""
    found = metadata.get("fingerprint", "?")
    if found != fingerprint:
        raise SnapshotError(path, f"its fingerprint {found[:16]} is not {fingerprint[:16]}, the "
                                  f"fingerprint of {expected.model_dir}")
    source = SnapshotSource.from_metadata(path, metadata)
    if source.model_dir != expected.model_dir:
        raise SnapshotError(path, f"it was built from {source.model_dir}, not from "
                                  f"{expected.model_dir}, the directory being loaded")
    for role, (sha256, size) in expected.files.items():
        built_from = source.files.get(role)
        if built_from != (sha256, size):
            was = (f"sha256 {built_from[0][:16]}, {built_from[1]:,} bytes" if built_from
                   else "no record")
            raise SnapshotError(path, f"it was built from a {role} file with {was}; the one in "
                                      f"{expected.model_dir} has sha256 {sha256[:16]}, "
                                      f"{size:,} bytes")


class _ChunkedDigest:
    """sha256 over the sha256 of each DATA_CHUNK_BYTES chunk, fed sequentially."""

    def __init__(self) -> None:
        self._digests: list[bytes] = []
        self._chunk = hashlib.sha256()
        self._filled = 0

    def update(self, data: memoryview) -> None:
        while len(data):
            take = min(len(data), DATA_CHUNK_BYTES - self._filled)
            self._chunk.update(data[:take])
            self._filled += take
            data = data[take:]
            if self._filled == DATA_CHUNK_BYTES:
                self._digests.append(self._chunk.digest())
                self._chunk, self._filled = hashlib.sha256(), 0

    def hexdigest(self) -> str:
        tail = [self._chunk.digest()] if self._filled else []
        return hashlib.sha256(b"".join(self._digests + tail)).hexdigest()


def chunked_sha256(data: memoryview, threads: int) -> str:
    """The same digest as _ChunkedDigest, the chunks hashed on up to `threads` threads
    (hashlib releases the GIL for large buffers)."""
    chunks = [data[start:start + DATA_CHUNK_BYTES]
              for start in range(0, len(data), DATA_CHUNK_BYTES)]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(chunks) or 1))) as pool:
        digests = list(pool.map(lambda chunk: hashlib.sha256(chunk).digest(), chunks))
    return hashlib.sha256(b"".join(digests)).hexdigest()


def write_snapshot(path: Path, model: SenseVoice, source: SnapshotSource,
                   metadata: dict[str, str]) -> str:
    """Write atomically (temp + fsync + rename); returns the checksum of the data section."""
    tensors = {key: value.detach().to("cpu").contiguous()
               for key, value in model.model.state_dict().items()}
    tensors[CMVN_SHIFT] = model.cmvn.shift.contiguous()
    tensors[CMVN_SCALE] = model.cmvn.scale.contiguous()
    # Widest elements first and the bytes last, so every tensor stays aligned to its element
    # size for zero-copy views (a stable sort: a float32 model's order is unchanged).
    tensors = dict(sorted(tensors.items(), key=lambda item: -item[1].element_size()))
    tensors[TOKENIZER_BYTES] = torch.frombuffer(
        bytearray(model.tokenizer.processor.serialized_model_proto()), dtype=torch.uint8)

    entries, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    metadata = {
        **metadata,
        **source.to_metadata(),
        "format": "pt",
        "snapshot": SNAPSHOT_MAGIC,
        "dims": json.dumps(asdict(model.model.dims)),
        "frontend": json.dumps(asdict(model.frontend)),
        "source_layout": model.layout,
        "compute_type": getattr(model.model, "compute_type", "float32"),
        "data_chunk_bytes": str(DATA_CHUNK_BYTES),
    }

    # Read-only: the file is mapped by every process serving it, and an in-place write
    # would change (or, truncated, crash) them all. It is only ever replaced by rename.
    with atomic_file(path, SNAPSHOT_MODE) as handle:
        # The data is hashed as it is written, in one pass; the header, whose checksums are
        # of fixed length, is written first with placeholders and rewritten at the end.
        placeholder = _header_bytes(entries, metadata, "0" * 64)
        handle.write(placeholder)
        digest = _ChunkedDigest()
        for tensor in tensors.values():
            raw = _raw_bytes(tensor)
            digest.update(raw)
            handle.write(raw)
        data_sha256 = digest.hexdigest()
        header = _header_bytes(entries, metadata, data_sha256)
        assert len(header) == len(placeholder)
        handle.seek(0)
        handle.write(header)
    return data_sha256


def _header_bytes(entries: dict, metadata: dict[str, str], data_sha256: str) -> bytes:
    """u64 length + JSON header (8-byte aligned), checksummed, for the given data checksum."""
    metadata = {**metadata, "data_sha256": data_sha256}
    metadata["header_sha256"] = _header_digest(entries, metadata)
    header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # keeps the data section 8-byte aligned
    return struct.pack("<Q", len(header)) + header


def _header_digest(entries: dict, metadata: dict[str, str]) -> str:
    """sha256 of the header's meaning (entries and metadata, its own digest left out)."""
    signed = {"entries": entries,
              "metadata": {k: v for k, v in metadata.items() if k != "header_sha256"}}
    return hashlib.sha256(json.dumps(signed, sort_keys=True).encode()).hexdigest()


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def read_header(path: Path) -> tuple[dict, dict[str, str], int]:
    """(tensor entries, metadata, offset of the data section), checked against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise SnapshotError(path, "truncated: no header")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > min(MAX_HEADER_BYTES, size - 8):
                raise SnapshotError(path, f"header length {header_size} exceeds the file")
            header = json.loads(handle.read(header_size))
    except (OSError, ValueError) as e:
        raise SnapshotError(path, f"unreadable header: {e}") from e
    if not isinstance(header, dict):
        raise SnapshotError(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or metadata.get("snapshot") != SNAPSHOT_MAGIC:
        raise SnapshotError(path, "not a SenseVoice snapshot")
    data_start = 8 + header_size
    expected_end = 0
    if metadata.get("header_sha256") != _header_digest(header, metadata):
        raise SnapshotError(path, "header checksum mismatch: the header was altered or damaged")
    try:
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            dtype = _TORCH_DTYPES.get(entry["dtype"])
            count = math.prod(entry["shape"])
            if begin != expected_end or dtype is None or end - begin != count * dtype.itemsize:
                raise SnapshotError(path, f"bad layout at tensor {name}")
            expected_end = end
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(path, f"malformed header entry: {e}") from e
    if data_start + expected_end != size:
        raise SnapshotError(path, f"size {size} bytes, header describes "
                                  f"{data_start + expected_end}: truncated or extended")
    return header, metadata, data_start


@dataclass
class MappedSnapshot:
    """A snapshot's checked header and its mapping (private, copy-on-write), from one file."""

    path: Path
    identity: FileIdentity
    entries: dict
    metadata: dict[str, str]
    data_start: int
    storage: torch.UntypedStorage

    def verify(self, threads: int | None = None) -> str:
        """Hash the mapped data section and compare it with the header's checksum; returns it.

        threads: default every CPU this process may use. It is a short burst, and a worker
        loading beside a serving one runs at idle priority, so it takes only idle cores.
        """
        threads = threads or len(os.sched_getaffinity(0))
        chunk_bytes = self.metadata.get("data_chunk_bytes")
        if chunk_bytes != str(DATA_CHUNK_BYTES):
            raise SnapshotError(self.path, f"data checksum over chunks of {chunk_bytes} bytes, "
                                           f"this version uses {DATA_CHUNK_BYTES}")
        whole = torch.empty(0, dtype=torch.uint8).set_(self.storage, 0, (self.identity.size,))
        digest = chunked_sha256(memoryview(whole.numpy())[self.data_start:], threads)
        if digest != self.metadata.get("data_sha256"):
            raise SnapshotError(self.path,
                                "data checksum mismatch: the file was altered or damaged")
        return digest

    def build(self, device: str = "cpu") -> SenseVoice:
        """A ready model whose tensors are views of the mapping."""
        path, metadata = self.path, self.metadata
        try:
            dims = SenseVoiceDims(**json.loads(metadata["dims"]))
            frontend = FrontendConfig(**json.loads(metadata["frontend"]))
        except (KeyError, TypeError, ValueError) as e:  # FrontendConfig/SenseVoiceDims validate
            raise SnapshotError(path, f"bad metadata: {e}") from e
        tensors = {}
        for name, entry in self.entries.items():
            dtype = _TORCH_DTYPES[entry["dtype"]]
            itemsize = dtype.itemsize
            begin = self.data_start + entry["data_offsets"][0]
            if begin % itemsize:
                raise SnapshotError(path, f"tensor {name} is not aligned")
            tensors[name] = torch.empty(0, dtype=dtype).set_(self.storage, begin // itemsize,
                                                              entry["shape"])
        tokenizer_bytes = tensors.pop(TOKENIZER_BYTES, None)
        shift, scale = tensors.pop(CMVN_SHIFT, None), tensors.pop(CMVN_SCALE, None)
        if tokenizer_bytes is None or shift is None or scale is None:
            raise SnapshotError(path, "missing tokenizer or CMVN tensors")
        if not shift.numel() == scale.numel() == dims.input_size == frontend.feature_size:
            raise SnapshotError(path, f"CMVN size {shift.numel()}, model input "
                                      f"{dims.input_size} and frontend {frontend.feature_size} "
                                      f"disagree")
        compute_type = metadata.get("compute_type", "float32")
        if compute_type not in CONCRETE_TYPES:
            raise SnapshotError(path, f"unknown compute type {compute_type!r}")
        model = build_structure(dims, compute_type)
        check_state_dict(path, tensors, model)
        expected = {key: value.dtype for key, value in model.state_dict().items()}
        wrong = [f"{key} is {tensors[key].dtype}, not {dtype}"
                 for key, dtype in expected.items() if tensors[key].dtype != dtype]
        if wrong:
            raise SnapshotError(path, f"{compute_type} tensors of the wrong type: "
                                      f"{'; '.join(wrong[:3])}")
        adopt_tensors(model, tensors)
        model.eval()
        if torch.device(device) != torch.device("cpu"):
            model = model.to(device)
        source_dir = Path(metadata.get("source_dir", str(path.parent)))
        return SenseVoice(
            model=model,
            tokenizer=Tokenizer.from_bytes(tokenizer_bytes.numpy().tobytes(), source_dir),
            cmvn=CMVN(shift=shift, scale=scale),
            frontend=frontend,
            model_dir=source_dir,
            layout=metadata.get("source_layout", "official"),
        )


def open_snapshot(path: Path) -> MappedSnapshot:
    """Read and check the header and map the file, both from the same file: a snapshot is
    replaced by rename, so its identity (inode, ctime, ...) is compared before and after."""
    for _ in range(OPEN_ATTEMPTS):
        try:
            before = FileIdentity.of(path)
        except OSError as e:
            raise SnapshotError(path, f"unreadable: {e.strerror}") from e
        entries, metadata, data_start = read_header(path)
        try:
            storage = torch.UntypedStorage.from_file(str(path), shared=False,
                                                     nbytes=before.size)
            after = FileIdentity.of(path)
        except (OSError, RuntimeError) as e:
            raise SnapshotError(path, f"cannot map it: {e}") from e
        if after == before:
            # Beside the build and the hash, not before them: on a cold page cache it reads
            # the file as they do; the thread holds the storage, so the mapping outlives it.
            threading.Thread(target=populate, args=(storage, before.size), daemon=True,
                             name="snapshot-populate").start()
            return MappedSnapshot(path, before, entries, metadata, data_start, storage)
    raise SnapshotError(path, f"replaced {OPEN_ATTEMPTS} times while being opened")


def populate(storage: torch.UntypedStorage, nbytes: int) -> str:
    """Fault the mapping's pages in, in one call, rather than page by page in the threads that
    hash and build the model or in the first request (a process that verified this file
    before, or wrote it, does not hash it again). 0.04-0.09 s for the 0.9 GB float32 fixture
    with the page cache warm. Returns how: "populate" (page tables filled, what was not cached
    read), "willneed" (kernels before 5.14: read-ahead started, the faults still to come) or
    "none" (not Linux/glibc: nothing changes)."""
    address = storage.data_ptr()  # the mmap's start: page-aligned
    for advice, name in ((MADV_POPULATE_READ, "populate"), (MADV_WILLNEED, "willneed")):
        if nbytes and madvise(address, nbytes, advice) is None:
            return name
    return "none"


def verify_data(path: Path, threads: int | None = None) -> str:
    """Check a snapshot's header and data checksum (reads it all); returns the data checksum."""
    return open_snapshot(path).verify(threads)
