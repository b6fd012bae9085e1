"""Real-time factor of our SenseVoice vs FunASR's AutoModel, and achieved GFLOPS vs a GEMM roofline.

Run on the full-size random fixture (not in CI):
    python ../shared/tools/make_full_fixture.py /tmp/sensevoice-full
    python bench/rtf.py --model /tmp/sensevoice-full

RTF = processing seconds / audio seconds (lower is faster), median of --repeats runs after a
warm-up, whole pipeline for both (decoded waveform in, text out); the runs being compared
alternate, so machine noise affects them alike. The roofline is the FLOP
count of one forward pass divided by the rate of a plain fp32 torch.matmul of the model's own
GEMM shape, measured in the same run. A second row per length: RTF with word timestamps on
(TranscribeOptions.word_timestamps: CTC forced alignment, tokens and words) vs off, the two
alternating, and what they add (target: at most 5%).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from sensevoice_core.audio import load_audio  # noqa: E402
from sensevoice_core.config import SenseVoiceDims  # noqa: E402
from sensevoice_core.frontend import compute_features  # noqa: E402
from sensevoice_core.loader import load_model_dir  # noqa: E402
from sensevoice_core.options import TranscribeOptions  # noqa: E402
from sensevoice_core.vocab import NUM_PROMPT_FRAMES  # noqa: E402

CLIP = Path(__file__).resolve().parent.parent / "tests" / "data" / "en.mp3"
SAMPLE_RATE = 16000


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each run. Runs alternate within each round, so a slow spell on a
    shared machine hits all of them alike and their ratios stay meaningful."""
    for run in runs.values():
        run()  # warm-up: first-call allocations and kernel selection
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def forward_flops(dims: SenseVoiceDims, frames: int) -> float:
    """FLOPs of one forward pass over `frames` LFR frames (the 4 prompt frames included)."""
    t, d = frames + NUM_PROMPT_FRAMES, dims.output_size
    layer_macs = 3 * d * d + d * d + 2 * d * dims.linear_units  # qkv, out, feed-forward
    first_layer_macs = 3 * dims.input_size * d + d * d + 2 * d * dims.linear_units
    layers = dims.num_blocks + dims.tp_blocks
    linear = t * (first_layer_macs + (layers - 1) * layer_macs + d * dims.vocab_size)
    attention = layers * 2 * t * t * d  # Q K^T and attn V
    fsmn = layers * t * d * dims.kernel_size
    return 2.0 * (linear + attention + fsmn)


GEMM_CALLS = 10  # matmuls per timed GEMM run, so one run lasts long enough to time


def gemm_run(rows: int, inner: int, cols: int) -> tuple[Callable[[], object], float]:
    """A run of GEMM_CALLS fp32 matmuls of the model's own shape, and its FLOP count."""
    a, b = torch.randn(rows, inner), torch.randn(inner, cols)

    def run() -> None:
        for _ in range(GEMM_CALLS):
            torch.matmul(a, b)

    return run, 2.0 * rows * inner * cols * GEMM_CALLS


def clip_of(seconds: int) -> torch.Tensor:
    speech = load_audio(CLIP)
    repeats = seconds * SAMPLE_RATE // speech.numel() + 1
    return speech.repeat(repeats)[: seconds * SAMPLE_RATE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True,
                        help="full-size official-layout model directory")
    parser.add_argument("--seconds", type=int, nargs="+", default=[10, 60])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-funasr", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours = load_model_dir(args.model)  # no L2 snapshot of the full-size model left behind
    dims = ours.model.dims
    print(f"model: {args.model} ({sum(p.numel() for p in ours.model.parameters()):,} parameters), "
          f"threads: {torch.get_num_threads()}, torch {torch.__version__}, "
          f"CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    funasr_model = None
    if not args.skip_funasr:
        from funasr import AutoModel

        funasr_model = AutoModel(model=str(args.model), device="cpu", ncpu=args.threads,
                                 disable_update=True, disable_pbar=True, disable_log=True)
        torch.set_num_threads(args.threads)  # AutoModel sets its own thread count

    options = TranscribeOptions()
    with_words = TranscribeOptions(word_timestamps=True)
    for seconds in args.seconds:
        waveform = clip_of(seconds)
        frames = compute_features(waveform, ours.frontend, ours.cmvn).shape[0]
        gemm, gemm_flops = gemm_run(frames + NUM_PROMPT_FRAMES, dims.output_size,
                                    dims.linear_units)
        runs: dict[str, Callable[[], object]] = {
            "ours": lambda: ours.decode([waveform], options),  # one pass, as FunASR's
            "ours+words": lambda: ours.decode([waveform], with_words),
            "gemm": gemm,
        }
        if funasr_model is not None:
            samples = waveform.numpy()
            runs["funasr"] = lambda: funasr_model.generate(
                input=samples, language="auto", use_itn=False, disable_pbar=True)
        medians = interleaved_medians(runs, args.repeats)
        ours_s = medians["ours"]
        flops = forward_flops(dims, frames)
        gemm_gflops = gemm_flops / medians["gemm"] / 1e9
        roofline_s = flops / (gemm_gflops * 1e9)
        line = (f"{seconds:>3d} s audio: ours RTF {ours_s / seconds:.4f} ({ours_s:.3f} s), "
                f"{flops / ours_s / 1e9:.0f} GFLOPS achieved vs GEMM {gemm_gflops:.0f} GFLOPS "
                f"-> {ours_s / roofline_s:.2f}x the roofline time ({roofline_s:.3f} s)")
        if "funasr" in medians:
            funasr_s = medians["funasr"]
            line += (f"; FunASR RTF {funasr_s / seconds:.4f} ({funasr_s:.3f} s), "
                     f"ours {funasr_s / ours_s:.2f}x faster")
        print(line, flush=True)
        words_s = medians["ours+words"]
        print(f"{seconds:>3d} s audio: word timestamps on RTF {words_s / seconds:.4f} "
              f"({words_s:.3f} s) vs off {ours_s / seconds:.4f} ({ours_s:.3f} s): "
              f"{(words_s / ours_s - 1) * 100:+.1f}%", flush=True)


if __name__ == "__main__":
    main()
