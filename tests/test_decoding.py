"""Greedy CTC decoding, tag parsing into a Segment, and the tokenizer's tag lookup by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sensevoice_core import Result, Segment
from sensevoice_core.decoding import greedy_runs, to_segment
from sensevoice_core.errors import ModelFileError
from sensevoice_core.random_model import SMALL_NORMAL_PIECES, small_tokenizer_bytes
from sensevoice_core.tokenizer import Tokenizer, all_tag_pieces, build_sentencepiece_model
from sensevoice_core.vocab import (
    EMOTION_TAGS,
    EVENT_TAGS,
    LANGUAGE_TAGS,
    TEXT_NORM_TAGS,
    tag_piece,
)

ALL_TAG_NAMES = (*LANGUAGE_TAGS, *EMOTION_TAGS, *EVENT_TAGS, *TEXT_NORM_TAGS)
VOCAB = 6


def logits_for(paths: list[list[int]], vocab_size: int = VOCAB) -> torch.Tensor:
    """(B, T, V) logits whose argmax at each frame is the given id; paths share one length T."""
    frames = len(paths[0])
    noise = torch.Generator().manual_seed(0)
    logits = torch.rand(len(paths), frames, vocab_size, generator=noise)  # below the winner's 5.0
    for b, path in enumerate(paths):
        for t, token_id in enumerate(path):
            logits[b, t, token_id] = 5.0
    return logits


def decode(paths: list[list[int]], lengths: list[int] | None = None, **kwargs) -> list[list[int]]:
    lengths = lengths if lengths is not None else [len(p) for p in paths]
    runs = greedy_runs(logits_for(paths).argmax(dim=-1), torch.tensor(lengths), **kwargs)
    return [[run.token_id for run in item] for item in runs]


def write_tokenizer(path: Path, data: bytes) -> Tokenizer:
    path.write_bytes(data)
    return Tokenizer.from_file(path)


@pytest.fixture
def tokenizer(tmp_path) -> Tokenizer:
    return write_tokenizer(tmp_path / "small.model", small_tokenizer_bytes())


@pytest.fixture
def reversed_tokenizer(tmp_path) -> Tokenizer:
    data = build_sentencepiece_model(SMALL_NORMAL_PIECES, reversed(all_tag_pieces()))
    return write_tokenizer(tmp_path / "reversed.model", data)


def tag_ids(tokenizer: Tokenizer, *names: str) -> list[int]:
    ids = [tokenizer.piece_id(tag_piece(name)) for name in names]
    assert None not in ids
    return ids


# --- greedy_runs ---------------------------------------------------------------------------


def test_repeats_collapse():
    assert decode([[1, 1, 1, 2, 2, 3]]) == [[1, 2, 3]]


def test_blanks_drop():
    assert decode([[0, 1, 0, 0, 2, 0]]) == [[1, 2]]


def test_repeat_separated_by_blank_is_kept_twice():
    assert decode([[3, 3, 0, 3, 0, 0]]) == [[3, 3]]


def test_repeat_then_blank_then_repeat_run():
    assert decode([[4, 4, 0, 0, 4, 4, 5, 5, 0, 5]]) == [[4, 4, 5, 5]]


def test_all_blank_gives_an_empty_sequence():
    assert decode([[0, 0, 0, 0]]) == [[]]


def test_frames_beyond_an_items_length_are_ignored():
    paths = [
        [1, 2, 2, 0, 3, 4],  # full length
        [5, 0, 5, 1, 2, 3],  # length 3: only 5, blank, 5 count
        [2, 2, 4, 4, 4, 4],  # length 0: nothing counts
    ]
    assert decode(paths, lengths=[6, 3, 0]) == [[1, 2, 3, 4], [5, 5], []]


def test_a_repeat_across_the_length_boundary_is_not_collapsed_into_padding():
    # Item 1's real frames end in 2; the padding continues with 2 and then a new id.
    assert decode([[1, 2, 3, 4], [1, 2, 2, 4]], lengths=[4, 2]) == [[1, 2, 3, 4], [1, 2]]


def test_batch_items_are_independent():
    single = [decode([[1, 0, 1, 2]]), decode([[3, 3, 0, 0]])]
    together = decode([[1, 0, 1, 2], [3, 3, 0, 0]])
    assert together == [single[0][0], single[1][0]]


def test_custom_blank_id():
    assert decode([[5, 1, 5, 1, 0, 0]], blank_id=5) == [[1, 1, 0]]


def test_results_are_plain_python_ints():
    (sequence,) = decode([[1, 2, 0, 3]])
    assert all(type(token_id) is int for token_id in sequence)


# --- to_segment ----------------------------------------------------------------------------


def test_tags_and_text_are_parsed(tokenizer):
    ids = tag_ids(tokenizer, "en", "HAPPY", "BGM", "withitn") + tokenizer.encode("hello")

    segment = to_segment(ids, tokenizer, start=2.0, end=3.25)

    assert isinstance(segment, Segment)
    assert (segment.start, segment.end) == (2.0, 3.25)
    assert segment.language == "en"
    assert segment.emotion == "HAPPY"
    assert segment.event == "BGM"
    assert segment.text == "hello"
    assert segment.raw == tokenizer.decode(ids)
    assert segment.raw.startswith("<|en|><|HAPPY|><|BGM|><|withitn|>")
    assert segment.token_ids == tuple(ids)
    assert Result.from_segments([segment], 4.0, "withitn").rich_text == "🎼hello😊"


def test_no_tags_gives_none_fields(tokenizer):
    ids = tokenizer.encode("hello")

    segment = to_segment(ids, tokenizer, 0.0, 0.5)

    assert (segment.language, segment.emotion, segment.event) == (None,) * 3
    assert segment.text == "hello"
    assert segment.raw == tokenizer.decode(ids)
    assert Result.from_segments([segment], 0.5, "woitn").rich_text == "hello"


def test_empty_sequence(tokenizer):
    segment = to_segment([], tokenizer, 0.0, 0.0)
    assert segment.text == segment.raw == ""
    assert segment.token_ids == ()
    assert segment.language is None


def test_tags_between_words_are_removed_from_text(tokenizer):
    ids = (tag_ids(tokenizer, "zh") + tokenizer.encode("one") + tag_ids(tokenizer, "Laughter")
           + tokenizer.encode("two"))

    segment = to_segment(ids, tokenizer, 0.0, 1.0)

    assert "<|" not in segment.text and "|>" not in segment.text
    assert "one" in segment.text and "two" in segment.text
    assert segment.language == "zh"
    assert segment.event == "Laughter"
    assert Result.from_segments([segment], 1.0, "woitn").rich_text == "😀" + segment.text


def test_the_first_tag_of_each_kind_wins(tokenizer):
    ids = tag_ids(tokenizer, "ja", "SAD", "Cough", "woitn", "ko", "ANGRY", "Sneeze", "withitn")
    segment = to_segment(ids, tokenizer, 0.0, 1.0)
    assert (segment.language, segment.emotion, segment.event) == ("ja", "SAD", "Cough")


def test_tags_without_emoji_leave_rich_text_plain(tokenizer):
    ids = tag_ids(tokenizer, "en", "NEUTRAL", "Speech", "woitn") + tokenizer.encode("hello")
    segment = to_segment(ids, tokenizer, 0.0, 1.0)
    assert segment.emotion == "NEUTRAL" and segment.event == "Speech"
    assert Result.from_segments([segment], 1.0, "woitn").rich_text == "hello"


def test_a_result_is_json_serialisable(tokenizer):
    ids = tag_ids(tokenizer, "en", "HAPPY", "BGM", "withitn") + tokenizer.encode("hello")
    result = Result.from_segments([to_segment(ids, tokenizer, 0.0, 2.5)], 2.5, "withitn")

    data = result.model_dump(mode="json")
    round_trip = json.loads(json.dumps(data, ensure_ascii=False))

    assert round_trip == data and Result.model_validate(round_trip) == result
    assert data["token_ids"] == ids
    assert (data["text"], data["language"], data["emotion"], data["event"]) == (
        "hello", "en", "HAPPY", "BGM")
    assert data["segments"][0]["raw"] == result.raw


def test_a_result_without_tags_has_nulls(tokenizer):
    result = Result.from_segments([to_segment(tokenizer.encode("hello"), tokenizer, 0.0, 1.0)],
                                  1.0, "woitn")
    assert json.loads(result.model_dump_json())["language"] is None


# --- Tokenizer tag lookup -----------------------------------------------------------------


def test_tag_names_cover_every_tag(tokenizer):
    assert sorted(tokenizer.tag_names.values()) == sorted(ALL_TAG_NAMES)
    for token_id, name in tokenizer.tag_names.items():
        assert tokenizer.processor.IdToPiece(token_id) == tag_piece(name)


def test_tag_lookup_follows_piece_names_not_ids(tokenizer, reversed_tokenizer):
    assert tokenizer.vocab_size == reversed_tokenizer.vocab_size
    assert sorted(reversed_tokenizer.tag_names.values()) == sorted(ALL_TAG_NAMES)
    # The same tag has a different id in the two vocabularies ...
    assert tokenizer.piece_id("<|en|>") != reversed_tokenizer.piece_id("<|en|>")
    assert tokenizer.tag_names != reversed_tokenizer.tag_names
    # ... and each vocabulary maps its own id back to the name.
    for name in ALL_TAG_NAMES:
        for tok in (tokenizer, reversed_tokenizer):
            assert tok.tag_names[tok.piece_id(tag_piece(name))] == name


def test_segments_follow_names_in_a_reordered_vocabulary(tokenizer, reversed_tokenizer):
    names = ("en", "HAPPY", "BGM", "withitn")
    segments = []
    for tok in (tokenizer, reversed_tokenizer):
        ids = tag_ids(tok, *names) + tok.encode("hello")
        segments.append(to_segment(ids, tok, 0.0, 1.0))
    small, reordered = segments

    assert small.token_ids != reordered.token_ids
    for segment in segments:
        assert (segment.language, segment.emotion, segment.event) == names[:3]
        assert segment.text == "hello"
    assert small.raw == reordered.raw


def test_the_small_vocabularys_ids_mean_other_tags_in_the_reordered_one(tokenizer,
                                                                        reversed_tokenizer):
    ids = tag_ids(tokenizer, "en", "HAPPY", "BGM", "withitn")
    reread = to_segment(ids, reversed_tokenizer, 0.0, 1.0)
    assert reread.raw == reversed_tokenizer.decode(ids)
    assert reread.raw != tokenizer.decode(ids)
    assert [reversed_tokenizer.tag_names[i] for i in ids] != ["en", "HAPPY", "BGM", "withitn"]


def test_a_vocabulary_without_tags_has_no_tag_names(tmp_path):
    data = build_sentencepiece_model(SMALL_NORMAL_PIECES, [])
    plain = write_tokenizer(tmp_path / "plain.model", data)
    assert plain.tag_names == {}
    assert plain.piece_id("<|en|>") is None
    segment = to_segment(plain.encode("hello"), plain, 0.0, 1.0)
    assert segment.language is None and segment.text == "hello"


def test_piece_id_of_unknown_piece_is_none_and_unk_is_found(tokenizer):
    assert tokenizer.piece_id("<|klingon|>") is None
    assert tokenizer.piece_id("<unk>") == 0


# --- Tokenizer.from_file errors -----------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"this is not a sentencepiece model\n" * 10, b"", bytes(range(256)) * 4],
    ids=["text", "empty", "binary"],
)
def test_non_sentencepiece_file_raises_model_file_error(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)

    with pytest.raises(ModelFileError) as caught:
        Tokenizer.from_file(path)

    assert caught.value.path == path
    assert str(path) in str(caught.value)
    assert "sentencepiece" in str(caught.value)


def test_missing_tokenizer_file_raises_model_file_error(tmp_path):
    path = tmp_path / "absent.model"
    with pytest.raises(ModelFileError) as caught:
        Tokenizer.from_file(path)
    assert str(path) in str(caught.value)
