"""Our model computes what FunASR's reference SenseVoiceSmall computes, on the same weights.

FunASR (a dev dependency) is imported here only. Both sides get identical random weights (tiny
config, real config.yaml/am.mvn) and the real example clips; dither is 0 on both sides.
"""

from pathlib import Path

import pytest
import torch
import yaml
from funasr.frontends.wav_frontend import WavFrontend, apply_lfr, load_cmvn
from funasr.models.sense_voice.model import SenseVoiceSmall as FunASRSenseVoiceSmall
from funasr.tokenizer.sentencepiece_tokenizer import SentencepiecesTokenizer

from sensevoice_core import SenseVoice, TranscribeOptions
from sensevoice_core.audio import load_audio
from sensevoice_core.frontend import CMVN, compute_features, stack_low_frame_rate
from sensevoice_core.layout import OFFICIAL_TOKENIZER
from sensevoice_core.loader import load_model_dir
from sensevoice_core.vocab import CTC_BLANK_ID

CLIPS = ("en", "zh", "ja", "ko", "yue")
TOLERANCE = 1e-4


class Reference:
    """FunASR's model, frontend and tokenizer, built from the same directory as ours."""

    def __init__(self, model_dir: Path, vocab_size: int):
        config = yaml.safe_load((model_dir / "config.yaml").read_text(encoding="utf-8"))
        self.model = FunASRSenseVoiceSmall(
            encoder=config["encoder"], encoder_conf=config["encoder_conf"], input_size=560,
            vocab_size=vocab_size, **config["model_conf"],
        )
        state_dict = torch.load(model_dir / "model.pt", weights_only=True)
        self.model.load_state_dict(state_dict, strict=True)
        self.model.eval()
        frontend_conf = {k: v for k, v in config["frontend_conf"].items() if k != "cmvn_file"}
        self.frontend = WavFrontend(cmvn_file=str(model_dir / "am.mvn"), dither=0.0,
                                    **frontend_conf)
        self.tokenizer = SentencepiecesTokenizer(bpemodel=str(model_dir / OFFICIAL_TOKENIZER))
        self.captured: list[torch.Tensor] = []
        self.model.ctc.ctc_lo.register_forward_hook(
            lambda module, inputs, output: self.captured.append(output.detach().clone())
        )

    def features(self, waveforms: list[torch.Tensor]) -> list[torch.Tensor]:
        padded = torch.nn.utils.rnn.pad_sequence(waveforms, batch_first=True)
        feats, lengths = self.frontend(padded, torch.tensor([w.numel() for w in waveforms]))
        return [feats[i, : lengths[i]] for i in range(len(waveforms))]

    def run(self, waveforms: list[torch.Tensor], language: str, use_itn: bool):
        """Texts and CTC logits (one tensor for the whole batch) from FunASR's inference()."""
        self.captured.clear()
        with torch.no_grad():
            results, _ = self.model.inference(
                data_in=list(waveforms), key=[f"utt{i}" for i in range(len(waveforms))],
                tokenizer=self.tokenizer, frontend=self.frontend, language=language,
                use_itn=use_itn, device="cpu",
            )
        assert len(self.captured) == 1
        return [r["text"] for r in results], self.captured[0]


@pytest.fixture(scope="module")
def ours(official_dir: Path) -> SenseVoice:
    return load_model_dir(official_dir)


@pytest.fixture(scope="module")
def reference(official_dir: Path, ours: SenseVoice) -> Reference:
    return Reference(official_dir, ours.tokenizer.vocab_size)


@pytest.fixture(scope="module")
def waveforms(data_dir: Path) -> dict[str, torch.Tensor]:
    return {name: load_audio(data_dir / f"{name}.mp3") for name in CLIPS}


def greedy_path(log_probs: torch.Tensor) -> list[int]:
    """FunASR's decoding, restated: argmax, collapse repeats, drop blank."""
    best = torch.unique_consecutive(log_probs.argmax(dim=-1))
    return best[best != CTC_BLANK_ID].tolist()


@pytest.mark.parametrize("clip", CLIPS)
def test_features_match_funasr_on_real_clips(ours, reference, waveforms, clip):
    ours_features = compute_features(waveforms[clip], ours.frontend, ours.cmvn)
    (reference_features,) = reference.features([waveforms[clip]])
    assert ours_features.shape == reference_features.shape
    assert (ours_features - reference_features).abs().max().item() <= TOLERANCE


def test_lfr_matches_funasr_for_every_length():
    generator = torch.Generator().manual_seed(0)
    for frames in range(1, 50):
        fbank = torch.randn(frames, 80, generator=generator)
        expected = apply_lfr(fbank.clone(), 7, 6)
        assert torch.equal(stack_low_frame_rate(fbank, 7, 6), expected), frames


def test_cmvn_parse_matches_funasr(data_dir):
    path = data_dir / "official" / "am.mvn"
    ours = CMVN.from_kaldi_nnet(path)
    expected = load_cmvn(str(path))
    assert torch.equal(ours.shift, expected[0]) and torch.equal(ours.scale, expected[1])


@pytest.mark.parametrize("use_itn", [False, True])
@pytest.mark.parametrize("language", ["auto", "zh", "en"])
def test_batched_logits_tokens_and_text_match_funasr(ours, reference, waveforms, language,
                                                     use_itn):
    # Unequal lengths, so the batch is padded: a short cut of one clip among whole clips.
    batch = [waveforms["en"], waveforms["zh"][: 16000 * 2], waveforms["yue"]]
    texts, reference_logits = reference.run(batch, language, use_itn)
    options = TranscribeOptions(language=language, use_itn=use_itn)
    features = [compute_features(w, ours.frontend, ours.cmvn) for w in batch]
    logits, lengths = ours.logits(features, options)
    assert reference_logits.shape == logits.shape
    results = ours.decode(batch, options)  # the model's own output: no VAD
    for i, length in enumerate(lengths.tolist()):
        ours_log_probs = torch.log_softmax(logits[i, :length], dim=-1)
        reference_log_probs = torch.log_softmax(reference_logits[i, :length], dim=-1)
        assert (ours_log_probs - reference_log_probs).abs().max().item() <= TOLERANCE
        assert list(results[i].token_ids) == greedy_path(reference_log_probs)
        assert results[i].raw == texts[i]


@pytest.mark.parametrize("clip", CLIPS)
def test_single_input_matches_funasr(ours, reference, waveforms, clip):
    texts, reference_logits = reference.run([waveforms[clip]], "auto", False)
    [result] = ours.decode([waveforms[clip]], TranscribeOptions())
    features = compute_features(waveforms[clip], ours.frontend, ours.cmvn)
    logits, _ = ours.logits([features], TranscribeOptions())
    difference = torch.log_softmax(logits, -1) - torch.log_softmax(reference_logits, -1)
    assert difference.abs().max().item() <= TOLERANCE
    assert result.raw == texts[0]
    assert list(result.token_ids) == greedy_path(reference_logits[0])
