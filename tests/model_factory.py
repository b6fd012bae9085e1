"""Tiny random SenseVoice models on disk, in both layouts, built from the real official files."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
import yaml

from sensevoice_core.audio import load_audio
from sensevoice_core.frontend import CMVN
from sensevoice_core.options import TranscribeOptions
from sensevoice_core.pipeline import SenseVoice
from sensevoice_core.layout import OFFICIAL_TOKENIZER
from sensevoice_core.random_model import random_model, small_dims, small_tokenizer_bytes, write_random_model

DATA = Path(__file__).parent / "data"
OFFICIAL_REFERENCE = DATA / "official"  # the real config.yaml, am.mvn, configuration.json


def one_pass(model: SenseVoice, *clips: Path, language: str = "auto") -> list:
    """The model's own output on whole clips, without the VAD: what tells two tiny random
    models apart (transcribe drops their output, which starts with <|nospeech|>)."""
    return model.decode([load_audio(clip) for clip in clips], TranscribeOptions(language=language))


def tiny_encoder_conf() -> dict[str, int]:
    dims = dataclasses.asdict(small_dims())
    conf = {key: dims[key] for key in ("output_size", "attention_heads", "linear_units",
                                      "num_blocks", "tp_blocks", "kernel_size")}
    return {**conf, "sanm_shfit": dims["sanm_shift"]}


def write_official(directory: Path, seed: int = 0) -> Path:
    """The FunASR release layout: the real config.yaml with tiny encoder sizes, the real am.mvn."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / OFFICIAL_TOKENIZER).write_bytes(small_tokenizer_bytes())
    config = yaml.safe_load((OFFICIAL_REFERENCE / "config.yaml").read_text(encoding="utf-8"))
    config["encoder_conf"].update(tiny_encoder_conf())
    (directory / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    for name in ("am.mvn", "configuration.json"):
        shutil.copyfile(OFFICIAL_REFERENCE / name, directory / name)
    torch.save(random_model(small_dims(), seed).state_dict(), directory / "model.pt")
    return directory


def write_hf(directory: Path, seed: int = 0) -> Path:
    """The hf layout (config.json + model.safetensors + tokenizer.model + am.mvn)."""
    return write_random_model(directory, seed, CMVN.from_kaldi_nnet(OFFICIAL_REFERENCE / "am.mvn"))


DEMO_MODEL = Path(__file__).resolve().parent.parent / "model"


def copy_demo_model(directory: Path) -> Path:
    """A writable copy of the embedded demo model (it really transcribes the example clips)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.model", "am.mvn"):
        (directory / name).write_bytes((DEMO_MODEL / name).read_bytes())
    return directory


def nudge_weights(model_dir: Path, amount: float = 1e-4) -> None:
    """Change the weights slightly (new fingerprint, same transcriptions); atomic replace."""
    from safetensors.numpy import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    name = next(key for key in sorted(tensors) if key.endswith(".bias"))
    tensors[name] = tensors[name] + amount
    temporary = path.with_suffix(".tmp")
    save_file(tensors, str(temporary))
    temporary.replace(path)
