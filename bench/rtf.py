"""Real-time factor of FunASR, ours in every compute type and sherpa-onnx, in one interleaved run.

Run on the full-size random fixture (not in CI):
    python ../shared/tools/make_full_fixture.py /tmp/full
    python bench/rtf.py --model /tmp/full

RTF = processing seconds / audio seconds (lower is faster): the median of --repeats rounds
after one warm-up each; within a round every system runs once, in turn (A B C A B C ...), so a
slow spell on a shared machine hits them alike and their ratios stay meaningful. Each system
takes the decoded waveform and gives text, in one pass (no VAD), as FunASR's generate does:
- FunASR 1.4.16 AutoModel, fp32, with its frontend's dither pinned to 0 (its default, 1.0,
  adds random noise to every call, so it computed something different each time; the run
  checks that two calls now agree, and agree with ours);
- ours in each compute type this machine runs without a warning (compute.choose_compute_type:
  on a CPU without bf16 hardware bfloat16 is emulated and several times slower, so it is left
  out unless --types names it), and ours with word timestamps in the auto type;
- sherpa-onnx, when installed (``pip install -e '.[bench]'``), on the same weights exported
  the way its own script does (bench/sherpa_onnx_export.py): fp32, int8 with QUInt8 weights
  as the script ships it, and int8 with QInt8 weights.
Per compute type, the distance from its GEMM roofline (bench/roofline.py): the model's time
over the time of its GEMMs alone as plain library calls, timed in the same rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from cpuinfo import cpu_model_and_flags
from roofline import RooflineRuns, roofline_runs
from sherpa_onnx_export import (
    VARIANTS,
    export,
    missing_peers,
    recognizer,
    sherpa_transcribe,
)

from sensevoice_core.audio import load_audio
from sensevoice_core.compute import (
    CONCRETE_TYPES,
    UnsupportedComputeType,
    choose_compute_type,
)
from sensevoice_core.convert import convert_model
from sensevoice_core.errors import ModelFileError
from sensevoice_core.frontend import compute_features
from sensevoice_core.layout import model_files
from sensevoice_core.loader import load_model_dir
from sensevoice_core.options import TranscribeOptions
from sensevoice_core.pipeline import SenseVoice

CLIP = Path(__file__).resolve().parent.parent / "tests" / "data" / "en.mp3"
SAMPLE_RATE = 16000
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile",
               "amx_bf16", "amx_int8", "amx_fp16")
FUNASR = "FunASR 1.4.16 fp32 (dither 0)"
SHERPA = "sherpa-onnx"
Run = Callable[[], object]


@dataclass(frozen=True)
class System:
    name: str
    run_for: Callable[[torch.Tensor], Run]  # the waveform -> a run over it
    compute_type: str | None = None  # ours: the roofline it is measured against


def interleaved_medians(runs: dict[str, Run], repeats: int) -> dict[str, float]:
    """Median seconds of each run over `repeats` rounds, after one warm-up each."""
    for run in runs.values():
        run()  # warm-up: first-call allocations, kernel selection, int8 prepacking
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def clip_of(seconds: int) -> torch.Tensor:
    speech = load_audio(CLIP)
    repeats = seconds * SAMPLE_RATE // speech.numel() + 1
    return speech.repeat(repeats)[: seconds * SAMPLE_RATE]


def cpu_description() -> tuple[str, list[str]]:
    """The CPU's model name and which of SHOWN_FLAGS it has (from /proc/cpuinfo)."""
    name, flags = cpu_model_and_flags()
    return name, [flag for flag in SHOWN_FLAGS if flag in flags]


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def funasr_system(model_dir: Path, threads: int, ours: SenseVoice) -> tuple[System, str]:
    """FunASR's AutoModel with dither 0, and a line saying whether its output now repeats
    and equals ours (float32).

    WavFrontend's dither defaults to 1.0 (random noise added to every call's samples). It
    has to be set through AutoModel's frontend_conf, which is merged into config.yaml's: from
    1.4.16 on, generate() restores its kwargs, the frontend object included, from a copy taken
    at construction, so changing ``automodel.kwargs["frontend"].dither`` afterwards is undone
    on the next call.
    """
    from funasr import AutoModel

    automodel = AutoModel(model=str(model_dir), device="cpu", ncpu=threads, disable_update=True,
                          disable_pbar=True, disable_log=True, frontend_conf={"dither": 0.0})
    torch.set_num_threads(threads)  # AutoModel sets its own thread count

    def run_for(waveform: torch.Tensor) -> Run:
        samples = waveform.numpy()
        return lambda: automodel.generate(input=samples, language="auto", use_itn=False,
                                          disable_pbar=True)[0]["text"]

    waveform = clip_of(10)
    run = run_for(waveform)
    first, second = run(), run()
    mine = ours.decode([waveform], TranscribeOptions())[0].raw
    line = (f"FunASR with dither {automodel.kwargs['frontend'].dither}: two calls on 10 s give "
            f"{'the same' if first == second else 'DIFFERENT'} text, "
            f"{'equal to' if first == mine else 'DIFFERENT from'} ours (float32)")
    return System(FUNASR, run_for), line


