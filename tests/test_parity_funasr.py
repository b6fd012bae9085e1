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
from funasr.models.sense_voice.utils.ctc_alignment import ctc_forced_align
from funasr.tokenizer.sentencepiece_tokenizer import SentencepiecesTokenizer

from sensevoice_core import SenseVoice, TranscribeOptions
from sensevoice_core.alignment import forced_align, required_frames
from sensevoice_core.audio import load_audio
from sensevoice_core.decoding import END_EXTENSION_FRAMES, greedy_runs
from sensevoice_core.frontend import CMVN, compute_features, stack_low_frame_rate
from sensevoice_core.layout import OFFICIAL_TOKENIZER
from sensevoice_core.loader import load_model_dir
from sensevoice_core.vocab import CTC_BLANK_ID, NUM_PROMPT_FRAMES

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


# --- token timestamps vs FunASR's output_timestamp=True ------------------------------------

WORDS = TranscribeOptions(word_timestamps=True)


def funasr_spans(log_probs: torch.Tensor, targets: list[int],
                 blank_hack: bool) -> list[tuple[int, int]]:
    """FunASR's ctc_forced_align on one item, read back as (first, last) frame per target, as
    its inference() groups the path; blank_hack: its zeroing of the blank's log-probability on
    frames whose argmax is blank."""
    from itertools import groupby

    log_probs = log_probs.clone()
    if blank_hack:
        log_probs[log_probs.argmax(-1) == CTC_BLANK_ID, CTC_BLANK_ID] = 0
    path = ctc_forced_align(log_probs[None], torch.tensor([targets]),
                            torch.tensor([log_probs.shape[0]]), torch.tensor([len(targets)]))[0]
    spans, start = [], 0
    for label, frames in groupby(path.tolist()):
        end = start + len(list(frames))
        if label != CTC_BLANK_ID:
            spans.append((start, end - 1))
        start = end
    return spans


@pytest.mark.parametrize("clip", CLIPS)
def test_our_alignment_of_the_emitted_ids_is_funasrs(ours, waveforms, clip):
    """Same log-probabilities, same targets (the ids greedy emitted after the prompt): FunASR's
    ctc_forced_align, with or without its blank tweak, puts every token on our frames, and our
    starts are its (max(0, 0.06 * first - 0.03)). Ends differ by design: FunASR ends a token
    with its last frame's cell; we extend through up to END_EXTENSION_FRAMES following blank
    frames (CTC is peaky; see decoding.py), never into the next token."""
    features = compute_features(waveforms[clip], ours.frontend, ours.cmvn)
    logits, lengths = ours.logits([features], WORDS)
    log_probs = torch.log_softmax(logits[0, NUM_PROMPT_FRAMES:], dim=-1)
    [runs] = greedy_runs(logits.argmax(-1), lengths)
    targets = [r.token_id for r in runs if r.first >= NUM_PROMPT_FRAMES]
    assert targets
    [mine] = forced_align(log_probs[None], lengths - NUM_PROMPT_FRAMES, [targets])
    for blank_hack in (False, True):
        assert [(s.first, s.last) for s in mine] == funasr_spans(log_probs, targets, blank_hack)
    [segment] = ours.decode([waveforms[clip]], WORDS)
    timed = [s for s, t in zip(mine, targets) if not ours.tokenizer.processor.IsControl(t)]
    assert len(segment.tokens) == len(timed)
    for token, span, following in zip(segment.tokens, timed, [*timed[1:], None]):
        assert token.start == round(max((span.first * 60 - 30) / 1000, 0), 3)
        funasr_end = (span.last + 1) * 60 - 30
        assert funasr_end / 1000 <= token.end <= (funasr_end + END_EXTENSION_FRAMES * 60) / 1000
        if following is not None:
            assert token.end <= round((following.first * 60 - 30) / 1000, 3)


@pytest.mark.parametrize("clip", CLIPS)
def test_funasr_times_re_tokenised_text_not_the_emitted_ids(ours, reference, waveforms, clip):
    """Why FunASR's inference(output_timestamp=True) disagrees with us on these clips. It does
    not align the emitted ids: it takes tokenizer.text2tokens(text)[4:] (the decoded text
    encoded again, minus 4 pieces taken to be the tags, though the model may not have emitted
    4 tags) and turns each piece back into ids by encoding it as text, which prefixes every
    piece with the dummy "▁" (and gives a piece that encodes to nothing its hard-coded id 124,
    an id of the official 25,055-piece vocabulary). Its targets thus hold about twice the
    tokens: out of range in this vocabulary (an error), or more than the frames can hold, and
    its Viterbi then returns a degenerate path (fewer timed tokens than pieces). Where the
    targets are the same, the alignments agree (the test above)."""
    captured: list[list] = []
    original_post = reference.model.post

    def post(timestamp):  # FunASR's per-token list, before it merges words
        captured.append([list(item) for item in timestamp])
        return original_post(timestamp)

    [segment] = ours.decode([waveforms[clip]], WORDS)
    processor = ours.tokenizer.processor
    emitted = iter(segment.token_ids)  # our tokens: emitted ids, in order
    assert all(any(token.id == i for i in emitted) for token in segment.tokens)
    assert [t.piece for t in segment.tokens] == [processor.IdToPiece(t.id) for t in segment.tokens]
    retokenised = reference.tokenizer.text2tokens(segment.raw)[4:]
    their_ids = [i for ids in reference.tokenizer.encode(retokenised) for i in (ids or [124])]
    word_mark = processor.PieceToId("\u2581")
    assert their_ids.count(word_mark) >= len(retokenised) - their_ids.count(124)
    assert len(their_ids) > len(segment.tokens)
    frames = compute_features(waveforms[clip], ours.frontend, ours.cmvn).shape[0]
    reference.model.post = post
    try:
        if max(their_ids) >= ours.tokenizer.vocab_size:
            with pytest.raises(RuntimeError, match="index 124 is out of bounds"):
                run_with_timestamps(reference, waveforms[clip])
            return
        [result] = run_with_timestamps(reference, waveforms[clip])
    finally:
        del reference.model.post
    assert result["text"] == segment.raw
    [theirs] = captured
    assert [piece for piece, _, _ in theirs] == retokenised[:len(theirs)]
    assert required_frames(their_ids) > frames
    assert len(theirs) < len(retokenised)


def run_with_timestamps(reference: Reference, waveform: torch.Tensor) -> list[dict]:
    with torch.no_grad():
        results, _ = reference.model.inference(
            data_in=[waveform], key=["utt"], tokenizer=reference.tokenizer,
            frontend=reference.frontend, language="auto", use_itn=False, device="cpu",
            output_timestamp=True)
    return results


def test_funasr_gives_punctuation_a_time_of_its_own_we_attach_it(reference):
    """FunASR's post() keeps "," as a word with its own start and end (and leaves the "▁" on
    the first word); words_of joins punctuation to the word before without extending that
    word's end."""
    from sensevoice_core.result import Token
    from sensevoice_core.words import words_of

    timestamp = [["▁hello", 0.09, 0.39], [",", 0.45, 0.51], ["▁world", 0.57, 0.87]]
    times, words = reference.model.post([list(t) for t in timestamp])
    assert (words, times) == (["▁hello", ",", "world"], [[90, 390], [450, 510], [570, 870]])
    ours = words_of([Token(id=i, piece=p, start=s, end=e, probability=1.0)
                     for i, (p, s, e) in enumerate(timestamp)])
    assert [(w.word, w.start, w.end) for w in ours] == [("hello,", 0.09, 0.39),
                                                        ("world", 0.57, 0.87)]
