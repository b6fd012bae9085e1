"""Loading both layouts strictly and safely; every bad file is named."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from sensevoice_core import TranscribeOptions
from sensevoice_core.errors import CheckpointMismatchError, ModelFileError
from sensevoice_core.layout import OFFICIAL_TOKENIZER
from sensevoice_core.loader import load_model_dir


def copy_model(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


def test_both_layouts_load_the_same_weights(official_dir, hf_dir, data_dir):
    official, hf = load_model_dir(official_dir), load_model_dir(hf_dir)
    assert (official.layout, hf.layout) == ("official", "hf")
    assert official.model.dims == hf.model.dims
    for key, value in official.model.state_dict().items():
        assert torch.equal(value, hf.model.state_dict()[key]), key
    assert official.transcribe(data_dir / "en.mp3") == hf.transcribe(data_dir / "en.mp3")


def test_loaded_model_is_in_eval_mode_with_float32_weights(official_dir):
    model = load_model_dir(official_dir).model
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("layout, name", [
    ("official", "model.pt"), ("official", "config.yaml"), ("official", "am.mvn"),
    ("official", OFFICIAL_TOKENIZER), ("hf", "model.safetensors"), ("hf", "tokenizer.model"),
    ("hf", "am.mvn"),
])
def test_a_missing_file_is_named(official_dir, hf_dir, tmp_path, layout, name):
    directory = copy_model(official_dir if layout == "official" else hf_dir, tmp_path)
    (directory / name).unlink()
    with pytest.raises(ModelFileError) as error:
        load_model_dir(directory)
    assert name in str(error.value) and "missing" in str(error.value)


def test_a_directory_without_a_model_lists_what_it_found(tmp_path):
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(ModelFileError, match="not a SenseVoice model directory.*notes.txt"):
        load_model_dir(tmp_path)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model_dir(tmp_path / "nope")


def test_checkpoint_mismatch_reports_every_offending_key(official_dir, tmp_path):
    directory = copy_model(official_dir, tmp_path)
    state_dict = torch.load(directory / "model.pt", weights_only=True)
    del state_dict["encoder.after_norm.bias"]
    state_dict["encoder.extra_layer.weight"] = torch.zeros(3)
    state_dict["encoder.encoders.0.feed_forward.w_1.weight"] = torch.zeros(95, 64)
    torch.save(state_dict, directory / "model.pt")
    with pytest.raises(CheckpointMismatchError) as error:
        load_model_dir(directory)
    message = str(error.value)
    assert str(directory / "model.pt") in message
    assert "missing key: encoder.after_norm.bias" in message
    assert "unexpected key: encoder.extra_layer.weight" in message
    assert "encoder.encoders.0.feed_forward.w_1.weight: expected (96, 64) found (95, 64)" in message


def test_a_tokenizer_that_does_not_fit_the_checkpoint_is_named(official_dir, hf_dir, tmp_path):
    directory = copy_model(official_dir, tmp_path)
    from sensevoice_core.tokenizer import all_tag_pieces, build_sentencepiece_model
    (directory / OFFICIAL_TOKENIZER).write_bytes(build_sentencepiece_model(["a", "b"],
                                                                          all_tag_pieces()))
    with pytest.raises(CheckpointMismatchError, match=r"ctc.ctc_lo.weight: expected \(33, 64\)"):
        load_model_dir(directory)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_model_pt_is_loaded_without_executing_pickled_code(official_dir, tmp_path):
    directory = copy_model(official_dir, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"payload": _RunsCodeWhenUnpickled(marker)}, directory / "model.pt")
    with pytest.raises(ModelFileError, match="cannot read weights"):
        load_model_dir(directory)
    assert not marker.exists()


def test_corrupt_weights_are_named(official_dir, hf_dir, tmp_path):
    for source, name in ((official_dir, "model.pt"), (hf_dir, "model.safetensors")):
        directory = copy_model(source, tmp_path / source.name)
        (directory / name).write_bytes(b"\x00garbage" * 10)
        with pytest.raises(ModelFileError, match=f"{name}: cannot read weights"):
            load_model_dir(directory)


def test_half_precision_checkpoints_load_as_float32(official_dir, tmp_path):
    directory = copy_model(official_dir, tmp_path)
    state_dict = torch.load(directory / "model.pt", weights_only=True)
    torch.save({k: v.half() for k, v in state_dict.items()}, directory / "model.pt")
    assert {p.dtype for p in load_model_dir(directory).model.parameters()} == {torch.float32}


def test_cmvn_of_the_wrong_size_is_rejected(official_dir, tmp_path):
    directory = copy_model(official_dir, tmp_path)
    text = (directory / "am.mvn").read_text(encoding="utf-8").replace("560 560", "80 80")
    lines = text.splitlines()
    lines = [" ".join(line.split()[:3] + line.split()[3:83] + ["]"])
             if line.startswith("<LearnRateCoef>") else line for line in lines]
    (directory / "am.mvn").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ModelFileError, match=r"am.mvn: CMVN size.*expected 560.*found 80"):
        load_model_dir(directory)
    (directory / "am.mvn").write_text("not a cmvn file\n", encoding="utf-8")
    with pytest.raises(ModelFileError, match="am.mvn: not a Kaldi nnet CMVN file"):
        load_model_dir(directory)


def test_unknown_language_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown language 'xx'.*auto, zh, en, yue, ja, ko"):
        TranscribeOptions(language="xx")
    assert TranscribeOptions(language="EN".lower()).language.value == "en"
