"""L2: one self-describing, inference-ready safetensors file per model fingerprint.

The file holds the model's tensors, the CMVN vectors and the tokenizer's bytes, and its
metadata holds the dims, the frontend config, the source files' checksums and a sha256 of the
data section, so it can be checked and loaded with nothing else. We write and map it ourselves
(the safetensors layout: u64 header length, JSON header, data) so that loading is one
``mmap``: tensors are views of the file's pages, shared between processes through the page
cache, never copied and never unpickled. safetensors' own reader accepts these files.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import asdict
from pathlib import Path

import torch

from sensevoice_core.atomic import atomic_file
from sensevoice_core.config import FrontendConfig, SenseVoiceDims
from sensevoice_core.errors import SenseVoiceError
from sensevoice_core.frontend import CMVN
from sensevoice_core.loader import build_model
from sensevoice_core.pipeline import SenseVoice
from sensevoice_core.tokenizer import Tokenizer

SNAPSHOT_MAGIC = "sensevoice-snapshot"
CMVN_SHIFT, CMVN_SCALE, TOKENIZER_BYTES = "cmvn.shift", "cmvn.scale", "tokenizer.model"
MAX_HEADER_BYTES = 64 << 20
SNAPSHOT_MODE = 0o444
_DTYPES = {torch.float32: "F32", torch.uint8: "U8"}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


class SnapshotError(SenseVoiceError):
    """A snapshot file is unreadable, truncated, altered or for another model."""

    def __init__(self, path: Path, problem: str):
        self.path = path
        super().__init__(f"{path}: {problem}")


def snapshot_path(cache_dir: Path, fingerprint: str) -> Path:
    return cache_dir / "snapshots" / f"sensevoice-{fingerprint[:16]}.safetensors"


def write_snapshot(path: Path, model: SenseVoice, metadata: dict[str, str]) -> str:
    """Write atomically (temp + fsync + rename); returns the sha256 of the data section."""
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous()
               for key, value in model.model.state_dict().items()}
    tensors[CMVN_SHIFT] = model.cmvn.shift.contiguous()
    tensors[CMVN_SCALE] = model.cmvn.scale.contiguous()
    # Bytes go last, so every float32 tensor stays 4-byte aligned for zero-copy views.
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
        "format": "pt",
        "snapshot": SNAPSHOT_MAGIC,
        "dims": json.dumps(asdict(model.model.dims)),
        "frontend": json.dumps(asdict(model.frontend)),
        "source_dir": str(model.model_dir),
        "source_layout": model.layout,
    }

    # Read-only: the file is mapped by every process serving it, and an in-place write
    # would change (or, truncated, crash) them all. It is only ever replaced by rename.
    with atomic_file(path, SNAPSHOT_MODE) as handle:
        # The data is hashed as it is written, in one pass; the header, whose checksums are
        # of fixed length, is written first with placeholders and rewritten at the end.
        placeholder = _header_bytes(entries, metadata, "0" * 64)
        handle.write(placeholder)
        digest = hashlib.sha256()
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
    if metadata.get("snapshot") != SNAPSHOT_MAGIC:
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


def verify_data(path: Path) -> str:
    """Hash the data section and compare it with the checksum in the metadata (reads it all);
    returns that checksum."""
    _, metadata, data_start = read_header(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(data_start)
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    if digest.hexdigest() != metadata.get("data_sha256"):
        raise SnapshotError(path, "data checksum mismatch: the file was altered or damaged")
    return digest.hexdigest()


def load_snapshot(path: Path, expected_fingerprint: str, device: str = "cpu") -> SenseVoice:
    """Map the snapshot and build a ready model; raises SnapshotError if anything disagrees."""
    entries, metadata, data_start = read_header(path)
    if metadata.get("fingerprint") != expected_fingerprint:
        raise SnapshotError(path, f"fingerprint {metadata.get('fingerprint', '?')[:16]} is not "
                                  f"the model's {expected_fingerprint[:16]}")
    try:
        dims = SenseVoiceDims(**json.loads(metadata["dims"]))
        frontend = FrontendConfig(**json.loads(metadata["frontend"]))
    except (KeyError, TypeError, ValueError) as e:  # FrontendConfig/SenseVoiceDims validate
        raise SnapshotError(path, f"bad metadata: {e}") from e
    storage = torch.UntypedStorage.from_file(str(path), shared=False,
                                             nbytes=path.stat().st_size)
    tensors = {}
    for name, entry in entries.items():
        dtype = _TORCH_DTYPES[entry["dtype"]]
        itemsize = dtype.itemsize
        begin = data_start + entry["data_offsets"][0]
        if begin % itemsize:
            raise SnapshotError(path, f"tensor {name} is not aligned")
        tensors[name] = torch.empty(0, dtype=dtype).set_(storage, begin // itemsize,
                                                          entry["shape"])
    tokenizer_bytes = tensors.pop(TOKENIZER_BYTES, None)
    shift, scale = tensors.pop(CMVN_SHIFT, None), tensors.pop(CMVN_SCALE, None)
    if tokenizer_bytes is None or shift is None or scale is None:
        raise SnapshotError(path, "missing tokenizer or CMVN tensors")
    if not shift.numel() == scale.numel() == dims.input_size == frontend.feature_size:
        raise SnapshotError(path, f"CMVN size {shift.numel()}, model input {dims.input_size} "
                                  f"and frontend {frontend.feature_size} disagree")
    model = build_model(path, dims, tensors)
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
