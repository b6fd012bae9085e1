"""Converting a float32 SenseVoiceSmall to a compute type, and building the structure a
converted snapshot's tensors are mapped into.

- float32: unchanged weights.
- bfloat16 / float16: every parameter but the CTC head's cast once; the model casts features
  in and runs the head in fp32 (model.prompted_logits), so the frontend, the logits (argmax
  near-ties, avg_logprob) and the CTC log-softmax stay fp32. The head is ~4% of the time.
- int8: every Linear (the CTC head included) becomes an Int8Linear (int8.py); LayerNorms,
  the FSMN convolution, attention and the query embeddings stay fp32.
- int8_bfloat16: int8 Linear layers, everything else bf16.
"""

from __future__ import annotations

import torch
from torch import nn

from sensevoice_core.compute import CONCRETE_TYPES, ConcreteComputeType
from sensevoice_core.config import SenseVoiceDims
from sensevoice_core.int8 import Int8Linear, int8_tensors, needs_reduce_range
from sensevoice_core.loader import adopt_tensors
from sensevoice_core.model import SenseVoiceSmall

FLOAT_DTYPES: dict[ConcreteComputeType, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int8": torch.float32, "int8_bfloat16": torch.bfloat16,
}


def _check(compute_type: str) -> ConcreteComputeType:
    if compute_type not in CONCRETE_TYPES:
        raise ValueError(f"compute type {compute_type!r} is not one of "
                         f"{', '.join(CONCRETE_TYPES)} (resolve auto with "
                         f"compute.choose_compute_type first)")
    return compute_type  # type: ignore[return-value]


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Every parameter of a meta structure but the CTC head's to dtype (Int8Linear's are
    buffers: kept)."""
    if dtype == torch.float32:
        return
    for name, module in model.named_modules():
        if name == "ctc" or name.startswith("ctc."):
            continue
        for key, param in module._parameters.items():
            if param is not None:
                module._parameters[key] = nn.Parameter(param.detach().to(dtype),
                                                       requires_grad=False)


def convert_model(model: SenseVoiceSmall, compute_type: ConcreteComputeType) -> SenseVoiceSmall:
    """A float32 model converted to compute_type, as a new module tree; the input is left as
    it was. Tensors that keep their type are shared with the input (inference never writes
    to them), so converting costs only the tensors that change."""
    compute_type = _check(compute_type)
    converted = build_structure(model.dims, compute_type)
    expected = converted.state_dict()  # meta tensors: the names and types to produce
    source = {key: value.detach() for key, value in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for name, module in converted.named_modules():
        if isinstance(module, Int8Linear):
            (state[f"{name}.weight"], state[f"{name}.weight_scale"],
             state[f"{name}.bias"]) = int8_tensors(source[f"{name}.weight"],
                                                   source.get(f"{name}.bias"))
    for key, meta in expected.items():
        if key not in state:
            state[key] = source[key].to(meta.dtype)  # the same tensor when the type holds
    adopt_tensors(converted, state)
    return converted.eval()


def build_structure(dims: SenseVoiceDims, compute_type: ConcreteComputeType) -> SenseVoiceSmall:
    """The module tree of a converted model on the meta device, for mapped tensors."""
    compute_type = _check(compute_type)
    model = SenseVoiceSmall(dims, device="meta")
    if compute_type.startswith("int8"):
        rr = needs_reduce_range()
        for name in _linear_names(model):
            linear = model.get_submodule(name)
            _replace(model, name, Int8Linear(linear.in_features, linear.out_features, rr,
                                             device="meta"))
    _cast_parameters(model, FLOAT_DTYPES[compute_type])
    model.compute_type = compute_type
    return model
