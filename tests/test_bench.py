"""The benchmarks' own machinery, run as the real scripts on tiny models: the sherpa-onnx
export agrees with our model token for token, bench/rtf.py prints its table and targets, and
bench/swap.py swaps a real service with fork- and spawn-started workers and prints every figure
beside issue 17's targets. The figures themselves are not tested (the scripts on the full-size
fixture measure them)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from model_factory import DEMO_MODEL

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("sherpa_onnx", "onnxruntime", "onnx", "funasr")


def run_script(script: str, *args: str | Path,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a bench script; past `timeout` its whole process group (a service it started, too)
    gets SIGTERM, then SIGKILL."""
    with subprocess.Popen([sys.executable, str(ROOT / "bench" / script), *map(str, args)],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"},
                          start_new_session=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                out, err = process.communicate(timeout=60)
            finally:
                with contextlib.suppress(ProcessLookupError):  # all gone already
                    os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"{script} ran past {timeout:g} s:\n{out[-3000:]}\n{err[-3000:]}")
    for work in set(re.findall(r"/tmp/swap-bench-\w+", out + err)):  # bench/swap.py's logs
        shutil.rmtree(work, ignore_errors=True)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


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


SWAP_ROWS = ("reload -> traffic switched, idle (median)", "reload -> first reply, new model, idle",
             "reload -> traffic switched, traffic", "reload -> first reply, new model, traffic",
             "latency p50 before swaps", "latency p99 before swaps", "latency p50 during swaps",
             "latency p99 during swaps", "latency p50 after swaps", "latency p99 after swaps",
             "p99 during / p99 before", "failed requests",
             "total PSS at peak / one serving worker RSS", "standby spawn (request -> Hello, median)",
             "unchanged reload, L1 (outcome.seconds)", "unchanged reload, client round trip",
             "processes started by unchanged reloads")


def swap_row(out: str, label: str) -> list[str]:
    """The cells (fork, spawn) and target of one row of the figures table."""
    [line] = [line for line in out.splitlines() if line.startswith(label + " ")]
    return [cell for cell in line[len(label):].split("  ") if cell.strip()]


@pytest.mark.slow
def test_swap_bench_swaps_with_fork_and_spawn_and_prints_every_figure(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = run_script("swap.py", "--model", DEMO_MODEL, "--swaps", "1", "--rounds", "1",
                        "--steady-s", "1", "--l1", "2", "--cache", cache, timeout=480)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for label in SWAP_ROWS:
        cells = swap_row(out, label)
        assert len(cells) >= 2 and not any("not measured" in c for c in cells[:2]), (label, out)
    assert [c.strip() for c in swap_row(out, "failed requests")[:2]] == ["0 met", "0 met"], out
    assert [c.strip() for c in swap_row(out, "processes started by unchanged reloads")[:2]] == [
        "0 met", "0 met"], out
    assert swap_row(out, "total PSS at peak / one serving worker RSS")[2].strip() == "<= 1.15x"
    assert "fork: workers started by fork" in out and "spawn: workers started by spawn" in out
    assert "services in order fork spawn" in out
    assert out.count("unchanged reloads: 2 L1 (ok)") == 2, out
    assert out.count("1 standby spawns") == 2, out
    assert "CPU: " in out and "usable cores" in out and "torch thread(s)" in out
    for start in ("fork", "spawn"):
        table = out.split(f"memory, {start} (")[1]
        assert "  supervisor " in table and "  serving " in table and "  total " in table
    assert "  fork server " in out.split("memory, fork (")[1].split("memory, spawn (")[0]
    copy = cache / "model-b"  # the model's copy, kept with --cache for the next run
    assert (copy / "config.json").read_bytes() == (DEMO_MODEL / "config.json").read_bytes() + b"\n"
    assert (copy / "model.safetensors").resolve() == DEMO_MODEL / "model.safetensors"


def second_model_in(cache: Path) -> subprocess.CompletedProcess[str]:
    """bench/swap_probe.second_model, called as bench/swap.py calls it (from bench/)."""
    code = ("import sys; from pathlib import Path; from swap_probe import second_model; "
            "print(second_model(Path(sys.argv[1]), Path(sys.argv[2])))")
    return subprocess.run([sys.executable, "-c", code, str(DEMO_MODEL), str(cache)],
                          cwd=ROOT / "bench", capture_output=True, text=True, check=False)


def test_swap_bench_reuses_its_model_copy_and_refuses_a_foreign_one(tmp_path: Path) -> None:
    first = second_model_in(tmp_path)
    assert first.returncode == 0, first.stderr
    copy = Path(first.stdout.strip())
    config = (copy / "config.json").stat()
    again = second_model_in(tmp_path)
    assert again.returncode == 0 and again.stdout == first.stdout
    assert (copy / "config.json").stat().st_ino == config.st_ino  # reused, not rewritten
    (copy / "config.json").write_text("{}")
    result = run_script("swap.py", "--model", DEMO_MODEL, "--cache", tmp_path)
    assert result.returncode != 0 and str(copy) in result.stderr
    assert "not this bench's copy" in result.stderr
    assert (copy / "config.json").read_text() == "{}"  # left alone


def test_swap_bench_rejects_bad_arguments_by_name(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, named in ((["--swaps", "0"], "--swaps"), (["--clients", "0"], "--clients"),
                        (["--steady-s", "-1"], "--steady-s"), (["--cache", a_file], "--cache"),
                        (["--starts", "fork", "fork"], "--starts"),
                        (["--clip", tmp_path / "none.wav"], "--clip")):
        result = run_script("swap.py", "--model", DEMO_MODEL, *args)
        assert result.returncode == 2 and named in result.stderr, (args, result.stderr)
    result = run_script("swap.py", "--model", tmp_path / "missing")
    assert result.returncode == 2 and str(tmp_path / "missing") in result.stderr
    result = run_script("swap.py", "--model", empty, "--cache", tmp_path / "cache")
    assert result.returncode != 0 and "not a SenseVoice model directory" in result.stderr
    assert str(empty) in result.stderr


def test_swap_bench_stops_on_a_broken_model_and_prints_what_it_has(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(DEMO_MODEL, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    result = run_script("swap.py", "--model", broken, "--rounds", "1", "--cache",
                        tmp_path / "cache", timeout=240)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stopped early: fork: the service exited" in result.stderr
    assert "service-0-fork.log" in result.stderr  # where to look
    assert "services in order fork;" in result.stdout  # spawn never started
    assert "not measured" in swap_row(result.stdout, "failed requests")[0]


def test_swap_bench_names_a_clip_the_service_cannot_transcribe(tmp_path: Path) -> None:
    clip = tmp_path / "notes.wav"
    clip.write_text("not audio")
    result = run_script("swap.py", "--model", DEMO_MODEL, "--rounds", "1", "--starts", "fork",
                        "--clip", clip, "--cache", tmp_path / "cache", timeout=240)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"--clip {clip} is not served" in result.stderr and "notes.wav" in result.stderr
