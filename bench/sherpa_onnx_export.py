"""sherpa-onnx as a peer for bench/rtf.py: export a model directory to ONNX the way sherpa-onnx's
own script does (k2-fsa/sherpa-onnx scripts/sense-voice/export-onnx.py), and run it.

    python bench/sherpa_onnx_export.py --model /tmp/full    # export (cached) + agreement check

What that script does, and so what this does (our own code, same steps):
- FunASR's SenseVoiceSmall, loaded from the model directory, with a forward over
  (x: (N, T, 560) LFR+CMVN features, x_length: (N,) int32, language: (N,) int32, text_norm:
  (N,) int32): the language, event+emotion ([[1, 2]]) and text-norm query rows prepended,
  x_length + 4, FunASR's encoder, then ``ctc.ctc_lo`` (logits, no log-softmax);
- torch.onnx.export with the TorchScript exporter, opset 13, N and T dynamic;
- metadata sherpa-onnx's C++ reads (lfr_window_size/shift, normalize_samples 0, neg_mean and
  inv_stddev from am.mvn, lang_* and with_itn/without_itn query rows, vocab_size, ...);
- tokens.txt: "piece id" per line, from the sentencepiece model;
- onnxruntime.quantization.quantize_dynamic over MatMul with QUInt8 weights, as shipped
  (model.int8.onnx); and, beyond the script, QInt8 weights (model.qint8.onnx), which the issue
  measured as the fastest peer on AVX-512 (the script's comment says QInt8 gave wrong results
  in C++ onnxruntime back then; check_agreement tells whether it does here).

The export lands in a cache directory (never the repository), keyed by the model files, the
export code's version and the library versions, so a second run reuses it. sherpa-onnx,
onnxruntime and onnx are the project's optional ``bench`` extra; ``missing_peers()`` says what
is absent so the benchmark can skip the peers cleanly.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from sensevoice_core.layout import model_files
from sensevoice_core.loader import load_model_dir
from sensevoice_core.pipeline import SenseVoice
from sensevoice_core.tokenizer import Tokenizer
from sensevoice_core.vocab import (
    EMOTION_QUERY_ROW,
    EVENT_QUERY_ROW,
    LANGUAGE_QUERY_ROW,
    NUM_PROMPT_FRAMES,
    TEXT_NORM_QUERY_ROW,
    Language,
    TextNorm,
)

EXPORT_VERSION = 1  # bump when the exported graph or its metadata change
PEER_MODULES = ("sherpa_onnx", "onnxruntime", "onnx", "funasr")
# variant -> file, in the order the benchmark prints them
VARIANTS = {
    "fp32": "model.onnx",
    "int8 QUInt8 (as shipped)": "model.int8.onnx",
    "int8 QInt8": "model.qint8.onnx",
}
CLIPS_DIR = Path(__file__).resolve().parent.parent / "tests" / "data"
CLIP_NAMES = ("en", "zh", "ja", "ko", "yue")


class ExportError(ValueError):
    """A model directory this export cannot take; the message names it."""


def missing_peers() -> list[str]:
    """The modules the sherpa-onnx peer needs that are not installed (``pip install -e
    '.[bench]'``); empty when it can run."""
    return [name for name in PEER_MODULES if importlib.util.find_spec(name) is None]


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sensevoice-serve" / "bench" / "sherpa-onnx"


@dataclass(frozen=True)
class SherpaExport:
    directory: Path

    @property
    def tokens(self) -> Path:
        return self.directory / "tokens.txt"

    def model(self, variant: str) -> Path:
        return self.directory / VARIANTS[variant]


class PromptedCTC(nn.Module):
    """FunASR's SenseVoiceSmall as sherpa-onnx's script exports it: query rows prepended,
    encoder, CTC projection. Holds the FunASR modules; the AutoModel is left untouched."""

    def __init__(self, funasr_model: nn.Module):
        super().__init__()
        self.embed = funasr_model.embed
        self.encoder = funasr_model.encoder
        self.ctc_lo = funasr_model.ctc.ctc_lo

    def forward(self, x: Tensor, x_length: Tensor, language: Tensor, text_norm: Tensor) -> Tensor:
        language_query = self.embed(language).unsqueeze(1)
        text_norm_query = self.embed(text_norm).unsqueeze(1)
        event_emotion = torch.tensor([[EVENT_QUERY_ROW, EMOTION_QUERY_ROW]])
        event_emotion_query = self.embed(event_emotion).repeat(x.size(0), 1, 1)
        x = torch.cat((language_query, event_emotion_query, text_norm_query, x), dim=1)
        encoded = self.encoder(x, x_length + NUM_PROMPT_FRAMES)[0]
        return self.ctc_lo(encoded)


def cache_key(model_dir: Path) -> str:
    """Model files (path, size, mtime), this code's version and the library versions."""
    import onnxruntime

    files = model_files(model_dir)
    digest = hashlib.sha256(f"{EXPORT_VERSION} torch {torch.__version__} "
                            f"onnxruntime {onnxruntime.__version__}".encode())
    for path in (files.weights, files.config, files.cmvn, files.tokenizer):
        stat = path.resolve().stat()
        digest.update(f"{path.resolve()} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def kaldi_cmvn_rows(am_mvn: Path) -> tuple[str, str]:
    """The <AddShift> and <Rescale> rows of am.mvn as comma-joined text (neg_mean, inv_stddev),
    as sherpa-onnx's metadata carries them."""
    rows = [line.split()[3:-1] for line in am_mvn.read_text(encoding="utf-8").splitlines()
            if line.startswith("<LearnRateCoef>")]
    if len(rows) != 2:
        raise ExportError(f"{am_mvn}: expected 2 <LearnRateCoef> rows, found {len(rows)}")
    return ",".join(rows[0]), ",".join(rows[1])


def metadata(model_dir: Path, vocab_size: int, lfr_m: int, lfr_n: int) -> dict[str, str]:
    neg_mean, inv_stddev = kaldi_cmvn_rows(model_files(model_dir).cmvn)
    languages = {f"lang_{lang.value}": LANGUAGE_QUERY_ROW[lang] for lang in Language}
    return {key: str(value) for key, value in {
        "lfr_window_size": lfr_m, "lfr_window_shift": lfr_n,
        "normalize_samples": 0,  # sherpa-onnx scales samples to the int16 range itself
        "neg_mean": neg_mean, "inv_stddev": inv_stddev,
        "model_type": "sense_voice_ctc", "version": 2,  # 2: QUInt8, as the script writes
        "model_author": "iic", "maintainer": "k2-fsa", "vocab_size": vocab_size,
        "comment": f"benchmark export of {model_dir}", **languages,
        "with_itn": TEXT_NORM_QUERY_ROW[TextNorm.WITH_ITN],
        "without_itn": TEXT_NORM_QUERY_ROW[TextNorm.WITHOUT_ITN],
    }.items()}


def write_tokens(tokenizer: Tokenizer, path: Path) -> None:
    processor = tokenizer.processor
    lines = [f"{processor.IdToPiece(i)} {i}\n" for i in range(tokenizer.vocab_size)]
    path.write_text("".join(lines), encoding="utf-8")


def _export_into(model_dir: Path, target: Path) -> None:
    import onnx
    from funasr import AutoModel
    from onnxruntime.quantization import QuantType, quantize_dynamic

    automodel = AutoModel(model=str(model_dir), device="cpu", disable_update=True,
                          disable_pbar=True, disable_log=True)
    wrapper = PromptedCTC(automodel.model).eval()
    frontend = automodel.kwargs["frontend"]
    tokenizer = Tokenizer.from_file(model_files(model_dir).tokenizer)
    write_tokens(tokenizer, target / "tokens.txt")
    fp32 = target / VARIANTS["fp32"]
    example = (torch.randn(2, 100, wrapper.embed.embedding_dim),
               torch.tensor([80, 100], dtype=torch.int32),
               torch.tensor([0, 3], dtype=torch.int32), torch.tensor([14, 15], dtype=torch.int32))
    with torch.no_grad():
        torch.onnx.export(
            wrapper, example, str(fp32), dynamo=False, opset_version=13,
            input_names=["x", "x_length", "language", "text_norm"], output_names=["logits"],
            dynamic_axes={"x": {0: "N", 1: "T"}, "x_length": {0: "N"}, "language": {0: "N"},
                          "text_norm": {0: "N"}, "logits": {0: "N", 1: "T"}})
    exported = onnx.load(str(fp32))
    del exported.metadata_props[:]
    for key, value in metadata(model_dir, tokenizer.vocab_size, frontend.lfr_m,
                               frontend.lfr_n).items():
        exported.metadata_props.add(key=key, value=value)
    onnx.save(exported, str(fp32))
    del exported
    quiet = logging.getLogger()  # quantize_dynamic logs a line per tensor at INFO
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for variant, weight_type in (("int8 QUInt8 (as shipped)", QuantType.QUInt8),
                                     ("int8 QInt8", QuantType.QInt8)):
            quantize_dynamic(model_input=str(fp32), model_output=str(target / VARIANTS[variant]),
                             op_types_to_quantize=["MatMul"], weight_type=weight_type)
    finally:
        quiet.setLevel(level)


def export(model_dir: Path, cache_root: Path | None = None) -> SherpaExport:
    """The sherpa-onnx export of model_dir, built on the first call (minutes at full size)."""
    missing = missing_peers()
    if missing:
        raise RuntimeError(f"sherpa-onnx export needs {', '.join(missing)}: "
                           "pip install -e '.[bench]'")
    layout = model_files(model_dir).layout
    if layout != "official":
        raise ExportError(f"{model_dir}: sherpa-onnx's export reads the official layout "
                         f"(model.pt + config.yaml) through FunASR; this one is {layout}")
    root = cache_root or default_cache_root()
    done = root / cache_key(model_dir)
    if all((done / name).is_file() for name in (*VARIANTS.values(), "tokens.txt")):
        return SherpaExport(done)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        _export_into(model_dir, staging)
        shutil.rmtree(done, ignore_errors=True)
        staging.rename(done)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"sherpa-onnx export of {model_dir} -> {done} ({time.perf_counter() - started:.0f} s)",
          flush=True)
    return SherpaExport(done)


