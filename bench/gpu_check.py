"""A CUDA check in one go (not a test; CI has no GPU): the model runs on the GPU and agrees with
the CPU, its real-time factor per compute type, and what batching buys a service on it.

    python bench/gpu_check.py                      # everything, ~5 minutes on an H200
    python bench/gpu_check.py --skip-throughput    # agreement and RTF only, ~2 minutes

On a machine without CUDA it says so and exits 0 without running anything.

1. Agreement: a tiny random model, loaded fresh and through L2 onto cuda in float32, gives the
   CPU's token ids on a real clip.
2. RTF: a full-size model (random weights, the official shapes and a 25,055-piece vocabulary,
   written to a temporary directory) loaded the way a worker loads it (load_sensevoice_cached,
   device cuda) in auto and in float32, bfloat16 and float16; per type the RTF at 10 s and
   60 s (one pass, waveform in, text out, as bench/rtf.py), whether the logits stay finite
   (the SANM encoder is reported to overflow in fp16, FunASR #1889) and whether the tokens
   equal float32's (random weights have logit margins of ~0.1: a difference there says
   little about a trained model). Target: auto RTF <= 0.002 at 10 s.
3. Throughput: bench/throughput.py against the same model served on cuda, 1 and 16 clients,
   batching off and on. Target: >= 5x the throughput from batching at 16 clients.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sensevoice_core import Settings, load_sensevoice_cached
from sensevoice_core.audio import load_audio
from sensevoice_core.compute import UnsupportedComputeType
from sensevoice_core.config import FrontendConfig, SenseVoiceDims
from sensevoice_core.frontend import CMVN
from sensevoice_core.layout import HF_TOKENIZER
from sensevoice_core.loader import load_model_dir, save_model_dir
from sensevoice_core.options import TranscribeOptions
from sensevoice_core.pipeline import SenseVoice
from sensevoice_core.random_model import random_model, write_random_model
from sensevoice_core.tokenizer import all_tag_pieces, build_sentencepiece_model

ROOT = Path(__file__).resolve().parent.parent
CLIP = ROOT / "tests" / "data" / "en.mp3"
CMVN_FILE = ROOT / "tests" / "data" / "official" / "am.mvn"
TYPES = ("float32", "bfloat16", "float16")
RTF_TARGET = 0.002  # auto, 10 s
BATCHING_TARGET = 5.0  # throughput with batching over without, 16 clients


def tiny_model_agrees(scratch: Path, device: str) -> None:
    model_dir = write_random_model(scratch / "tiny")
    clip = load_audio(CLIP)
    options = TranscribeOptions()  # one pass without the VAD: a random model's own output
    expected = load_model_dir(model_dir).decode([clip], options)[0]
    settings = Settings(cache_dir=scratch / "cache", device=device, compute_type="float32")
    fresh, _ = load_sensevoice_cached(model_dir, settings=settings)
    cached, report_l2 = load_sensevoice_cached(model_dir, settings=settings)
    assert report_l2.level == "L2", report_l2.level
    for name, model in (("fresh", fresh), ("L2", cached)):
        result = model.decode([clip], options)[0]
        same = result.token_ids == expected.token_ids
        print(f"tiny model on {device} ({name}, float32): "
              f"{'same' if same else 'DIFFERENT'} {len(result.token_ids)} token ids as the CPU")


def write_full_size(directory: Path) -> Path:
    """A full-size hf-layout model: random weights, 25,055 pieces (synthetic, tags included)."""
    dims = SenseVoiceDims()
    tags = all_tag_pieces()
    normal = [f"\u2581w{i}" for i in range(dims.vocab_size - 3 - len(tags))]
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_file = Path(scratch) / HF_TOKENIZER
        tokenizer_file.write_bytes(build_sentencepiece_model(normal, tags))
        return save_model_dir(directory, random_model(dims, seed=0), FrontendConfig(),
                              tokenizer_file, CMVN.from_kaldi_nnet(CMVN_FILE))


def clip_of(seconds: int) -> torch.Tensor:
    speech = load_audio(CLIP)
    return speech.repeat(seconds * 16000 // speech.numel() + 1)[: seconds * 16000]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(model: SenseVoice, waveform: torch.Tensor, repeats: int) -> float:
    options = TranscribeOptions()
    for _ in range(3):
        model.decode([waveform], options)
    times = []
    for _ in range(repeats):
        synchronize(str(model.device))
        start = time.perf_counter()
        model.decode([waveform], options)  # its token ids come back to the CPU: a sync
        synchronize(str(model.device))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rtf_per_type(model_dir: Path, scratch: Path, device: str, seconds_list: list[int],
                 repeats: int) -> None:
    clips = {seconds: clip_of(seconds) for seconds in seconds_list}
    reference: dict[int, tuple[int, ...]] = {}
    auto_rtf: float | None = None
    for requested in ("float32", *[t for t in TYPES if t != "float32"], "auto"):
        settings = Settings(cache_dir=scratch / "cache", device=device, compute_type=requested,
                            compute_check=False)  # random weights: the gate would fall back
        try:
            model, report = load_sensevoice_cached(model_dir, settings=settings)
        except UnsupportedComputeType as e:  # one this GPU refuses: say so, go on
            print(f"{requested}: not loaded: {e}")
            continue
        figures = []
        for seconds, waveform in clips.items():
            median = median_seconds(model, waveform, repeats)
            logits, _ = model.logits([model_features(model, waveform)], TranscribeOptions())
            finite = bool(torch.isfinite(logits).all())
            tokens = model.decode([waveform], TranscribeOptions())[0].token_ids
            if requested == "float32":
                reference[seconds] = tokens
            same = tokens == reference.get(seconds)
            figures.append(f"{seconds} s RTF {median / seconds:.5f} ({median * 1000:.1f} ms), "
                           f"logits {'finite' if finite else 'NOT FINITE'}, tokens "
                           f"{'=' if same else '!='} float32's")
            if requested == "auto" and seconds == seconds_list[0]:
                auto_rtf = median / seconds
        print(f"{requested} -> {report.compute_type} ({report.compute_reason}): "
              + "; ".join(figures), flush=True)
        del model
        torch.cuda.empty_cache()
    if auto_rtf is not None:
        print(f"target: auto RTF <= {RTF_TARGET} at 10 s (here {seconds_list[0]} s): "
              f"{auto_rtf:.5f} "
              f"{'MET' if auto_rtf <= RTF_TARGET else 'MISSED'}")


def model_features(model: SenseVoice, waveform: torch.Tensor) -> torch.Tensor:
    from sensevoice_core.frontend import compute_features

    return compute_features(waveform, model.frontend, model.cmvn)


def throughput(model_dir: Path, scratch: Path, device: str, seconds: float) -> None:
    """bench/throughput.py on the device; its own output, then the target to read it against."""
    env = {**os.environ, "SENSEVOICE_DEVICE": device, "SENSEVOICE_COMPUTE_CHECK": "false",
           "SENSEVOICE_CACHE_DIR": str(scratch / "cache")}
    command = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--model", str(model_dir),
               "--clients", "1", "16", "--seconds", str(seconds)]
    print(f"$ SENSEVOICE_DEVICE={device} {' '.join(command[1:])}", flush=True)
    completed = subprocess.run(command, env=env, cwd=ROOT, timeout=900, check=False)
    if completed.returncode:
        print(f"bench/throughput.py exited {completed.returncode}")
    print(f"target: batching on >= {BATCHING_TARGET}x the throughput of batching off at "
          f"16 clients (the on/off ratio above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--throughput-seconds", type=float, default=30.0,
                        help="seconds of load per system and client count")
    parser.add_argument("--seconds", type=int, nargs="+", default=[10, 60],
                        help="audio lengths for the RTF")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda",
                        help="cpu runs the same steps on the CPU, to check the script itself")
    args = parser.parse_args()
    if args.repeats < 1 or min(args.seconds) < 1 or args.throughput_seconds <= 0:
        parser.error("--repeats, --seconds and --throughput-seconds must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda or 'none'}): nothing to check here; run this on a GPU")
        return
    if args.device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability()
        print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"{torch.cuda.get_device_name()} (compute capability {major}.{minor}, bf16 "
              f"{'yes' if torch.cuda.is_bf16_supported() else 'no'})", flush=True)
    else:
        print(f"torch {torch.__version__} on {args.device}: checking the script itself")
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        tiny_model_agrees(scratch, args.device)
        started = time.perf_counter()
        model_dir = write_full_size(scratch / "full")
        print(f"full-size random model written in {time.perf_counter() - started:.0f} s",
              flush=True)
        rtf_per_type(model_dir, scratch, args.device, args.seconds, args.repeats)
        if not args.skip_throughput:
            throughput(model_dir, scratch, args.device, args.throughput_seconds)


if __name__ == "__main__":
    main()
