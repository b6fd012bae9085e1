"""Reading config.yaml (official) and config.json (hf layout): known keys, rejected keys."""

import json
from pathlib import Path

import pytest
import yaml

from sensevoice_core.errors import ConfigError
from sensevoice_core.config import FrontendConfig, SenseVoiceDims, read_config_json, read_config_yaml
from sensevoice_core.model import SenseVoiceSmall

OFFICIAL_VOCAB_SIZE = 25055
OFFICIAL_PARAMETERS = 233_999_167


def official_config(data_dir: Path) -> dict:
    return yaml.safe_load((data_dir / "official" / "config.yaml").read_text(encoding="utf-8"))


def write_yaml(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_official_config_gives_the_full_size_model(data_dir):
    dims, frontend = read_config_yaml(data_dir / "official" / "config.yaml", OFFICIAL_VOCAB_SIZE)
    assert dims == SenseVoiceDims(input_size=560, output_size=512, attention_heads=4,
                                  linear_units=2048, num_blocks=50, tp_blocks=20, kernel_size=11,
                                  sanm_shift=0, vocab_size=OFFICIAL_VOCAB_SIZE)
    assert frontend == FrontendConfig(sample_rate=16000, window="hamming", n_mels=80,
                                      frame_length_ms=25, frame_shift_ms=10, lfr_m=7, lfr_n=6)
    model = SenseVoiceSmall(dims, device="meta")
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETERS


def test_sanm_shfit_is_mapped_to_sanm_shift(data_dir, tmp_path):
    config = official_config(data_dir)
    config["encoder_conf"]["sanm_shfit"] = 3
    dims, _ = read_config_yaml(write_yaml(tmp_path, config), 100)
    assert dims.sanm_shift == 3


@pytest.mark.parametrize("section, key", [
    (None, "surprise_key"),
    ("encoder_conf", "use_rope"),
    ("frontend_conf", "preemphasis"),
    ("model_conf", "ctc_weight_typo"),
])
def test_unknown_keys_are_rejected_naming_file_and_key(data_dir, tmp_path, section, key):
    config = official_config(data_dir)
    (config if section is None else config[section])[key] = 1
    path = write_yaml(tmp_path, config)
    with pytest.raises(ConfigError) as error:
        read_config_yaml(path, 100)
    assert str(path) in str(error.value) and key in str(error.value)


def test_known_training_keys_are_ignored(data_dir, tmp_path):
    config = official_config(data_dir)
    config["train_conf"]["max_epoch"] = 999
    config["encoder_conf"]["dropout_rate"] = 0.5
    read_config_yaml(write_yaml(tmp_path, config), 100)


@pytest.mark.parametrize("key, value", [
    ("normalize_before", False), ("selfattention_layer_type", "rel_selfattn"),
    ("input_layer", "conv2d"),
])
def test_architecture_switches_we_do_not_compute_are_rejected(data_dir, tmp_path, key, value):
    config = official_config(data_dir)
    config["encoder_conf"][key] = value
    with pytest.raises(ConfigError) as error:
        read_config_yaml(write_yaml(tmp_path, config), 100)
    message = str(error.value)
    assert key in message and "expected" in message and repr(value) in message


def test_other_model_classes_are_rejected(data_dir, tmp_path):
    config = official_config(data_dir)
    config["encoder"] = "SANMEncoder"
    with pytest.raises(ConfigError, match="SenseVoiceEncoderSmall.*SANMEncoder"):
        read_config_yaml(write_yaml(tmp_path, config), 100)


def test_unreadable_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("encoder_conf: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot read config"):
        read_config_yaml(path, 100)
    path.write_text("- just a list\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not a mapping"):
        read_config_yaml(path, 100)


def test_config_json_round_trip_and_rejections(hf_dir, tmp_path):
    dims, frontend, raw = read_config_json(hf_dir / "config.json")
    assert dims.output_size == 64 and frontend == FrontendConfig()
    for change, expected_text in [({"model_type": "whisper"}, "model_type"),
                                  ({"hidden_act": "gelu"}, "hidden_act"),
                                  ({"output_size": 63}, "divisible"),
                                  ({"frontend": {"lfr_m": 5}}, "does not match input_size"),
                                  ({"frontend": [1]}, "frontend must be a mapping")]:
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**raw, **change}), encoding="utf-8")
        with pytest.raises(ConfigError, match=expected_text):
            read_config_json(path)
