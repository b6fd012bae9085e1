"""Train the embedded demo model: ``python -m training.train --out model``.

SenseVoice's own recipe at a small size: CTC on the text frames plus cross-entropy on the four
tag frames (language, emotion, event, text-norm). Each step draws, per utterance, the text-norm
style (so the ITN switch is learnt) and whether the language prompt is given or left ``auto``.
Clips with no speech are labelled ``<|nospeech|>`` with empty text. Where espeak-ng reported
each word's onset, CTC may emit a word's token only on the frames around that onset
(ALIGN_BEFORE..ALIGN_AFTER), so the model's token times are where the words are said.
Seeded end to end; the number of steps is fixed, so a run is reproducible, and sized for about
45 minutes on 2 CPU cores (47.7 min on the AMD EPYC that trained the shipped model). Ends with
the held-out figures per condition and writes an hf-layout model directory that
``sensevoice_core.load_model`` loads unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sensevoice_core.atomic import write_bytes_atomic
from sensevoice_core.config import FrontendConfig, SenseVoiceDims
from sensevoice_core.frontend import CMVN, fbank, pad_features, stack_low_frame_rate
from sensevoice_core.layout import HF_TOKENIZER
from sensevoice_core.loader import load_model_dir, save_model_dir
from sensevoice_core.long_audio import length_batches
from sensevoice_core.model import SenseVoiceSmall
from sensevoice_core.tokenizer import (
    Tokenizer,
    all_tag_pieces,
    build_sentencepiece_model,
)
from sensevoice_core.vocab import (
    CTC_BLANK_ID,
    LANGUAGE_QUERY_ROW,
    NUM_PROMPT_FRAMES,
    TEXT_NORM_QUERY_ROW,
    Language,
    TextNorm,
)
from training.corpus import vocabulary
from training.dataset import Clip, make_clips
from training.evaluate import evaluate, print_figures

SUMMARY_FILE = "training_summary.json"
DEFAULT_CACHE = Path.home() / ".cache" / "sensevoice-serve" / "training"
FRAME_S = 0.06  # one LFR frame
ALIGN_BEFORE, ALIGN_AFTER = 1, 2  # frames around a word's onset where its token may be emitted


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    train_clips: int = 8000
    held_out_clips: int = 400
    output_size: int = 192
    attention_heads: int = 4
    linear_units: int = 768
    num_blocks: int = 5
    tp_blocks: int = 1
    steps: int = 1650
    batch_frames: int = 4000  # padded LFR frames per batch (60 ms each)
    peak_lr: float = 2e-3
    warmup_steps: int = 200
    auto_language_rate: float = 0.5  # share of utterances prompted with language "auto"
    threads: int = 2


@dataclass
class Example:
    features: torch.Tensor  # (T, 560) LFR features before CMVN
    language: str  # "en", "zh" or "nospeech"
    event: str
    woitn: list[int]
    withitn: list[int]
    onsets: list[int] | None  # the LFR frame where each woitn token's word begins


def featurize(clips: list[Clip], frontend: FrontendConfig, tokenizer: Tokenizer) -> list[Example]:
    examples = []
    for clip in clips:
        stacked = stack_low_frame_rate(fbank(torch.from_numpy(clip.waveform), frontend),
                                       frontend.lfr_m, frontend.lfr_n)
        ids = [[_piece_id(tokenizer, p) for p in pieces] for pieces in (clip.woitn, clip.withitn)]
        onsets = None  # only where espeak-ng's words are the transcript's tokens, one to one
        if clip.word_starts is not None and len(clip.word_starts) == len(ids[0]):
            onsets = [round(t / FRAME_S) for t in clip.word_starts]
        examples.append(Example(stacked, clip.language, clip.event, ids[0], ids[1], onsets))
    return examples


def _piece_id(tokenizer: Tokenizer, piece: str) -> int:
    token_id = tokenizer.piece_id(piece)
    if token_id is None:
        raise ValueError(f"piece {piece!r} is missing from the demo vocabulary")
    return token_id


def estimate_cmvn(examples: list[Example]) -> CMVN:
    frames = torch.cat([e.features for e in examples])
    mean, std = frames.mean(dim=0), frames.std(dim=0).clamp_min(1e-3)
    return CMVN(shift=-mean, scale=1.0 / std)


def shuffled_batches(examples: list[Example], budget: int, rng: random.Random
                     ) -> list[list[int]]:
    lengths = [e.features.shape[0] for e in examples]
    batches = length_batches(lengths, budget)
    rng.shuffle(batches)
    return batches


def spec_augment(features: torch.Tensor, n_mels: int, generator: torch.Generator
                 ) -> torch.Tensor:
    """Mask a band of mel bins (the same in all stacked frames) and a short span of time."""
    frames = features.clone().view(features.shape[0], -1, n_mels)
    width = int(torch.randint(0, 16, (1,), generator=generator))
    start = int(torch.randint(0, n_mels - width + 1, (1,), generator=generator))
    frames[:, :, start:start + width] = 0.0
    span = int(torch.randint(0, 4, (1,), generator=generator))
    if features.shape[0] > span:
        begin = int(torch.randint(0, features.shape[0] - span + 1, (1,), generator=generator))
        frames[begin:begin + span] = 0.0
    return frames.view_as(features)


class TagIds:
    def __init__(self, tokenizer: Tokenizer):
        self.language = {lang: _piece_id(tokenizer, f"<|{lang}|>")
                         for lang in ("en", "zh", "nospeech")}
        self.emotion = {True: _piece_id(tokenizer, "<|NEUTRAL|>"),
                        False: _piece_id(tokenizer, "<|EMO_UNKNOWN|>")}
        self.event = {name: _piece_id(tokenizer, f"<|{name}|>")
                      for name in ("Speech", "BGM", "Event_UNK")}
        self.style = {norm: _piece_id(tokenizer, f"<|{norm.value}|>") for norm in TextNorm}


def training_step(model: SenseVoiceSmall, batch: list[Example], cmvn: CMVN, n_mels: int,
                  tags: TagIds, config: TrainConfig, rng: random.Random,
                  generator: torch.Generator) -> tuple[torch.Tensor, float, float]:
    features, lengths = pad_features(
        [spec_augment((e.features + cmvn.shift) * cmvn.scale, n_mels, generator) for e in batch])
    language_rows, style_rows, tag_targets, text_targets, aligned = [], [], [], [], []
    for example in batch:
        norm = rng.choice(list(TextNorm))
        given = rng.random() >= config.auto_language_rate
        speech = example.language != "nospeech"
        # A clip without speech is prompted with a random language when one is "given".
        spoken = example.language if speech else rng.choice(["en", "zh"])
        language = Language(spoken) if given else Language.AUTO
        language_rows.append(LANGUAGE_QUERY_ROW[language])
        style_rows.append(TEXT_NORM_QUERY_ROW[norm])
        tag_targets.append([tags.language[example.language], tags.emotion[speech],
                            tags.event[example.event], tags.style[norm]])
        with_itn = norm is TextNorm.WITH_ITN
        text_targets.append(example.withitn if with_itn else example.woitn)
        aligned.append(None if with_itn else example.onsets)
    logits, out_lengths = model(features, lengths, torch.tensor(language_rows),
                                torch.tensor(style_rows))
    prompt = NUM_PROMPT_FRAMES  # the tag frames: cross-entropy; the rest: CTC
    tag_loss = F.cross_entropy(logits[:, :prompt].reshape(-1, logits.shape[-1]),
                               torch.tensor(tag_targets).reshape(-1))
    log_probs = logits[:, prompt:].log_softmax(dim=-1).transpose(0, 1)  # (T, B, V)
    log_probs = restrict_to_onsets(log_probs, text_targets, aligned)
    ctc_loss = F.ctc_loss(
        log_probs, torch.tensor([t for target in text_targets for t in target]),
        out_lengths - prompt, torch.tensor([len(t) for t in text_targets]),
        blank=CTC_BLANK_ID, reduction="mean", zero_infinity=True)
    return ctc_loss + tag_loss, ctc_loss.item(), tag_loss.item()


def restrict_to_onsets(log_probs: torch.Tensor, targets: list[list[int]],
                       onsets: list[list[int] | None]) -> torch.Tensor:
    """Alignment-restricted CTC: for an utterance whose word onsets are known, a token may be
    emitted only on the frames ALIGN_BEFORE before to ALIGN_AFTER after its word's onset (blank
    anywhere). The softmax stays over every class, so the model learns to put the token there
    and blank elsewhere; a target the window makes impossible gives an infinite loss, zeroed."""
    if all(o is None for o in onsets):
        return log_probs
    allowed = torch.ones_like(log_probs, dtype=torch.bool)
    frames = log_probs.shape[0]
    for item, (ids, starts) in enumerate(zip(targets, onsets)):
        if starts is None:
            continue
        allowed[:, item, :] = False
        allowed[:, item, CTC_BLANK_ID] = True
        for token_id, onset in zip(ids, starts):
            first, last = max(0, onset - ALIGN_BEFORE), min(frames, onset + ALIGN_AFTER + 1)
            allowed[first:last, item, token_id] = True
    return log_probs.masked_fill(~allowed, float("-inf"))


def learning_rate(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.peak_lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.peak_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(config: TrainConfig, out_dir: Path, eval_dir: Path | None, cache_dir: Path) -> dict:
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    frontend = FrontendConfig()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_file = Path(scratch) / HF_TOKENIZER
        tokenizer_file.write_bytes(build_sentencepiece_model(vocabulary(), all_tag_pieces()))
        tokenizer = Tokenizer.from_file(tokenizer_file)

        print(f"synthesising {config.train_clips} train + {config.held_out_clips} held-out "
              f"clips (cache: {cache_dir}) ...", flush=True)
        train_clips = make_clips(config.train_clips, config.seed, "train", cache_dir,
                                 config.threads)
        held_out = make_clips(config.held_out_clips, config.seed, "held-out", cache_dir,
                              config.threads)
        hours = sum(c.waveform.size for c in train_clips) / 16000 / 3600
        generated = time.perf_counter() - started
        print(f"  {hours:.2f} h of training speech in {generated:.0f} s", flush=True)
        examples = featurize(train_clips, frontend, tokenizer)
        cmvn = estimate_cmvn(examples)
        tags = TagIds(tokenizer)

        dims = SenseVoiceDims(output_size=config.output_size,
                              attention_heads=config.attention_heads,
                              linear_units=config.linear_units, num_blocks=config.num_blocks,
                              tp_blocks=config.tp_blocks, vocab_size=tokenizer.vocab_size)
        model = SenseVoiceSmall(dims)
        parameters = sum(p.numel() for p in model.parameters())
        print(f"model: {parameters:,} parameters, {asdict(dims)}", flush=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.peak_lr, weight_decay=0.01)
        rng = random.Random(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        batches: list[list[int]] = []
        train_started = time.perf_counter()
        model.train()
        for step in range(config.steps):
            if not batches:
                batches = shuffled_batches(examples, config.batch_frames, rng)
            batch = [examples[i] for i in batches.pop()]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            loss, ctc, tag = training_step(model, batch, cmvn, frontend.n_mels, tags, config,
                                           rng, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            if step % 50 == 0 or step == config.steps - 1:
                elapsed = time.perf_counter() - train_started
                eta = elapsed / (step + 1) * (config.steps - step - 1)
                print(f"step {step:5d}/{config.steps}  ctc {ctc:7.3f}  tags {tag:6.3f}  "
                      f"lr {learning_rate(step, config):.2e}  {elapsed:6.0f} s  eta {eta:5.0f} s",
                      flush=True)
        training_s = time.perf_counter() - train_started
        model.eval()
        trained_dir = save_model_dir(Path(scratch) / "model", model, frontend, tokenizer_file,
                                     cmvn)
        # Just written: nothing to cache yet.
        figures = evaluate(load_model_dir(trained_dir), held_out, eval_dir)
        size = sum(p.stat().st_size for p in trained_dir.iterdir())
        summary = {"config": asdict(config), "parameters": parameters,
                   "train_hours": round(hours, 3), "generation_s": round(generated, 1),
                   "training_s": round(training_s, 1),
                   "total_s": round(time.perf_counter() - started, 1), "model_bytes": size,
                   **figures}
        (trained_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n",
                                                encoding="utf-8")
        install_model(trained_dir, out_dir)
    print_figures(summary)
    return summary


def install_model(trained_dir: Path, out_dir: Path) -> None:
    """Copy the model files into out_dir, each atomically; other files there (a README) stay."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(trained_dir.iterdir()):
        write_bytes_atomic(out_dir / path.name, path.read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--eval-set", type=Path,
                        help="also write a held-out evaluation set (FLAC + refs.json) here")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--train-clips", type=int, default=TrainConfig.train_clips)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--held-out-clips", type=int, default=TrainConfig.held_out_clips)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where rendered clips are kept between runs (default {DEFAULT_CACHE})")
    args = parser.parse_args()
    config = TrainConfig(steps=args.steps, train_clips=args.train_clips, seed=args.seed,
                         held_out_clips=args.held_out_clips)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    train(config, args.out, args.eval_set, args.cache)


if __name__ == "__main__":
    main()
