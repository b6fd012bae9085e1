"""Model dimensions and frontend settings, read from the official config.yaml or our config.json.

The official FunASR ``config.yaml`` is a training config: most of it (data loading, optimiser,
augmentation, dropout) means nothing at inference. Those keys are listed below as known and
ignored; anything else is rejected with the file and key named, so that a config describing a
different architecture never loads silently into this one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import yaml

from sensevoice_core.errors import ConfigError

# 7 rows FunASR reserves (0 = auto language, 1 = event, 2 = emotion, ...) + 7 language rows
# + 2 text-norm rows; vocab.LANGUAGE_QUERY_ROW and vocab.TEXT_NORM_QUERY_ROW say which is which.
NUM_QUERY_EMBEDDINGS = 16


@dataclass(frozen=True)
class SenseVoiceDims:
    input_size: int = 560  # n_mels * lfr_m: one LFR frame stacks 7 fbank frames of 80 bins
    output_size: int = 512  # model width d
    attention_heads: int = 4
    linear_units: int = 2048  # feed-forward hidden width
    num_blocks: int = 50  # encoders0 (1 block, input_size -> d) + encoders (num_blocks - 1)
    tp_blocks: int = 20  # tp_encoders after after_norm
    kernel_size: int = 11  # FSMN memory block width
    sanm_shift: int = 0  # extra left context of the FSMN block (config.yaml spells it sanm_shfit)
    vocab_size: int = 25055
    num_query_embeddings: int = NUM_QUERY_EMBEDDINGS

    def __post_init__(self) -> None:
        if self.output_size % self.attention_heads:
            raise ValueError(
                f"output_size {self.output_size} is not divisible by "
                f"attention_heads {self.attention_heads}"
            )
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, found {self.num_blocks}")


@dataclass(frozen=True)
class FrontendConfig:
    sample_rate: int = 16000
    window: str = "hamming"
    n_mels: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    lfr_m: int = 7  # frames stacked into one low-frame-rate frame
    lfr_n: int = 6  # hop between LFR frames, in fbank frames (60 ms)

    @property
    def feature_size(self) -> int:
        return self.n_mels * self.lfr_m

    @property
    def feature_frame_s(self) -> float:
        """Seconds of audio per low-frame-rate feature frame (60 ms)."""
        return self.frame_shift_ms * self.lfr_n / 1000


# --- official config.yaml --------------------------------------------------------------------

_TOP_LEVEL_USED = {"encoder", "encoder_conf", "model", "model_conf", "frontend", "frontend_conf"}
_TOP_LEVEL_IGNORED = {
    "tokenizer", "tokenizer_conf", "dataset", "dataset_conf", "train_conf", "optim",
    "optim_conf", "scheduler", "scheduler_conf", "specaug", "specaug_conf", "ctc_conf",
    "normalize", "normalize_conf", "init_param", "input_size", "vocab_size",
}
_ENCODER_KEYS = {  # config.yaml name -> SenseVoiceDims field
    "output_size": "output_size",
    "attention_heads": "attention_heads",
    "linear_units": "linear_units",
    "num_blocks": "num_blocks",
    "tp_blocks": "tp_blocks",
    "kernel_size": "kernel_size",
    "sanm_shfit": "sanm_shift",
}
# Architecture switches: the only values this implementation computes.
_ENCODER_REQUIRED_VALUES: dict[str, Any] = {
    "input_layer": "pe",
    "pos_enc_class": "SinusoidalPositionEncoder",
    "normalize_before": True,
    "selfattention_layer_type": "sanm",
    "concat_after": False,
}
_ENCODER_IGNORED = {
    "dropout_rate", "positional_dropout_rate", "attention_dropout_rate",
    "stochastic_depth_rate", "positionwise_layer_type", "positionwise_conv_kernel_size",
    "padding_idx",
}
_MODEL_CONF_IGNORED = {
    "length_normalized_loss", "sos", "eos", "ignore_id", "blank_id", "lsm_weight",
}
_FRONTEND_KEYS = {
    "fs": "sample_rate",
    "window": "window",
    "n_mels": "n_mels",
    "frame_length": "frame_length_ms",
    "frame_shift": "frame_shift_ms",
    "lfr_m": "lfr_m",
    "lfr_n": "lfr_n",
}
_FRONTEND_IGNORED = {"cmvn_file", "dither", "filter_length_min", "filter_length_max"}
_FRONTEND_REQUIRED_VALUES: dict[str, Any] = {"snip_edges": True, "upsacle_samples": True}


def _read_mapping(path: Path, parse: Callable[[str], Any]) -> dict[str, Any]:
    try:
        raw = parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(path, f"cannot read config: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(path, "config is not a mapping", found=type(raw).__name__)
    return raw


def _check_keys(path: Path, section: str, found: dict[str, Any], known: set[str]) -> None:
    for key in found:
        if key not in known:
            raise ConfigError(
                path, f"unknown key {section}{key!r}", expected=f"one of {sorted(known)}"
            )


def _check_required_values(
    path: Path, section: str, found: dict[str, Any], required: dict[str, Any]
) -> None:
    for key, value in required.items():
        if key in found and found[key] != value:
            raise ConfigError(
                path,
                f"{section}{key} selects an architecture this implementation does not compute",
                expected=repr(value),
                found=repr(found[key]),
            )


def _section(path: Path, raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(path, f"{name} must be a mapping", found=type(value).__name__)
    return value


def read_config_yaml(path: Path, vocab_size: int) -> tuple[SenseVoiceDims, FrontendConfig]:
    """Read the official FunASR config.yaml; vocab_size comes from the tokenizer."""
    raw = _read_mapping(path, yaml.safe_load)
    _check_keys(path, "", raw, _TOP_LEVEL_USED | _TOP_LEVEL_IGNORED)
    for key, expected in (("model", "SenseVoiceSmall"), ("encoder", "SenseVoiceEncoderSmall")):
        if raw.get(key, expected) != expected:
            raise ConfigError(path, f"unsupported {key}", expected=expected, found=str(raw[key]))
    if raw.get("frontend", "WavFrontend") not in ("WavFrontend", "wav_frontend"):
        raise ConfigError(path, "unsupported frontend", expected="WavFrontend",
                          found=str(raw["frontend"]))

    encoder_conf = _section(path, raw, "encoder_conf")
    _check_keys(path, "encoder_conf.", encoder_conf,
                set(_ENCODER_KEYS) | set(_ENCODER_REQUIRED_VALUES) | _ENCODER_IGNORED)
    _check_required_values(path, "encoder_conf.", encoder_conf, _ENCODER_REQUIRED_VALUES)
    _check_keys(path, "model_conf.", _section(path, raw, "model_conf"), _MODEL_CONF_IGNORED)
    frontend_conf = _section(path, raw, "frontend_conf")
    _check_keys(path, "frontend_conf.", frontend_conf,
                set(_FRONTEND_KEYS) | _FRONTEND_IGNORED | set(_FRONTEND_REQUIRED_VALUES))
    _check_required_values(path, "frontend_conf.", frontend_conf, _FRONTEND_REQUIRED_VALUES)

    frontend_fields = {_FRONTEND_KEYS[k]: v for k, v in frontend_conf.items() if k in _FRONTEND_KEYS}
    frontend = _build(path, FrontendConfig, frontend_fields)
    dims_fields = {_ENCODER_KEYS[k]: v for k, v in encoder_conf.items() if k in _ENCODER_KEYS}
    dims = _build(path, SenseVoiceDims,
                  {**dims_fields, "input_size": frontend.feature_size, "vocab_size": vocab_size})
    return dims, frontend


# --- our config.json (HF-style layout) --------------------------------------------------------

MODEL_TYPE = "sensevoice_small"
_JSON_IGNORED = {  # written by transformers' save_pretrained
    "model_type", "architectures", "transformers_version", "torch_dtype", "dtype",
    "tokenizer_file", "cmvn_file", "output_attentions", "output_hidden_states",
    "return_dict", "use_return_dict", "tie_word_embeddings", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "_name_or_path",
}


def dims_field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(SenseVoiceDims)}


def frontend_field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(FrontendConfig)}


def read_config_json(path: Path) -> tuple[SenseVoiceDims, FrontendConfig, dict[str, Any]]:
    """Read config.json of the HF-style layout. Returns dims, frontend and the raw mapping."""
    raw = _read_mapping(path, json.loads)
    if raw.get("model_type") != MODEL_TYPE:
        raise ConfigError(path, "wrong model_type", expected=MODEL_TYPE,
                          found=str(raw.get("model_type")))
    dims_keys, frontend_keys = dims_field_names(), frontend_field_names()
    frontend_section = _section(path, raw, "frontend")
    _check_keys(path, "", raw, dims_keys | {"frontend"} | _JSON_IGNORED)
    _check_keys(path, "frontend.", frontend_section, frontend_keys)
    dims = _build(path, SenseVoiceDims, {k: v for k, v in raw.items() if k in dims_keys})
    frontend = _build(path, FrontendConfig, frontend_section)
    if frontend.feature_size != dims.input_size:
        raise ConfigError(path, "frontend n_mels * lfr_m does not match input_size",
                          expected=str(dims.input_size), found=str(frontend.feature_size))
    return dims, frontend, raw


def config_json_fields(dims: SenseVoiceDims, frontend: FrontendConfig) -> dict[str, Any]:
    return {**dataclasses.asdict(dims), "frontend": dataclasses.asdict(frontend)}


def _build(path: Path, cls: type, fields: dict[str, Any]) -> Any:
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(path, f"invalid {cls.__name__}: {e}") from e
