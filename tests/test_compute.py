"""Compute types: the choice per machine, the int8 layer, converted L2 snapshots, the accuracy
gate, and the demo model's held-out set in every type this machine runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_factory import copy_demo_model, write_hf

from sensevoice_core.cache import load_sensevoice_cached
from sensevoice_core.compute import (
    MachineFeatures,
    UnsupportedComputeType,
    choose_compute_type,
    choose_for,
    machine_features,
    read_cpu_flags,
    served_fingerprint,
)
from sensevoice_core.compute_check import check_against_float32
from sensevoice_core.convert import convert_model
from sensevoice_core.int8 import Int8Linear
from sensevoice_core.loader import load_model_dir
from sensevoice_core.path_cache import PathCache
from sensevoice_core.random_model import random_model, small_dims
from sensevoice_core.settings import Settings
from sensevoice_core.snapshot import read_header

AVX2 = MachineFeatures(frozenset({"avx2"}))
EVAL_DIR = Path(__file__).parent / "data" / "demo_eval"
EVAL_CLIPS = sorted(EVAL_DIR.glob("*.flac"))


def runnable_here() -> list[str]:
    """The concrete types this machine accepts (int8_bfloat16 needs bf16 hardware)."""
    types = []
    for compute_type in ("float32", "int8", "bfloat16", "float16", "int8_bfloat16"):
        try:
            choose_compute_type(compute_type)  # type: ignore[arg-type]
            types.append(compute_type)
        except UnsupportedComputeType:
            pass
    return types


# --- the choice, a pure function of the machine's features ---

@pytest.mark.parametrize("flags, chosen, reason", [
    ({"amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx2"}, "bfloat16",
     "auto: AMX -> bfloat16"),
    ({"avx512_bf16", "avx512_vnni", "avx2"}, "bfloat16", "auto: AVX-512 BF16 -> bfloat16"),
    ({"avx512_vnni", "avx2"}, "int8", "auto: VNNI without AVX-512 BF16/AMX -> int8"),
    # fbgemm has no AVX-VNNI kernel: such CPUs run its AVX2 one
    ({"avx_vnni", "avx2"}, "int8", "auto: AVX2 without AVX-512 BF16/AMX -> int8"),
    ({"avx2"}, "int8", "auto: AVX2 without AVX-512 BF16/AMX -> int8"),
    (set(), "float32", "auto: no AVX2 -> float32"),
])
def test_auto_on_cpu_follows_the_flags(flags, chosen, reason):
    choice = choose_for("auto", "cpu", MachineFeatures(frozenset(flags)))
    assert (choice.chosen, choice.reason, choice.warning) == (chosen, reason, None)


def test_auto_on_cuda_picks_bf16_where_supported_and_never_float16():
    assert choose_for("auto", "cuda", MachineFeatures(frozenset(), cuda_bf16=True)).chosen \
        == "bfloat16"
    no_bf16 = choose_for("auto", "cuda:0", MachineFeatures(frozenset({"avx2"})))
    assert no_bf16.chosen == "float32" and "FunASR #1889" in no_bf16.reason


def test_explicit_types_are_honoured_with_a_warning_or_refused_naming_the_setting():
    assert choose_for("float32", "cpu", AVX2).warning is None
    slow = choose_for("bfloat16", "cpu", AVX2)
    assert slow.chosen == "bfloat16" and "no bfloat16 hardware" in slow.warning
    assert "auto would pick int8" in slow.warning
    assert choose_for("bfloat16", "cpu", MachineFeatures(frozenset({"amx_bf16"}))).warning is None
    with pytest.raises(UnsupportedComputeType, match="SENSEVOICE_COMPUTE_TYPE=int8_bfloat16"):
        choose_for("int8_bfloat16", "cpu", AVX2)
    assert choose_for("int8_bfloat16", "cpu",
                      MachineFeatures(frozenset({"avx512_bf16", "avx2"}))).chosen \
        == "int8_bfloat16"
    with pytest.raises(UnsupportedComputeType, match="SENSEVOICE_COMPUTE_TYPE=int8 runs on the"):
        choose_for("int8", "cuda", MachineFeatures(frozenset(), cuda_bf16=True))
    with pytest.raises(UnsupportedComputeType, match="does not support bfloat16"):
        choose_for("bfloat16", "cuda", MachineFeatures(frozenset()))
    with pytest.raises(UnsupportedComputeType, match="'int4' is not one of"):
        choose_compute_type("int4")  # type: ignore[arg-type]


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx avx2 fma avx512_vnni amx_bf16\n\n")
    assert read_cpu_flags(cpuinfo) == {"avx2", "avx512_vnni", "amx_bf16"}
    cpuinfo.write_text("processor\t: 0\n")  # no flags line (not x86): torch's capability
    assert read_cpu_flags(cpuinfo) <= {"avx2"}


def test_settings_refuse_an_unknown_compute_type(monkeypatch):
    monkeypatch.setenv("SENSEVOICE_COMPUTE_TYPE", "int4")
    with pytest.raises(Exception, match="compute_type"):
        Settings()


# --- the int8 layer ---

def test_an_int8_rows_output_does_not_depend_on_the_other_rows():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = Int8Linear.from_linear(linear, reduce_range=True)
    row = torch.randn(1, 64)
    companions = torch.cat([torch.randn(5, 64) * 100, torch.zeros(3, 64),  # loud, padding
                            torch.randn(4, 64) * 1e-3])
    with torch.inference_mode():
        alone = layer(row)
        for batch in (torch.cat([row, companions]), torch.cat([companions, row]),
                      torch.cat([companions[:4], row, companions[4:]])):
            where = next(i for i in range(batch.shape[0]) if torch.equal(batch[i], row[0]))
            assert torch.equal(layer(batch)[where], alone[0])
        batched_3d = layer(torch.stack([torch.cat([row, companions[:2]]),
                                        torch.cat([companions[2:4], row])]))
        assert torch.equal(batched_3d[0, 0], alone[0]) and torch.equal(batched_3d[1, 2], alone[0])
        assert torch.equal(layer(torch.zeros(2, 64)), linear.bias.expand(2, -1))
        assert layer(torch.zeros(0, 64)).shape == (0, 48)
        assert layer(torch.zeros(3, 0, 64)).shape == (3, 0, 48)
        assert (layer(row) - linear(row)).abs().max() < 0.02 * linear(row).abs().max()


def test_a_converted_model_gives_each_item_the_same_logits_alone_or_batched():
    """Bit-identical beside a companion of the same length; beside a longer one (padding) as
    close as float32 itself is (the attention and the FSMN convolution run at another length,
    in float32 too)."""
    model = convert_model(random_model(small_dims(), seed=3), "int8")
    item, companion, longer = torch.randn(25, 560), torch.randn(25, 560) * 50, torch.randn(40, 560)
    rows = torch.zeros(2, dtype=torch.long)
    with torch.inference_mode():
        alone = model(item[None], torch.tensor([25]), rows[:1], rows[:1])[0][0]
        pair = model(torch.stack([companion, item]), torch.tensor([25, 25]), rows, rows)[0]
        padded = torch.zeros(2, 40, 560)
        padded[0], padded[1, :25] = longer, item
        with_padding = model(padded, torch.tensor([40, 25]), rows, rows)[0][1, :29]
    assert torch.equal(pair[1], alone)
    assert torch.allclose(with_padding, alone, atol=1e-5, rtol=0)


def test_convert_model_leaves_its_input_alone_and_int8_bfloat16_builds():
    model = random_model(small_dims(), seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mixed = convert_model(model, "int8_bfloat16")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    state = mixed.state_dict()
    assert state["ctc.ctc_lo.weight"].dtype == torch.int8
    assert state["encoder.after_norm.weight"].dtype == torch.bfloat16
    rows = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        logits, _ = mixed(torch.randn(1, 20, 560), torch.tensor([20]), rows, rows)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="resolve auto"):
        convert_model(model, "auto")  # type: ignore[arg-type]


# --- loading through the cache ---

def settings_for(tmp_path: Path, compute_type: str, check: bool = False) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", compute_type=compute_type, compute_check=check)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_hf(tmp_path_factory.mktemp("compute") / "tiny", seed=0)


EXPECTED_DTYPES = {"float32": "F32", "int8": "I8", "bfloat16": "BF16", "float16": "F16"}


@pytest.mark.parametrize("compute_type", ["float32", "int8", "bfloat16", "float16"])
def test_l2_round_trip_maps_the_converted_tensors(tmp_path, tiny_dir, compute_type):
    settings = settings_for(tmp_path, compute_type)
    fresh, report = load_sensevoice_cached(tiny_dir, settings=settings)
    assert report.level == "fresh" and report.compute_type == compute_type
    mapped, again = load_sensevoice_cached(tiny_dir, settings=settings)
    assert again.level == "L2" and again.compute_type == compute_type
    assert again.snapshot == report.snapshot and again.fingerprint == report.fingerprint
    entries, metadata, _ = read_header(again.snapshot)
    assert metadata["compute_type"] == compute_type
    assert entries["encoder.encoders.0.feed_forward.w_1.weight"]["dtype"] \
        == EXPECTED_DTYPES[compute_type]
    assert entries["cmvn.shift"]["dtype"] == "F32"
    if compute_type == "int8":
        assert entries["ctc.ctc_lo.weight_scale"]["dtype"] == "F32"
        assert "prepack" in again.steps_s
    features = torch.randn(1, 30, 560)
    rows = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        a = fresh.model(features, torch.tensor([30]), rows, rows)[0]
        b = mapped.model(features, torch.tensor([30]), rows, rows)[0]
    assert a.dtype == torch.float32 and torch.equal(a, b)


def test_fingerprint_is_the_models_for_float32_and_differs_per_type(tmp_path, tiny_dir):
    prints = {}
    for compute_type in ("float32", "int8", "bfloat16"):
        _, report = load_sensevoice_cached(tiny_dir, settings=settings_for(tmp_path, compute_type))
        prints[compute_type] = report.fingerprint
    record = PathCache(tmp_path / "cache").read().entries[str(tiny_dir.resolve())]
    assert prints["float32"] == record.fingerprint
    assert prints["int8"] == served_fingerprint(record.fingerprint, "int8")
    assert len(set(prints.values())) == 3
    # keep_snapshots (2) counts each compute type on its own: nothing evicted across types
    assert len(list((tmp_path / "cache" / "snapshots").glob("*.safetensors"))) == 3


def test_a_float32_load_of_other_models_does_not_evict_the_int8_snapshot(tmp_path, tiny_dir):
    settings = Settings(cache_dir=tmp_path / "cache", compute_type="int8", keep_snapshots=1)
    _, served = load_sensevoice_cached(tiny_dir, settings=settings)
    for seed in (1, 2):  # doctor / a benchmark loading other models as float32
        other = write_hf(tmp_path / f"other{seed}", seed=seed)
        _, report = load_sensevoice_cached(
            other, settings=settings.model_copy(update={"compute_type": "float32"}))
    assert served.snapshot.is_file()
    floats = [p for p in (tmp_path / "cache" / "snapshots").glob("*.safetensors")
              if p != served.snapshot]
    assert floats == [report.snapshot]  # keep_snapshots=1 still prunes within float32
    _, again = load_sensevoice_cached(tiny_dir, settings=settings)
    assert again.level == "L2" and again.compute_type == "int8"


def test_a_damaged_int8_snapshot_is_refused_and_rebuilt(tmp_path, tiny_dir):
    settings = settings_for(tmp_path, "int8")
    _, report = load_sensevoice_cached(tiny_dir, settings=settings)
    snapshot = report.snapshot
    entries, _, data_start = read_header(snapshot)
    assert entries["ctc.ctc_lo.weight"]["dtype"] == "I8"
    data = bytearray(snapshot.read_bytes())
    data[data_start + entries["ctc.ctc_lo.weight"]["data_offsets"][0] + 10] ^= 0x40
    snapshot.chmod(0o644)
    snapshot.write_bytes(bytes(data))
    _, again = load_sensevoice_cached(tiny_dir, settings=settings)
    assert again.level == "fresh" and again.compute_type == "int8"
    assert any("discarded (data checksum mismatch" in w for w in again.warnings)
    _, third = load_sensevoice_cached(tiny_dir, settings=settings)
    assert third.level == "L2" and third.compute_type == "int8"


def test_a_snapshot_of_another_type_at_the_path_is_refused(tmp_path, tiny_dir):
    int8 = settings_for(tmp_path, "int8")
    _, report = load_sensevoice_cached(tiny_dir, settings=int8)
    _, bf16 = load_sensevoice_cached(tiny_dir, settings=settings_for(tmp_path, "bfloat16"))
    report.snapshot.chmod(0o644)
    bf16.snapshot.replace(report.snapshot)  # a bfloat16 file where int8's belongs
    _, again = load_sensevoice_cached(tiny_dir, settings=int8)
    assert again.level == "fresh" and again.compute_type == "int8"
    assert any("built for compute type bfloat16, not int8" in w for w in again.warnings)


def test_an_unsupported_explicit_type_is_a_clear_error(tmp_path, tiny_dir):
    if machine_features("cpu").cpu_bf16:
        pytest.skip("this CPU runs int8_bfloat16")
    with pytest.raises(UnsupportedComputeType, match="SENSEVOICE_COMPUTE_TYPE=int8_bfloat16"):
        load_sensevoice_cached(tiny_dir, settings=settings_for(tmp_path, "int8_bfloat16"))


def test_load_model_dir_stays_float32(tiny_dir):
    assert load_model_dir(tiny_dir).model.compute_type == "float32"
    assert load_model_dir(tiny_dir).model.ctc.ctc_lo.weight.dtype == torch.float32


# --- the accuracy gate ---

@pytest.fixture(scope="module")
def failing_dir(tmp_path_factory) -> Path:
    """A tiny random model whose int8 conversion changes a token on the clip (random
    weights have tiny logit margins); found with the real check."""
    for seed in range(1, 8):
        directory = write_hf(tmp_path_factory.mktemp("gate") / f"seed{seed}", seed=seed)
        model = load_model_dir(directory)
        if not check_against_float32(model, convert_model(model.model, "int8")).passed:
            return directory
    pytest.skip("no tiny random model fails the int8 check on this machine")


def test_a_type_that_fails_the_gate_falls_back_and_says_why(tmp_path, failing_dir):
    settings = settings_for(tmp_path, "int8", check=True)
    model, report = load_sensevoice_cached(failing_dir, settings=settings)
    assert report.compute_type == "float32" and model.model.compute_type == "float32"
    assert "int8 failed the accuracy check" in report.compute_reason
    warning = next(w for w in report.warnings if "accuracy check" in w)
    assert "gate.flac" in warning and "frames" in warning and "int8 layer" in warning
    assert "SENSEVOICE_COMPUTE_CHECK=false and SENSEVOICE_COMPUTE_TYPE=int8" in warning
    record = PathCache(tmp_path / "cache").read().entries[str(failing_dir.resolve())]
    assert report.fingerprint == record.fingerprint  # served float32: the model's own
    _, metadata, _ = read_header(report.snapshot)
    assert (metadata["compute_type"], metadata["compute_requested"]) == ("float32", "int8")
    _, again = load_sensevoice_cached(failing_dir, settings=settings)  # no second check
    assert again.level == "L2" and again.compute_type == "float32"
    assert "compute_check" not in again.steps_s and "recorded in the L2" in again.compute_reason


def test_with_the_check_off_int8_is_kept(tmp_path, failing_dir):
    """Also after a checked load fell back in the same cache: the warning's advice works."""
    checked, _ = load_sensevoice_cached(failing_dir, settings=settings_for(tmp_path, "int8", True))
    assert checked.model.compute_type == "float32"
    _, report = load_sensevoice_cached(failing_dir, settings=settings_for(tmp_path, "int8"))
    assert report.compute_type == "int8" and "compute_check" not in report.steps_s
    assert not any("accuracy" in w for w in report.warnings)
    # and the unchecked int8 snapshot is never served to a process with the check on
    _, again = load_sensevoice_cached(failing_dir, settings=settings_for(tmp_path, "int8", True))
    assert again.compute_type == "float32" and again.level == "L2"
    assert read_header(again.snapshot)[1]["compute_checked"] == "true"