def our_systems(base: SenseVoice, types: list[str], auto: str, words: bool) -> list[System]:
    systems = []
    for compute_type in types:
        model = dataclasses.replace(base, model=convert_model(base.model, compute_type))
        label = f"ours {compute_type}" + (" (auto)" if compute_type == auto else "")
        systems.append(System(label, _decode_run(model, TranscribeOptions()), compute_type))
        if words and compute_type == auto:
            systems.append(System(f"ours {compute_type} + word timestamps",
                                  _decode_run(model, TranscribeOptions(word_timestamps=True))))
    return systems


def _decode_run(model: SenseVoice, options: TranscribeOptions) -> Callable[[torch.Tensor], Run]:
    return lambda waveform: lambda: model.decode([waveform], options)  # one pass, as FunASR's


def sherpa_systems(model_dir: Path, threads: int) -> list[System]:
    exported = export(model_dir)
    systems = []
    for variant in VARIANTS:
        engine = recognizer(exported, variant, threads)
        systems.append(System(f"{SHERPA} {variant}",
                              lambda waveform, engine=engine: lambda: sherpa_transcribe(
                                  engine, waveform)))
    return systems


def choose_types(requested: list[str] | None) -> tuple[list[str], str, list[str]]:
    """The compute types to run, the one auto picks, and a line per type left out."""
    auto = choose_compute_type("auto")
    notes = [f"auto picks {auto.chosen}: {auto.reason}"]
    types = []
    for compute_type in requested or CONCRETE_TYPES:
        try:
            choice = choose_compute_type(compute_type)  # type: ignore[arg-type]
        except UnsupportedComputeType as e:
            notes.append(f"{compute_type}: not run: {e}")
            continue
        if choice.warning and not requested:
            notes.append(f"{compute_type}: not run (--types {compute_type} runs it): "
                         f"{choice.warning}")
            continue
        types.append(compute_type)
    if auto.chosen not in types:
        types.append(auto.chosen)
    return types, auto.chosen, notes


def ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None:
        return "-"
    return f"{numerator / denominator:.2f}"


def print_table(systems: list[System], seconds_list: list[int],
                medians: dict[tuple[str, int], float],
                rooflines: dict[tuple[str, int], float]) -> str | None:
    """The figures, one row per system; returns the fastest sherpa-onnx int8 variant."""
    sherpa_int8 = [s.name for s in systems if s.name.startswith(f"{SHERPA} int8")]
    best = min(sherpa_int8, default=None,
               key=lambda name: sum(medians[name, s] for s in seconds_list))
    per = " / ".join(f"{s} s" for s in seconds_list)
    print(f"\n{'system':<40} " + " ".join(f"{'RTF ' + str(s) + ' s':>10}" for s in seconds_list)
          + f"  x FunASR ({per})  x best sherpa int8 ({per})  x roofline ({per})")
    for system in systems:
        rtfs = " ".join(f"{medians[system.name, s] / s:>10.4f}" for s in seconds_list)
        funasr = " / ".join(ratio(medians.get((FUNASR, s)), medians[system.name, s])
                            for s in seconds_list)
        sherpa = " / ".join(ratio(medians.get((best, s)) if best else None,
                                  medians[system.name, s]) for s in seconds_list)
        roof = " / ".join(ratio(medians[system.name, s], rooflines.get((system.compute_type, s)))
                          for s in seconds_list) if system.compute_type else "-"
        print(f"{system.name:<40} {rtfs}  {funasr:>{9 + len(per)}}  "
              f"{sherpa:>{21 + len(per)}}  {roof:>{12 + len(per)}}")
    if best:
        print(f"(fastest sherpa-onnx int8 here: {best}; its accuracy against fp32 is not "
              f"checked here: bench/sherpa_onnx_export.py --model ... prints it)")
    print("x FunASR, x best sherpa int8: how many times faster than that system (>1: faster); "
          "x roofline: the system's time over its compute type's GEMM-only time (for int8 "
          "types a kernel baseline: the same fbgemm call the model makes, not a hardware "
          "int8 peak; bench/roofline.py)")
    return best