def recognizer(exported: SherpaExport, variant: str, threads: int):  # -> OfflineRecognizer
    import sherpa_onnx

    return sherpa_onnx.OfflineRecognizer.from_sense_voice(
        model=str(exported.model(variant)), tokens=str(exported.tokens), num_threads=threads,
        language="", use_itn=False)  # auto language, no ITN: TranscribeOptions' defaults


def sherpa_transcribe(engine, waveform: Tensor) -> tuple[list[str], list[str]]:
    """One clip through sherpa-onnx: its three tags (language, emotion, event) and its text
    pieces (sherpa-onnx drops the four prompt answers from ``tokens``; "\u2581" shows as " ")."""
    stream = engine.create_stream()
    stream.accept_waveform(16000, waveform.numpy().astype(np.float32))
    engine.decode_stream(stream)
    result = stream.result
    return [result.lang, result.emotion, result.event], list(result.tokens)


def graph_best_path(session, features: Tensor) -> Tensor:
    """The exported graph's argmax per output frame (4 prompt frames + T) on our features:
    checks the export alone, apart from sherpa-onnx's frontend."""
    logits = session.run(["logits"], {
        "x": features[None].numpy(), "x_length": np.array([features.shape[0]], np.int32),
        "language": np.array([LANGUAGE_QUERY_ROW[Language.AUTO]], np.int32),
        "text_norm": np.array([TEXT_NORM_QUERY_ROW[TextNorm.WITHOUT_ITN]], np.int32)})[0]
    return torch.from_numpy(logits[0]).argmax(-1)


