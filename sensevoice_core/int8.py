"""Int8 Linear layers: per-channel int8 weights, dynamic int8 activations, fp32 out.

The weights are plain tensors (``weight`` int8 (out, in), ``weight_scale`` fp32 (out,),
``bias`` fp32), so a snapshot stores and maps them like any other; the kernel's packed copy
is built from them once per process by ``prepack`` (timed as its own load step).

The kernel is fbgemm's ``quantized::linear_dynamic`` (torch's own; the torch.ao
``quantize_dynamic`` flow that wraps it is deprecated in torch 2.14). It quantises its input
with ONE scale taken from the whole call's min/max, so a row's output would depend on the
other rows in the call (batch companions, padding). Each row is therefore divided by its own
abs-max first, and one sentinel row holding +1 and -1 is appended: the call's range is then
always exactly [-1, 1], every row is quantised with the same fixed scale whatever the batch,
and the int32 accumulation is exact, so this LAYER's output for a row is bit-identical alone
or batched. The whole model is not: attention with a padding mask and batched shapes round
differently, so a batched item's text is the same except at argmax near-ties. The rows are
scaled back and the bias added afterwards. A row that is not finite is kept out of the shared
range (zeroed in the call) and its output is NaN, so it hurts only itself. Measured on a Zen 3
(AVX2) at M=87, this costs ~10% over the bare call.

fbgemm's u8 x s8 kernels without VNNI (its AVX2 path, which CPUs with AVX-VNNI but no
AVX-512 VNNI also run) add pairs into int16 (vpmaddubsw), which saturates for 8-bit
activations: activations use 7 bits there (reduce_range). Which kernel runs is measured, not
guessed from CPU flags: ``needs_reduce_range`` probes it once per process.
"""

from __future__ import annotations

import functools
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

WEIGHT_LEVELS = 127  # symmetric int8 weights in [-127, 127]
_TINY = torch.finfo(torch.float32).tiny


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per output channel symmetric int8: (int8 weight, fp32 scale per row)."""
    weight = weight.detach().float()
    peak = torch.maximum(weight.amax(dim=1), weight.amin(dim=1).neg_())
    scale = peak.clamp_min_(_TINY) / WEIGHT_LEVELS
    q = torch.mul(weight, scale.reciprocal()[:, None]).round_()
    return q.clamp_(-WEIGHT_LEVELS, WEIGHT_LEVELS).to(torch.int8), scale


def int8_tensors(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """An Int8Linear's weight, weight_scale and bias from a float Linear's weight and bias
    (none: zeros)."""
    q, scale = quantize_weight(weight)
    bias = bias.detach().float() if bias is not None else torch.zeros(weight.shape[0])
    return q, scale, bias


class Int8Linear(nn.Module):
    """A Linear layer over int8 weights; input any float dtype, output in the input's dtype
    (fp32 for int8, bf16 for int8_bfloat16), computed in fp32."""

    def __init__(self, in_features: int, out_features: int, reduce_range: bool,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.reduce_range = reduce_range
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device))
        self._packed: object | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, reduce_range: bool) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, reduce_range)
        layer.weight, layer.weight_scale, layer.bias = int8_tensors(linear.weight, linear.bias)
        return layer

    def prepack(self) -> None:
        """Build the kernel's packed weight from the int8 tensors (once per process)."""
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():
            # torch 2.14 flags quantized tensor creation as deprecated; fbgemm's prepack still
            # takes only a quantized weight, and there is no other fast int8 Linear on AVX2.
            warnings.simplefilter("ignore", UserWarning)
            q = torch._make_per_channel_quantized_tensor(
                self.weight, self.weight_scale.double(), zero_points, 0)
        self._packed = torch.ops.quantized.linear_prepack(q, None)

    def forward(self, x: Tensor) -> Tensor:
        if self._packed is None:
            self.prepack()
        rows = x.reshape(-1, self.in_features)
        count = rows.shape[0]
        if rows.dtype != torch.float32:
            rows = rows.float()
        buffer = torch.empty(count + 1, self.in_features)
        # amax and amin are vectorised reductions; vector_norm(inf) and aminmax over rows are
        # 10-60x slower here (measured at (174, 512) on one thread: 27 us vs 1.6 ms).
        peak = torch.maximum(rows.amax(dim=1, keepdim=True),
                             rows.amin(dim=1, keepdim=True).neg_()).clamp_min_(_TINY)
        torch.div(rows, peak, out=buffer[:count])
        broken = ~torch.isfinite(peak[:, 0])  # a NaN/inf row: its peak is NaN or inf
        if bool(broken.any()):
            buffer[:count][broken] = 0.0  # out of the shared range; 0 * peak makes it NaN
        sentinel = buffer[count]
        sentinel.zero_()
        sentinel[0], sentinel[1] = 1.0, -1.0
        out = torch.ops.quantized.linear_dynamic(buffer, self._packed, self.reduce_range)
        out = torch.addcmul(self.bias, out[:count], peak)  # one pass: rows scaled back + bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"reduce_range={self.reduce_range}")


@functools.cache
def needs_reduce_range() -> bool:
    """Whether this CPU's fbgemm kernel saturates 8-bit activations (then use 7 bits): an
    all-ones 512-wide layer must give ~512 (the AVX2 kernel gives ~4). Takes ~1 ms."""
    width = 512
    probe = Int8Linear(width, 1, reduce_range=False)
    probe.weight = torch.full((1, width), WEIGHT_LEVELS, dtype=torch.int8)
    probe.weight_scale = torch.full((1,), 1.0 / WEIGHT_LEVELS)
    probe.bias = torch.zeros(1)
    got = float(probe(torch.ones(1, width)))
    return not abs(got - width) < 0.05 * width  # 7-bit rounding alone gives 516


def int8_layers(model: nn.Module) -> list[Int8Linear]:
    return [module for module in model.modules() if isinstance(module, Int8Linear)]


def prepack_all(model: nn.Module, threads: int) -> None:
    """Prepack every Int8Linear not packed yet, largest first, on `threads` threads (the op
    releases the GIL)."""
    layers = sorted((layer for layer in int8_layers(model) if layer._packed is None),
                    key=lambda layer: -layer.weight.numel())
    if threads <= 1:
        for layer in layers:
            layer.prepack()
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(Int8Linear.prepack, layers))
