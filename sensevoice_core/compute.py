"""Compute types: which numeric type a model's layers run in, chosen per machine.

faster-whisper's names where they fit. ``auto`` is resolved where the model is loaded (each
worker, each node), from what that machine has; the other values are taken as asked.
"""

from __future__ import annotations

from typing import Literal

ComputeType = Literal["auto", "float32", "bfloat16", "float16", "int8", "int8_bfloat16"]
