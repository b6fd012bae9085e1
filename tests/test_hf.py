"""transformers integration: from_pretrained/save_pretrained, the converter, no remote code."""

import json
import shutil

import pytest
import torch

from model_factory import one_pass
from sensevoice_core import TranscribeOptions
from sensevoice_core.errors import ModelFileError
from sensevoice_core.hf import SenseVoiceForCTC, convert_official_to_hf
from sensevoice_core.loader import load_model_dir


def test_from_pretrained_loads_our_hf_layout(hf_dir):
    hf_model = SenseVoiceForCTC.from_pretrained(hf_dir, local_files_only=True)
    ours = load_model_dir(hf_dir)
    assert hf_model.config.to_dims() == ours.model.dims
    for key, value in ours.model.state_dict().items():
        assert torch.equal(value, hf_model.state_dict()[key]), key


def test_save_pretrained_output_loads_with_our_loader(hf_dir, tmp_path, data_dir):
    hf_model = SenseVoiceForCTC.from_pretrained(hf_dir, local_files_only=True)
    target = tmp_path / "saved"
    hf_model.save_pretrained(target)
    for name in ("tokenizer.model", "am.mvn"):
        shutil.copyfile(hf_dir / name, target / name)
    assert one_pass(load_model_dir(target), data_dir / "zh.mp3") == \
        one_pass(load_model_dir(hf_dir), data_dir / "zh.mp3")


def test_convert_round_trip_gives_identical_outputs(official_dir, tmp_path, data_dir):
    target = convert_official_to_hf(official_dir, tmp_path / "converted")
    assert sorted(p.name for p in target.iterdir()) == [
        "am.mvn", "config.json", "model.safetensors", "tokenizer.model"]
    original, converted = load_model_dir(official_dir), load_model_dir(target)
    clips = [data_dir / f"{name}.mp3" for name in ("en", "zh", "ko")]
    for language in ("auto", "en"):
        assert one_pass(original, *clips, language=language) == \
            one_pass(converted, *clips, language=language)
    features = [torch.randn(30, 560)]
    a, _ = original.logits(features, TranscribeOptions())
    b, _ = converted.logits(features, TranscribeOptions())
    assert torch.equal(a, b)


def test_convert_refuses_a_non_empty_target_and_writes_nothing(official_dir, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ModelFileError, match="not empty"):
        convert_official_to_hf(official_dir, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no staging left behind


def test_code_in_a_model_directory_is_never_executed(hf_dir, tmp_path):
    directory = tmp_path / "hostile"
    shutil.copytree(hf_dir, directory)
    marker = tmp_path / "executed"
    (directory / "modeling_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n", encoding="utf-8")
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ModelFileError, match="auto_map"):
        load_model_dir(directory)  # an unknown key in config.json is refused outright
    SenseVoiceForCTC.from_pretrained(directory, local_files_only=True)
    assert not marker.exists()
