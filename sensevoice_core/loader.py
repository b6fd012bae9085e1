"""Load a model directory in either layout (layout.py) into a ready SenseVoice, and write one.

``load_model_dir`` reads the files directly; ``sensevoice_core.load_model`` goes through the
cache (cache.py), which calls it on a miss. Nothing from a model directory is ever imported or
executed.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from sensevoice_core.atomic import staged_directory
from sensevoice_core.config import (
    MODEL_TYPE,
    FrontendConfig,
    SenseVoiceDims,
    config_json_fields,
    read_config_json,
    read_config_yaml,
)
from sensevoice_core.errors import CheckpointMismatchError, ModelFileError
from sensevoice_core.frontend import CMVN
from sensevoice_core.layout import CMVN_FILE, HF_CONFIG, HF_TOKENIZER, HF_WEIGHTS, ModelFiles, model_files
from sensevoice_core.model import SenseVoiceSmall
from sensevoice_core.pipeline import SenseVoice
from sensevoice_core.tokenizer import Tokenizer

def check_state_dict(path: Path, state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise CheckpointMismatchError listing every missing, unexpected or mis-shaped tensor."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state_dict.items()}
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    mismatched = [(key, expected[key], found[key]) for key in expected
                  if key in found and expected[key] != found[key]]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(path, missing, unexpected, mismatched)


def read_weights(files: ModelFiles) -> dict[str, torch.Tensor]:
    try:
        if files.layout == "official":
            state_dict = torch.load(files.weights, map_location="cpu", weights_only=True)
        else:
            state_dict = load_safetensors(files.weights)
    except (OSError, RuntimeError, SafetensorError, ValueError, EOFError,
            pickle.UnpicklingError) as e:
        # weights_only=True refuses any pickle that would construct objects or run code.
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(files.weights, f"cannot read weights: {first_line}") from e
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise ModelFileError(files.weights, "weights file is not a state_dict",
                             expected="a mapping of names to tensors",
                             found=type(state_dict).__name__)
    return {key: value.float() for key, value in state_dict.items()}


def read_dims(files: ModelFiles, tokenizer: Tokenizer) -> tuple[SenseVoiceDims, FrontendConfig]:
    if files.layout == "official":
        return read_config_yaml(files.config, vocab_size=tokenizer.vocab_size)
    dims, frontend, _ = read_config_json(files.config)
    if dims.vocab_size != tokenizer.vocab_size:
        raise ModelFileError(files.tokenizer, "tokenizer does not match config.json vocab_size",
                             expected=f"{dims.vocab_size} pieces",
                             found=f"{tokenizer.vocab_size}")
    return dims, frontend


def adopt_tensors(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """What ``load_state_dict(strict=True, assign=True)`` does for a checked state dict, minus
    its per-module hook machinery (a third of an L2 load at full size): each tensor becomes
    the parameter or buffer itself, without a copy. Call check_state_dict first."""
    modules = dict(model.named_modules())
    for key, tensor in state_dict.items():
        module_name, _, name = key.rpartition(".")
        module = modules[module_name]
        if name in module._parameters:
            setattr(module, name, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            module.register_buffer(name, tensor)


def build_model(
    path: Path, dims: SenseVoiceDims, state_dict: Mapping[str, torch.Tensor]
) -> SenseVoiceSmall:
    """Construct on the meta device (no memory, no init), check strictly, adopt the tensors.

    path names the weights file in errors.
    """
    model = SenseVoiceSmall(dims, device="meta")
    check_state_dict(path, state_dict, model)
    adopt_tensors(model, state_dict)
    return model.eval()


def load_model_dir(model_dir: Path | str, device: str = "cpu") -> SenseVoice:
    """Load a model directory of either layout straight from its files, without the cache."""
    files = model_files(model_dir)
    tokenizer = Tokenizer.from_file(files.tokenizer)
    dims, frontend = read_dims(files, tokenizer)
    cmvn = CMVN.from_kaldi_nnet(files.cmvn)
    if cmvn.shift.numel() != dims.input_size:
        raise ModelFileError(files.cmvn, "CMVN size does not match the features",
                             expected=f"{dims.input_size} values (n_mels * lfr_m)",
                             found=f"{cmvn.shift.numel()}")
    model = build_model(files.weights, dims, read_weights(files))
    if torch.device(device) != torch.device("cpu"):
        model = model.to(device)
    return SenseVoice(model=model, tokenizer=tokenizer, cmvn=cmvn, frontend=frontend,
                      model_dir=files.directory.resolve(), layout=files.layout)


def save_model_dir(
    target_dir: Path | str,
    model: SenseVoiceSmall,
    frontend: FrontendConfig,
    tokenizer_file: Path,
    cmvn: CMVN,
) -> Path:
    """Write the hf layout (what SenseVoiceForCTC.from_pretrained reads), atomically.

    An existing hf-layout target is replaced only once the new directory is complete.
    """
    target = Path(target_dir).expanduser()
    if target.is_dir() and any(target.iterdir()) and not (target / HF_CONFIG).is_file():
        raise ModelFileError(target, "refusing to replace a directory that is not a model",
                             expected="a new directory or an hf-layout model directory",
                             found="other files")
    with staged_directory(target, replace=True) as staging:
        config = {"architectures": ["SenseVoiceForCTC"], "model_type": MODEL_TYPE,
                  **config_json_fields(model.dims, frontend)}
        (staging / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        tensors = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
        save_safetensors(tensors, staging / HF_WEIGHTS, metadata={"format": "pt"})
        shutil.copyfile(tokenizer_file, staging / HF_TOKENIZER)
        (staging / CMVN_FILE).write_text(cmvn.to_text(), encoding="utf-8")
    return target


def __getattr__(name: str) -> Any:
    """``from sensevoice_core.loader import hot_reload_model`` (the service's reload, asked of
    a running supervisor) keeps working without the loader importing the ZeroMQ client."""
    if name == "hot_reload_model":
        from sensevoice_core.client import hot_reload_model

        return hot_reload_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