# --- the demo model's held-out set ---

@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory) -> Path:
    return copy_demo_model(tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture(scope="module")
def float32_texts(demo_copy, tmp_path_factory) -> list[str]:
    cache = tmp_path_factory.mktemp("demo-cache")
    model, _ = load_sensevoice_cached(demo_copy, settings=settings_for(cache, "float32"))
    texts = [r.text for r in model.transcribe_batch([str(c) for c in EVAL_CLIPS])]
    assert len(texts) == len(json.loads((EVAL_DIR / "refs.json").read_text())) > 40
    assert all(texts), "the demo model transcribes every clip"
    return texts


@pytest.mark.slow
@pytest.mark.parametrize("compute_type", [t for t in runnable_here() if t != "float32"])
def test_the_demo_models_held_out_set_matches_float32(tmp_path, demo_copy, float32_texts,
                                                       compute_type):
    """Each reduced type this machine runs, against float32's transcripts. Tolerance: at most
    2 of the 49 clips differ, because the demo model is tiny and some of its logit margins are
    narrower than one rounding step. Measured on a Zen 3 (AVX2): int8 1 of 49 differs
    (二百八十四 -> 二百十四: 7-bit activations; the CTC head kept in fp32 changes nothing;
    8-bit activations saturate AVX2's vpmaddubsw and give 4), bfloat16 1 (a dropped
    "nine"), float16 0. The accuracy gate passes for each (check on)."""
    model, report = load_sensevoice_cached(
        demo_copy, settings=settings_for(tmp_path, compute_type, check=True))
    assert report.compute_type == compute_type, report.warnings
    got = [r.text for r in model.transcribe_batch([str(c) for c in EVAL_CLIPS])]
    differ = [(clip.name, want, have) for clip, want, have
              in zip(EVAL_CLIPS, float32_texts, got) if want != have]
    assert len(differ) <= 2, differ


def test_a_snapshot_whose_header_lies_about_its_type_is_refused(tmp_path, tiny_dir):
    """A float32 snapshot re-signed to say bfloat16, put where bfloat16's belongs: the tensors'
    types are checked against the structure the header names, and the file is rebuilt."""
    from sensevoice_core.snapshot import _header_bytes

    _, f32 = load_sensevoice_cached(tiny_dir, settings=settings_for(tmp_path, "float32"))
    entries, metadata, data_start = read_header(f32.snapshot)
    data = f32.snapshot.read_bytes()[data_start:]
    data_sha256 = metadata["data_sha256"]
    metadata = {k: v for k, v in metadata.items() if k not in ("data_sha256", "header_sha256")}
    metadata["compute_type"] = metadata["compute_requested"] = "bfloat16"
    metadata["compute_checked"] = "false"
    bf16 = settings_for(tmp_path, "bfloat16")
    _, report = load_sensevoice_cached(tiny_dir, settings=bf16)
    report.snapshot.chmod(0o644)
    report.snapshot.write_bytes(_header_bytes(entries, metadata, data_sha256) + data)
    _, again = load_sensevoice_cached(tiny_dir, settings=bf16)
    assert again.level == "fresh" and again.compute_type == "bfloat16"
    assert any("bfloat16 tensors of the wrong type" in w for w in again.warnings), again.warnings
