"""Random-weight models: for tests, benchmarks and the smoke run. They transcribe noise."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from sensevoice_core.config import FrontendConfig, SenseVoiceDims
from sensevoice_core.frontend import CMVN
from sensevoice_core.layout import HF_TOKENIZER
from sensevoice_core.loader import save_model_dir
from sensevoice_core.model import SenseVoiceSmall
from sensevoice_core.tokenizer import all_tag_pieces, build_sentencepiece_model

SMALL_NORMAL_PIECES = (
    ["\u2581", "\u2581the", "\u2581one", "\u2581two", "\u2581three", "\u2581hello"]
    + list("abcdefghijklmnopqrstuvwxyz")
    + list("0123456789.,?!'")
    + list("一二三四五六七八九十零你好世界是的我")
)
SMALL_VOCAB_SIZE = 3 + len(SMALL_NORMAL_PIECES) + len(all_tag_pieces())


def small_tokenizer_bytes() -> bytes:
    """A 96-piece vocabulary: a few words, letters, digits, CJK characters and every tag."""
    return build_sentencepiece_model(SMALL_NORMAL_PIECES, all_tag_pieces())


def small_dims(vocab_size: int = SMALL_VOCAB_SIZE) -> SenseVoiceDims:
    return SenseVoiceDims(output_size=64, attention_heads=4, linear_units=96, num_blocks=3,
                          tp_blocks=2, kernel_size=11, sanm_shift=0, vocab_size=vocab_size)


def random_model(dims: SenseVoiceDims, seed: int = 0) -> SenseVoiceSmall:
    """Every parameter random, LayerNorm scales and biases included (so parity means something)."""
    torch.manual_seed(seed)
    model = SenseVoiceSmall(dims)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
            elif name in ("ctc.ctc_lo.bias", "embed.weight"):
                parameter.normal_(0.0, 1.0)
    return model.eval()


def write_random_model(directory: Path, seed: int = 0, cmvn: CMVN | None = None) -> Path:
    """A small random model in the hf layout. Without cmvn, normalisation is the identity."""
    dims = small_dims()
    frontend = FrontendConfig()
    if cmvn is None:
        cmvn = CMVN(shift=torch.zeros(dims.input_size), scale=torch.ones(dims.input_size))
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_file = Path(scratch) / HF_TOKENIZER
        tokenizer_file.write_bytes(small_tokenizer_bytes())
        return save_model_dir(directory, random_model(dims, seed), frontend, tokenizer_file, cmvn)
