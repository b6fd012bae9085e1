"""transformers integration: SenseVoiceConfig + SenseVoiceForCTC, and the official -> HF converter.

``SenseVoiceForCTC.from_pretrained(dir, local_files_only=True)`` reads config.json and
model.safetensors with our own classes (imported from this package, never from the model
directory, so no ``trust_remote_code``). Parameter names are the official ones. This module
imports transformers, which is slow to import; the runtime loader does not need it.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import logging as transformers_logging

from sensevoice_core.atomic import staged_directory
from sensevoice_core.config import MODEL_TYPE, FrontendConfig, SenseVoiceDims
from sensevoice_core.errors import ModelFileError
from sensevoice_core.layout import CMVN_FILE, HF_TOKENIZER, model_files
from sensevoice_core.loader import build_model, read_dims, read_weights
from sensevoice_core.model import build_layers, prompted_logits
from sensevoice_core.tokenizer import Tokenizer


class SenseVoiceConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(
        self,
        dims: SenseVoiceDims | None = None,
        frontend: FrontendConfig | dict | None = None,
        **kwargs: object,  # transformers passes its own bookkeeping keys through here
    ):
        dims = dims or SenseVoiceDims()
        dim_names = {f.name for f in dataclasses.fields(SenseVoiceDims)}
        # from_pretrained hands the saved dims back as loose keys; they take precedence.
        loose = {k: kwargs.pop(k) for k in list(kwargs) if k in dim_names}
        dims = dataclasses.replace(dims, **loose)
        for name, value in dataclasses.asdict(dims).items():
            setattr(self, name, value)
        if isinstance(frontend, FrontendConfig):
            frontend = dataclasses.asdict(frontend)
        self.frontend = dict(frontend or dataclasses.asdict(FrontendConfig()))
        super().__init__(**kwargs)

    def to_dims(self) -> SenseVoiceDims:
        return SenseVoiceDims(**{f.name: getattr(self, f.name)
                                 for f in dataclasses.fields(SenseVoiceDims)})


class SenseVoiceForCTC(PreTrainedModel):
    config_class = SenseVoiceConfig
    base_model_prefix = "sensevoice"
    main_input_name = "input_features"

    def __init__(self, config: SenseVoiceConfig):
        super().__init__(config)
        self.encoder, self.ctc, self.embed = build_layers(config.to_dims())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights always come from a checkpoint; keep PyTorch's default init otherwise."""

    def forward(
        self,
        input_features: Tensor,
        feature_lengths: Tensor,
        language_rows: Tensor,
        text_norm_rows: Tensor,
    ) -> tuple[Tensor, Tensor]:
        return prompted_logits(self.encoder, self.ctc, self.embed, input_features,
                               feature_lengths, language_rows, text_norm_rows)


def convert_official_to_hf(source_dir: Path | str, target_dir: Path | str) -> Path:
    """Write an HF-style copy of an official FunASR model directory. The source is only read.

    The target is assembled in a temporary sibling directory and renamed into place, so a
    failed conversion never leaves a half-written model behind.
    """
    transformers_logging.disable_progress_bar()
    files = model_files(source_dir)
    if files.layout != "official":
        raise ModelFileError(files.directory, "not an official FunASR layout",
                             expected="model.pt + config.yaml", found=f"{files.layout} layout")
    target = Path(target_dir).expanduser()
    if target.exists() and any(target.iterdir()):
        raise ModelFileError(target, "target directory is not empty", expected="a new directory")
    tokenizer = Tokenizer.from_file(files.tokenizer)
    dims, frontend = read_dims(files, tokenizer)
    core = build_model(files.weights, dims, read_weights(files))  # strict checks happen here
    hf_model = SenseVoiceForCTC(SenseVoiceConfig(dims=dims, frontend=frontend))
    hf_model.load_state_dict(core.state_dict(), strict=True)
    with staged_directory(target) as staging:
        hf_model.save_pretrained(staging, safe_serialization=True)
        shutil.copyfile(files.tokenizer, staging / HF_TOKENIZER)
        shutil.copyfile(files.cmvn, staging / CMVN_FILE)
    return target