def print_targets(flags: list[str], auto: str, seconds_list: list[int],
                  medians: dict[tuple[str, int], float],
                  rooflines: dict[tuple[str, int], float], best_sherpa: str | None) -> None:
    mine = f"ours {auto} (auto)"

    def check(label: str, value: float | None, passes: Callable[[float], bool]) -> None:
        if value is None:
            print(f"  {label}: not measured")
        else:
            print(f"  {label}: {value:.2f}x {'MET' if passes(value) else 'MISSED'}")

    def speedup(other: str | None, s: int) -> float | None:
        if other is None or (other, s) not in medians:
            return None
        return medians[other, s] / medians[mine, s]

    print("\ntargets (issue 16):")
    if "amx_bf16" in flags:
        for s in seconds_list:
            check(f"AMX: auto >= 3.5x FunASR fp32 at {s} s", speedup(FUNASR, s),
                  lambda v: v >= 3.5)
            check(f"AMX: auto >= 1.4x the fastest sherpa-onnx int8 at {s} s",
                  speedup(best_sherpa, s), lambda v: v >= 1.4)
            roof = rooflines.get(("bfloat16", s))
            check(f"AMX: auto within 2x of the bf16 GEMM roofline at {s} s (time over roofline)",
                  medians[mine, s] / roof if roof else None, lambda v: v <= 2.0)
    else:
        has = ", ".join(flags) or "none of " + ", ".join(SHOWN_FLAGS)
        print(f"  (no AMX here ({has}): the AVX2-only target applies)")
        for s in seconds_list:
            check(f"AVX2-only: auto >= 1.6x our float32 at {s} s", speedup("ours float32", s),
                  lambda v: v >= 1.6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True,
                        help="full-size official-layout model directory")
    parser.add_argument("--seconds", type=int, nargs="+", default=[10, 60])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--types", nargs="+", choices=CONCRETE_TYPES, default=None,
                        help="compute types to run (default: those this machine runs without "
                             "a warning, and auto's)")
    parser.add_argument("--skip-funasr", action="store_true")
    parser.add_argument("--skip-sherpa", action="store_true")
    parser.add_argument("--no-words", action="store_true", help="leave out the word-timestamps row")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1 or min(args.seconds) < 1:
        parser.error("--threads, --repeats and --seconds must be at least 1")
    try:
        official = model_files(args.model).layout == "official"
    except ModelFileError as e:
        parser.error(str(e))
    torch.set_num_threads(args.threads)

    cpu, flags = cpu_description()
    print(f"CPU: {cpu}; flags: {' '.join(flags) or 'none of ' + ' '.join(SHOWN_FLAGS)}; "
          f"torch capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"threads: {args.threads}; torch {torch.__version__}, onnxruntime "
          f"{version('onnxruntime')}, sherpa-onnx {version('sherpa-onnx')}, funasr "
          f"{version('funasr')}; model: {args.model}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a load above the "
          f"CPU count slows torch's multi-threaded runs far more than onnxruntime's: compare "
          f"on a quiet machine, or with --threads 1)")
    types, auto, notes = choose_types(args.types)
    for note in notes:
        print(note)

    base = load_model_dir(args.model)  # no L2 snapshot of the full-size model left behind
    systems: list[System] = []
    if not official:
        print("FunASR and sherpa-onnx: skipped: they read the official layout (model.pt + "
              f"config.yaml), {args.model} has the hf layout")
    elif not args.skip_funasr:
        funasr, line = funasr_system(args.model, args.threads, base)
        systems.append(funasr)
        print(line, flush=True)
    systems += our_systems(base, types, auto, words=not args.no_words)
    missing = missing_peers()
    if not official:
        pass
    elif args.skip_sherpa:
        print("sherpa-onnx: skipped (--skip-sherpa)")
    elif missing:
        print(f"sherpa-onnx: skipped, not installed: {', '.join(missing)} "
              f"(pip install -e '.[bench]')")
    else:
        systems += sherpa_systems(args.model, args.threads)
    torch.set_num_threads(args.threads)

    medians: dict[tuple[str, int], float] = {}
    rooflines: dict[tuple[str, int], float] = {}
    roofline_types = sorted(set(types) | ({"bfloat16"} if "amx_bf16" in flags else set()))
    for seconds in args.seconds:
        waveform = clip_of(seconds)
        frames = compute_features(waveform, base.frontend, base.cmvn).shape[0]
        runs = {system.name: system.run_for(waveform) for system in systems}
        gemms: list[RooflineRuns] = [roofline_runs(base.model.dims, frames, compute_type)
                                     for compute_type in roofline_types]
        for gemm in gemms:
            runs[f"gemm layer {gemm.compute_type}"] = gemm.layer
            runs[f"gemm head {gemm.compute_type}"] = gemm.head
        found = interleaved_medians(runs, args.repeats)
        for system in systems:
            medians[system.name, seconds] = found[system.name]
        for gemm in gemms:
            rooflines[gemm.compute_type, seconds] = gemm.seconds(
                found[f"gemm layer {gemm.compute_type}"], found[f"gemm head {gemm.compute_type}"])
        print(f"{seconds} s done: " + ", ".join(f"{name} {value:.3f} s"
                                               for name, value in found.items()), flush=True)
    for (compute_type, seconds), value in sorted(rooflines.items()):
        kind = "kernel baseline" if compute_type.startswith("int8") else "roofline"
        print(f"GEMM {kind} {compute_type} at {seconds} s: {value:.3f} s")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    best = print_table(systems, args.seconds, medians, rooflines)
    print_targets(flags, auto, args.seconds, medians, rooflines, best)


if __name__ == "__main__":
    main()