def check_agreement(ours: SenseVoice, exported: SherpaExport, threads: int) -> list[str]:
    """Per variant, on how many of the 5 clips the export's token ids equal ours in fp32:
    as a graph on our features, and through sherpa-onnx end to end (its own frontend:
    kaldi-native-fbank, LFR and CMVN from the metadata); and the share of frames whose argmax
    is fp32's (random weights have margins of ~0.1, so int8 changes some frames' winners)."""
    import onnxruntime

    from sensevoice_core.audio import load_audio
    from sensevoice_core.decoding import greedy_runs
    from sensevoice_core.frontend import compute_features
    from sensevoice_core.options import TranscribeOptions

    lines = []
    for variant in VARIANTS:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(exported.model(variant)), options,
                                               providers=["CPUExecutionProvider"])
        engine = recognizer(exported, variant, threads)
        graph_same, sherpa_same, frames_same, frames = 0, 0, 0, 0
        for name in CLIP_NAMES:
            waveform = load_audio(CLIPS_DIR / f"{name}.mp3")
            mine = list(ours.decode([waveform], TranscribeOptions())[0].token_ids)
            features = compute_features(waveform, ours.frontend, ours.cmvn)
            mine_best = ours.logits([features], TranscribeOptions())[0][0].argmax(-1)
            best = graph_best_path(session, features)
            [runs] = greedy_runs(best[None], torch.tensor([best.numel()]))
            graph_same += [run.token_id for run in runs] == mine
            frames_same += int((best == mine_best).sum())
            frames += best.numel()
            tags, pieces = sherpa_transcribe(engine, waveform)
            # sherpa-onnx's symbol table shows sentencepiece's word mark as a space
            mine_pieces = [ours.tokenizer.processor.IdToPiece(i).replace("\u2581", " ")
                           for i in mine]
            sherpa_same += (tags == mine_pieces[:3] and pieces == mine_pieces[4:])
        lines.append(f"sherpa-onnx {variant}: token ids equal ours (fp32) on "
                     f"{graph_same}/{len(CLIP_NAMES)} clips as a graph on our features, "
                     f"{sherpa_same}/{len(CLIP_NAMES)} end to end; "
                     f"{100 * frames_same / frames:.1f}% of frames keep fp32's argmax")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="official-layout model dir")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=None,
                        help=f"export cache (default {default_cache_root()})")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    missing = missing_peers()
    if missing:
        raise SystemExit(f"not installed: {', '.join(missing)} (pip install -e '.[bench]')")
    torch.set_num_threads(args.threads)
    try:
        exported = export(args.model, args.cache)
    except ExportError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"export: {exported.directory}")
    for line in check_agreement(load_model_dir(args.model), exported, args.threads):
        print(line, flush=True)


if __name__ == "__main__":
    main()
