"""The speed benchmark's own machinery, run as the real scripts on tiny models: the sherpa-onnx
export agrees with our model token for token, and bench/rtf.py prints its table and targets.
The figures themselves are not tested (bench/rtf.py on the full-size fixture measures them)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("sherpa_onnx", "onnxruntime", "onnx", "funasr")


def run_script(script: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


needs_peers = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in PEERS),
    reason="sherpa-onnx peers not installed (pip install -e '.[bench]')")


@needs_peers
def test_sherpa_export_agrees_with_ours_and_is_cached_outside_the_repo(
        official_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "export-cache"
    first = run_script("sherpa_onnx_export.py", "--model", official_dir, "--cache", cache,
                       "--threads", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    # fp32: the exported graph on our features, and sherpa-onnx end to end with its own
    # frontend, give our token ids on all five clips
    assert ("sherpa-onnx fp32: token ids equal ours (fp32) on 5/5 clips as a graph on our "
            "features, 5/5 end to end") in first.stdout, first.stdout
    for variant in ("int8 QUInt8 (as shipped)", "int8 QInt8"):
        assert f"sherpa-onnx {variant}: token ids equal ours" in first.stdout
    [exported] = [path for path in cache.iterdir() if not path.name.startswith(".")]
    assert sorted(p.name for p in exported.iterdir()) == [
        "model.int8.onnx", "model.onnx", "model.qint8.onnx", "tokens.txt"]
    assert "sherpa-onnx export of" in first.stdout
    second = run_script("sherpa_onnx_export.py", "--model", official_dir, "--cache", cache,
                        "--threads", "1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "sherpa-onnx export of" not in second.stdout  # reused, not exported again
    untracked = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout
    assert ".onnx" not in untracked and "tokens.txt" not in untracked


@needs_peers
def test_sherpa_export_refuses_the_hf_layout_by_name(hf_dir: Path, tmp_path: Path) -> None:
    result = run_script("sherpa_onnx_export.py", "--model", hf_dir, "--cache", tmp_path)
    assert result.returncode != 0
    assert "official layout" in result.stderr and str(hf_dir) in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_rtf_pins_funasr_dither_and_prints_each_compute_type_and_the_targets(
        official_dir: Path) -> None:
    result = run_script("rtf.py", "--model", official_dir, "--skip-sherpa", "--seconds", "1",
                        "--repeats", "1", "--threads", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # FunASR's default dither 1.0 makes two calls differ; pinned to 0 they repeat, and match us
    assert ("FunASR with dither 0.0: two calls on 10 s give the same text, equal to ours "
            "(float32)") in out, out
    assert "auto picks " in out and "threads: 1" in out
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()
            if line.startswith(("ours ", "FunASR 1.4.16"))}
    assert "FunASR 1.4.16 fp32 (dither 0)" in rows, out
    assert "ours float32" in rows and any("(auto)" in name for name in rows), out
    assert any("word timestamps" in name for name in rows), out
    assert "GEMM roofline float32 at 1 s" in out
    assert "sherpa-onnx: skipped (--skip-sherpa)" in out
    assert "targets (issue 16):" in out and ("MET" in out or "MISSED" in out)


def test_rtf_rejects_bad_arguments_by_name(hf_dir: Path) -> None:
    result = run_script("rtf.py", "--model", hf_dir, "--repeats", "0")
    assert result.returncode == 2 and "--repeats" in result.stderr
    missing = hf_dir.parent / "no-such-model"
    result = run_script("rtf.py", "--model", missing)
    assert result.returncode != 0 and str(missing) in result.stderr
