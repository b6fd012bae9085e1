"""A live stream's state as bytes and back: JSON of counters and base64 arrays (no pickle), so a
stream can move to another model between turns (LiveTranscriber.snapshot / restore).

Every problem with bytes that are not such a state is a ValueError that names it.
"""

from __future__ import annotations

import base64
import binascii
import json

import numpy as np

FORMAT = "sensevoice-live-stream"
VERSION = 1
DTYPES = {"float32": np.float32, "int64": np.int64}
MAX_ARRAY_VALUES = 16_000 * 600  # no state holds more than minutes of 16 kHz audio

Counter = int | float | bool | None


def pack(counters: dict[str, Counter], arrays: dict[str, np.ndarray]) -> bytes:
    encoded = {}
    for name, array in arrays.items():
        dtype = next(key for key, value in DTYPES.items() if array.dtype == value)
        encoded[name] = {"dtype": dtype, "shape": list(array.shape),
                         "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()}
    return json.dumps({"format": FORMAT, "version": VERSION, "counters": counters,
                       "arrays": encoded}, separators=(",", ":")).encode()


def unpack(state: bytes) -> tuple[dict[str, Counter], dict[str, np.ndarray]]:
    """The counters and arrays of pack(), or ValueError naming what is wrong."""
    if not isinstance(state, (bytes, bytearray, memoryview)):
        raise TypeError(f"stream state: expected bytes, found {type(state).__name__}")
    try:
        document = json.loads(bytes(state))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"stream state is not a snapshot (not JSON: {e})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"stream state is not a snapshot (format {FORMAT!r} expected)")
    if document.get("version") != VERSION:
        raise ValueError(f"stream state has version {document.get('version')!r}; this engine "
                         f"reads version {VERSION}")
    counters, arrays = document.get("counters"), document.get("arrays")
    if not isinstance(counters, dict) or not isinstance(arrays, dict):
        raise ValueError(  # noqa: TRY004 - bad content of the bytes, not a bad argument
            "stream state is damaged: 'counters' and 'arrays' must be objects")
    for name, value in counters.items():
        if not (value is None or isinstance(value, (int, float, bool))):
            raise ValueError(f"stream state is damaged: counter {name!r} is "
                             f"{type(value).__name__}, expected a number")
    return counters, {name: _array(name, entry) for name, entry in arrays.items()}


def _array(name: str, entry: object) -> np.ndarray:
    try:
        assert isinstance(entry, dict)
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(int(size) for size in entry["shape"])
        data = base64.b64decode(entry["data"], validate=True)
    except (AssertionError, KeyError, TypeError, ValueError, binascii.Error) as e:
        raise ValueError(f"stream state is damaged: array {name!r} is not dtype, shape and "
                         f"base64 data ({type(e).__name__}: {e})") from None
    count = int(np.prod(shape)) if shape else 1
    if any(size < 0 for size in shape) or count > MAX_ARRAY_VALUES:
        raise ValueError(f"stream state is damaged: array {name!r} has shape {shape}")
    if len(data) != count * np.dtype(dtype).itemsize:
        raise ValueError(f"stream state is damaged: array {name!r} of shape {shape} has "
                         f"{len(data)} bytes, expected {count * np.dtype(dtype).itemsize}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"stream state is damaged: array {name!r} holds NaN or infinity")
    return array
