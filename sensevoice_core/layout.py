"""The two layouts of a model directory: which files each holds, by name, and which one a
directory is. No torch here: the supervisor's file watcher and the model-path search read it.

  official  the FunASR release: model.pt (a pickled state_dict, read with weights_only=True),
            config.yaml, am.mvn and chn_jpn_yue_eng_ko_spectok.bpe.model
  hf        what ``python -m sensevoice_core convert`` and ``save_pretrained`` write:
            config.json, model.safetensors, tokenizer.model and am.mvn
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sensevoice_core.errors import ModelFileError

OFFICIAL_WEIGHTS = "model.pt"
OFFICIAL_CONFIG = "config.yaml"
OFFICIAL_TOKENIZER = "chn_jpn_yue_eng_ko_spectok.bpe.model"
OFFICIAL_CONFIGURATION = "configuration.json"  # optional; may name another tokenizer file
HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
HF_TOKENIZER = "tokenizer.model"
CMVN_FILE = "am.mvn"  # both layouts

# Every file a load reads, in either layout (with the release's tokenizer name).
MODEL_FILE_NAMES = frozenset({OFFICIAL_WEIGHTS, OFFICIAL_CONFIG, OFFICIAL_TOKENIZER,
                              HF_WEIGHTS, HF_CONFIG, HF_TOKENIZER, CMVN_FILE})


@dataclass(frozen=True)
class ModelFiles:
    layout: str  # "official" or "hf"
    directory: Path
    weights: Path
    config: Path
    tokenizer: Path
    cmvn: Path


def _official_tokenizer_name(directory: Path) -> str:
    """configuration.json may name the tokenizer file; otherwise the release's own name."""
    configuration = directory / OFFICIAL_CONFIGURATION
    if configuration.is_file():
        try:
            metas = json.loads(configuration.read_text(encoding="utf-8"))["file_path_metas"]
            name = metas["tokenizer_conf"]["bpemodel"]
            if isinstance(name, str) and name and Path(name).name == name:
                return name
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a malformed configuration.json does not matter: the default name follows
    return OFFICIAL_TOKENIZER


def model_files(model_dir: Path | str) -> ModelFiles:
    """Identify the layout of a model directory and check that every file it needs exists."""
    directory = Path(model_dir).expanduser()
    if not directory.is_dir():
        raise ModelFileError(directory, "model directory does not exist",
                             expected=f"a directory with {OFFICIAL_WEIGHTS} + {OFFICIAL_CONFIG} "
                                      f"(FunASR release) or {HF_CONFIG} + {HF_WEIGHTS}")
    if (directory / HF_CONFIG).is_file() or (directory / HF_WEIGHTS).is_file():
        files = ModelFiles("hf", directory, directory / HF_WEIGHTS, directory / HF_CONFIG,
                           directory / HF_TOKENIZER, directory / CMVN_FILE)
    elif (directory / OFFICIAL_WEIGHTS).is_file() or (directory / OFFICIAL_CONFIG).is_file():
        files = ModelFiles("official", directory, directory / OFFICIAL_WEIGHTS,
                           directory / OFFICIAL_CONFIG,
                           directory / _official_tokenizer_name(directory),
                           directory / CMVN_FILE)
    else:
        try:
            present = sorted(p.name for p in directory.iterdir())[:10]
        except OSError as e:
            raise ModelFileError(directory, f"cannot list model directory: {e.strerror}") from e
        raise ModelFileError(directory, "not a SenseVoice model directory",
                             expected=f"{OFFICIAL_WEIGHTS} + {OFFICIAL_CONFIG} or "
                                      f"{HF_CONFIG} + {HF_WEIGHTS}",
                             found=", ".join(present) or "an empty directory")
    for role in ("weights", "config", "tokenizer", "cmvn"):
        path: Path = getattr(files, role)
        if not path.is_file():
            raise ModelFileError(path, f"missing {role} file of the {files.layout} layout",
                                 expected=path.name, found="no such file")
    return files
