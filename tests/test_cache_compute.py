"""The accuracy gate on its bundled clip, the int8 kernel probe, and what a converted snapshot
records about the gate and the machine (cache_compute.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import soundfile as sf
import torch
from model_factory import copy_demo_model

from sensevoice_core.cache import load_sensevoice_cached
from sensevoice_core.compute_check import GATE_CLIP, check_against_float32
from sensevoice_core.convert import convert_model
from sensevoice_core.int8 import Int8Linear, int8_layers, needs_reduce_range
from sensevoice_core.loader import load_model_dir
from sensevoice_core.random_model import random_model, small_dims
from sensevoice_core.settings import Settings
from sensevoice_core.snapshot import _header_bytes, read_header


@pytest.fixture(scope="module")
def demo() -> object:
    return load_model_dir(Path(__file__).parents[1] / "model")


def test_the_gate_clip_is_ten_seconds_of_speech():
    info = sf.info(str(GATE_CLIP))
    assert (info.samplerate, info.channels) == (16000, 1) and 9.5 <= info.duration <= 20


def test_the_probe_finds_the_kernel_that_does_not_saturate():
    """An all-ones 512-wide layer must give 512 with the probe's choice; without VNNI the
    8-bit kernel saturates (the AVX-VNNI-without-AVX-512 case of review finding 1)."""
    layer = Int8Linear(512, 1, reduce_range=needs_reduce_range())
    layer.weight = torch.full((1, 512), 127, dtype=torch.int8)
    layer.weight_scale, layer.bias = torch.full((1,), 1 / 127), torch.zeros(1)
    assert abs(float(layer(torch.ones(1, 512))) - 512) < 10  # 7-bit rounding: 516
    layer._packed, layer.reduce_range = None, not needs_reduce_range()
    if needs_reduce_range():  # this CPU saturates 8-bit activations
        assert abs(float(layer(torch.ones(1, 512))) - 512) > 100
    converted = convert_model(random_model(small_dims()), "int8")
    assert {layer.reduce_range for layer in int8_layers(converted)} == {needs_reduce_range()}


@pytest.mark.parametrize("compute_type", ["int8", "bfloat16", "float16"])
def test_a_correct_conversion_of_the_demo_model_passes_the_gate(demo, compute_type):
    result = check_against_float32(demo, convert_model(demo.model, compute_type))
    assert result.passed, result.describe()
    assert result.frames > 150 and result.compute_type == compute_type


def test_the_saturating_int8_kernel_fails_the_gate(demo):
    """Its end-to-end argmax on the demo model is unchanged (wide margins); the per-layer
    error catches it."""
    if not needs_reduce_range():
        pytest.skip("this CPU's int8 kernel does not saturate")
    broken = convert_model(demo.model, "int8")
    for layer in int8_layers(broken):
        layer.reduce_range = False
    result = check_against_float32(demo, broken)
    assert not result.passed and "int8 layer" in result.describe(), result.describe()


def test_a_candidate_that_raises_fails_the_gate_instead_of_the_load(demo):
    broken = convert_model(demo.model, "int8")
    broken.ctc.ctc_lo.weight = broken.ctc.ctc_lo.weight[:, :7]  # a corrupt conversion
    broken.ctc.ctc_lo._packed = None
    result = check_against_float32(demo, broken)
    assert not result.passed and "raised" in result.describe()


def test_a_nan_row_in_an_int8_call_hurts_only_itself():
    """Huge audio (1e30 samples) makes NaN features; batched with others they must stay
    the others' own (review finding 9)."""
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 16), reduce_range=True)
    rows = torch.randn(4, 64)
    alone = layer(rows[1:])
    for bad in (float("nan"), float("inf"), float("-inf")):
        rows[0, 0] = bad
        out = layer(rows)
        assert torch.isnan(out[0]).all() and torch.equal(out[1:], alone)
        rows[0, 0] = 1.0
        rows[0, 5] = bad  # not only the first element
        assert torch.isnan(layer(rows)[0]).all()
        rows[0, 5] = 1.0


@pytest.mark.parametrize("compute_type", ["bfloat16", "float16"])
def test_logits_of_a_float_type_are_float32_not_rounded(compute_type):
    model = convert_model(random_model(small_dims(), seed=2), compute_type)
    assert model.ctc.ctc_lo.weight.dtype == torch.float32
    rows = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        logits, _ = model(torch.randn(1, 30, 560), torch.tensor([30]), rows, rows)
    assert logits.dtype == torch.float32
    assert not torch.equal(logits, logits.to(torch.bfloat16).float())


def test_an_int8_snapshot_built_with_other_int8_numerics_is_rebuilt_and_checked(tmp_path):
    """A cache built on another machine (other reduce_range) or with the check off is a miss:
    this process checks and builds its own (review findings 2 and 7)."""
    directory = copy_demo_model(tmp_path / "demo")
    settings = Settings(cache_dir=tmp_path / "cache", compute_type="int8", compute_check=True)
    _, first = load_sensevoice_cached(directory, settings=settings)
    assert first.compute_type == "int8" and "compute_check" in first.steps_s
    entries, metadata, start = read_header(first.snapshot)
    assert metadata["compute_checked"] == "true"
    assert metadata["int8_reduce_range"] == str(needs_reduce_range()).lower()
    data, data_sha256 = first.snapshot.read_bytes()[start:], metadata["data_sha256"]
    other = {k: v for k, v in metadata.items() if k not in ("data_sha256", "header_sha256")}
    other["int8_reduce_range"] = str(not needs_reduce_range()).lower()  # another machine's
    first.snapshot.chmod(0o644)
    first.snapshot.write_bytes(_header_bytes(entries, other, data_sha256) + data)
    model, again = load_sensevoice_cached(directory, settings=settings)
    assert again.level == "fresh" and "compute_check" in again.steps_s
    assert any("int8_reduce_range" in w for w in again.warnings), again.warnings
    _, third = load_sensevoice_cached(directory, settings=settings)
    assert third.level == "L2" and third.compute_type == "int8"
    assert "prepack" in third.steps_s and dataclasses.is_dataclass(third)
    assert all(layer._packed is not None for layer in int8_layers(model.model))
