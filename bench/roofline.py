"""The GEMM roofline of one forward pass, per compute type, for bench/rtf.py.

The roofline time is how long the model's GEMMs alone take when called as plain library GEMMs
at the model's own shapes: per layer the q/k/v projection (d -> 3d), the output projection
(d -> d), the two feed-forward GEMMs (d -> units -> d) and the two attention products per
head (Q K^T, attention x V), times the number of layers, plus the CTC head (d -> vocab). The
first layer's projection reads 560 features instead of 512; it is counted as 512 (0.04% of the
total). Everything between the GEMMs (layer norms, FSMN convolution, softmax, casts, copies) is
what a model adds above its roofline.

The GEMM per compute type:
- float32 / bfloat16 / float16: torch.matmul in that dtype (attention in the same dtype);
- int8 / int8_bfloat16: the kernel our Int8Linear calls, ``quantized::linear_dynamic`` on a
  per-channel prepacked weight (dynamic activation quantisation included, our per-row
  scaling left out); attention in fp32 / bf16.
The CTC head is an fp32 GEMM for the float types (convert.py keeps it fp32).

For int8 this is a KERNEL baseline, not a hardware roofline: it times the very fbgemm call the
model makes, so "x kernel" says how much our wrapper (per-row scaling, casts) and the non-GEMM
work add, not how far int8 is from the machine's int8 peak (no faster int8 GEMM exists here to
measure one: torch._int_mm and _weight_int8pack_mm are 50-60x slower on AVX2). rtf.py labels
it so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sensevoice_core.config import SenseVoiceDims
from sensevoice_core.convert import FLOAT_DTYPES
from sensevoice_core.int8 import Int8Linear, needs_reduce_range
from sensevoice_core.vocab import NUM_PROMPT_FRAMES

CALLS = 10  # each timed run repeats its GEMMs this many times, so one run is long enough


@dataclass(frozen=True)
class RooflineRuns:
    """Two timed runs whose medians give the roofline: ``layer`` (one layer's GEMMs) and
    ``head`` (the CTC head), each repeated CALLS times."""

    compute_type: str
    layer: Callable[[], object]
    head: Callable[[], object]
    layers: int  # layers in the model

    def seconds(self, layer_s: float, head_s: float) -> float:
        """The roofline time of one forward pass from the two runs' median seconds."""
        return (self.layers * layer_s + head_s) / CALLS


def _int8_gemm(in_features: int, out_features: int) -> Callable[[Tensor], Tensor]:
    """The bare int8 kernel of an Int8Linear of this shape (random weights)."""
    layer = Int8Linear.from_linear(nn.Linear(in_features, out_features),
                                   needs_reduce_range())
    layer.prepack()
    packed = getattr(layer, "_packed", None)
    if packed is None:
        raise RuntimeError("Int8Linear no longer keeps its packed weight in _packed: update "
                           "bench/roofline.py to time the kernel it now calls")
    rr = layer.reduce_range
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, rr)


def _float_gemm(in_features: int, out_features: int, dtype: torch.dtype
                ) -> Callable[[Tensor], Tensor]:
    weight = torch.randn(in_features, out_features).to(dtype)
    return lambda x: torch.matmul(x, weight)


def roofline_runs(dims: SenseVoiceDims, frames: int, compute_type: str) -> RooflineRuns:
    """Runs timing the GEMMs of one forward pass over `frames` LFR frames (prompt added)."""
    rows = frames + NUM_PROMPT_FRAMES
    d, units, heads = dims.output_size, dims.linear_units, dims.attention_heads
    dtype = FLOAT_DTYPES[compute_type]  # of everything but the int8 Linear layers
    int8 = compute_type.startswith("int8")
    # int8 kernels take fp32 activations (Int8Linear casts bf16 input up)
    x = torch.randn(rows, d).to(torch.float32 if int8 else dtype)
    hidden = torch.randn(rows, units).to(x.dtype)

    def gemm(in_features: int, out_features: int) -> Callable[[Tensor], Tensor]:
        if int8:
            return _int8_gemm(in_features, out_features)
        return _float_gemm(in_features, out_features, dtype)

    qkv, out, ff1, ff2 = gemm(d, 3 * d), gemm(d, d), gemm(d, units), gemm(units, d)
    head = gemm(d, dims.vocab_size) if int8 else _float_gemm(d, dims.vocab_size, torch.float32)
    head_x = x if int8 else x.float()
    q = torch.randn(heads, rows, d // heads).to(dtype)
    k_t = torch.randn(heads, d // heads, rows).to(dtype)
    scores = torch.randn(heads, rows, rows).to(dtype)

    def layer() -> None:
        for _ in range(CALLS):
            qkv(x)
            torch.matmul(q, k_t)
            torch.matmul(scores, q)
            out(x)
            ff1(x)
            ff2(hidden)

    def head_run() -> None:
        for _ in range(CALLS):
            head(head_x)

    return RooflineRuns(compute_type, layer, head_run, dims.num_blocks + dims.tp_blocks)
