"""A CUDA check (not a test; CI has no GPU): the model runs on a GPU and agrees with the CPU.

    python bench/gpu_check.py

1. A tiny random model, loaded fresh and through L2 onto cuda, gives the CPU's token ids on a
   real clip, and logits within tolerance.
2. The full official size (random weights, in memory): max logit difference GPU vs CPU, and the
   GPU's real-time factor on 10 s and 60 s of audio, fp32 and bf16 autocast.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from sensevoice_core import Settings, load_sensevoice_cached
from sensevoice_core.audio import load_audio
from sensevoice_core.loader import load_model_dir
from sensevoice_core.config import FrontendConfig, SenseVoiceDims
from sensevoice_core.frontend import CMVN, compute_features
from sensevoice_core.random_model import random_model, write_random_model

CLIP = Path(__file__).resolve().parent.parent / "tests" / "data" / "en.mp3"


def tiny_model_agrees(scratch: Path) -> None:
    model_dir = write_random_model(scratch / "tiny")
    cpu = load_model_dir(model_dir)
    gpu = load_model_dir(model_dir, device="cuda")
    settings = Settings(cache_dir=scratch / "cache", device="cuda")
    load_sensevoice_cached(model_dir, settings=settings)
    cached, report = load_sensevoice_cached(model_dir, settings=settings)
    assert report.level == "L2", report.level
    expected = cpu.transcribe(CLIP)
    for name, model in (("fresh", gpu), ("L2", cached)):
        result = model.transcribe(CLIP)
        assert result.token_ids == expected.token_ids, name
        print(f"tiny model on cuda ({name}): same {len(result.token_ids)} token ids as the CPU")


def full_size(seconds_list: tuple[int, ...] = (10, 60)) -> None:
    model = random_model(SenseVoiceDims(), seed=0)
    speech = load_audio(CLIP)
    identity = CMVN(shift=torch.zeros(560), scale=torch.ones(560))
    gpu_model = random_model(SenseVoiceDims(), seed=0).to("cuda")
    for seconds in seconds_list:
        waveform = speech.repeat(seconds * 16000 // speech.numel() + 1)[: seconds * 16000]
        features = compute_features(waveform, FrontendConfig(), identity)
        lengths = torch.tensor([features.shape[0]])
        rows = torch.zeros(1, dtype=torch.long)
        with torch.inference_mode():
            cpu_logits, _ = model(features[None], lengths, rows, rows + 15)
            gpu_logits, _ = gpu_model(features[None].cuda(), lengths.cuda(), rows.cuda(),
                                      rows.cuda() + 15)
            difference = (cpu_logits - gpu_logits.cpu()).abs().max().item()
            timings = {}
            for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                for _ in range(3):
                    _run(gpu_model, features, lengths, rows, dtype)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(10):
                    _run(gpu_model, features, lengths, rows, dtype)
                torch.cuda.synchronize()
                timings[label] = (time.perf_counter() - start) / 10
        print(f"full size, {seconds} s: max |logit| difference GPU vs CPU {difference:.2e}; "
              f"GPU RTF fp32 {timings['fp32'] / seconds:.5f}, "
              f"bf16 {timings['bf16'] / seconds:.5f} (encoder + CTC head, features given)")


def _run(model, features, lengths, rows, dtype) -> None:
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        model(features[None].cuda(), lengths.cuda(), rows.cuda(), rows.cuda() + 15)


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    with tempfile.TemporaryDirectory() as scratch:
        tiny_model_agrees(Path(scratch))
    full_size()


if __name__ == "__main__":
    main()
