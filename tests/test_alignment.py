"""CTC forced alignment (sensevoice_core.alignment) on hand-made log-probability matrices."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sensevoice_core.alignment import TokenSpan, forced_align, required_frames

VOCAB = 5  # 0 is the blank


def frames(*rows: dict[int, float]) -> torch.Tensor:
    """(T, V) log-probabilities: each row gives some tokens' probabilities, the rest of the
    mass is spread evenly over the other ids."""
    out = torch.empty(len(rows), VOCAB)
    for t, row in enumerate(rows):
        rest = (1.0 - sum(row.values())) / (VOCAB - len(row))
        out[t] = torch.tensor([row.get(v, rest) for v in range(VOCAB)]).log()
    return out


def align(matrix: torch.Tensor, targets: list[int]) -> list[TokenSpan]:
    return forced_align(matrix[None], torch.tensor([matrix.shape[0]]), [targets])[0]


def spans(result: list[TokenSpan]) -> list[tuple[int, int]]:
    return [(s.first, s.last) for s in result]


def test_each_token_gets_the_frames_where_it_is_likely():
    m = frames({1: 0.9}, {1: 0.8}, {0: 0.9}, {2: 0.7}, {0: 0.9}, {3: 0.6}, {3: 0.9})
    result = align(m, [1, 2, 3])
    assert spans(result) == [(0, 1), (3, 3), (5, 6)]
    assert [s.probability for s in result] == pytest.approx([0.9, 0.7, 0.9])


def test_two_equal_tokens_need_a_blank_between_them():
    # Frame 1 favours 1 again, but a repeat there would merge into one token: the best path
    # must leave a blank between the two 1s somewhere.
    m = frames({1: 0.9}, {1: 0.6, 0: 0.4}, {1: 0.9})
    result = align(m, [1, 1])
    assert spans(result) == [(0, 0), (2, 2)]
    assert required_frames([1, 1]) == 3


def test_blanks_between_repeats_and_long_blank_runs():
    m = frames({0: 0.9}, {2: 0.8}, {0: 0.9}, {0: 0.9}, {0: 0.9}, {2: 0.8}, {2: 0.7}, {0: 0.9})
    assert spans(align(m, [2, 2])) == [(1, 1), (5, 6)]


def test_a_token_that_never_wins_a_frame_is_still_aligned():
    # Token 4 is never the argmax (blank wins frame 2 at 0.6), yet the targets require it;
    # it goes where it is least unlikely.
    m = frames({1: 0.9}, {0: 0.8, 4: 0.1}, {0: 0.6, 4: 0.35}, {0: 0.9}, {2: 0.9})
    assert all(m[t].argmax() != 4 for t in range(m.shape[0]))
    result = align(m, [1, 4, 2])
    assert spans(result) == [(0, 0), (2, 2), (4, 4)]
    assert result[1].probability == pytest.approx(0.35)


def test_the_path_is_the_best_one_not_a_greedy_one():
    # Greedy per frame reads 1 1 1 3 and misses 2; the best path of 1 2 3 gives 2 frame 1,
    # where it is nearly as likely as 1, rather than frame 2, where it is not.
    m = frames({1: 0.9}, {1: 0.5, 2: 0.45}, {1: 0.5, 3: 0.4}, {3: 0.9})
    assert spans(align(m, [1, 2, 3])) == [(0, 0), (1, 1), (2, 3)]


def test_exactly_enough_frames():
    m = frames({0: 0.9}, {0: 0.9}, {0: 0.9})
    assert spans(align(m, [3, 3])) == [(0, 0), (2, 2)]  # every frame forced


def test_too_few_frames_is_a_clear_error():
    m = frames({1: 0.9}, {1: 0.9})
    with pytest.raises(ValueError, match=r"item 0 needs at least 3 frames for its 2 tokens, "
                                         r"it has 2"):
        align(m, [1, 1])
    with pytest.raises(ValueError, match="item 0 needs at least 1 frames for its 1 tokens, "
                                         "it has 0"):
        forced_align(m[None], torch.tensor([0]), [[1]])


def test_a_target_impossible_on_every_frame_is_an_error_not_made_up_spans():
    m = frames({1: 0.5}, {2: 0.5}, {1: 0.5}, {2: 0.5})
    m[:, 3] = float("-inf")
    with pytest.raises(ValueError, match="item 0 has no path of finite probability"):
        align(m, [1, 3])
    m[2] = float("nan")
    with pytest.raises(ValueError, match="item 0 has no path of finite probability"):
        align(m, [1, 2])


def test_bad_arguments_are_named():
    m = frames({1: 0.9}, {2: 0.9})
    with pytest.raises(ValueError, match="contain the blank id 0"):
        align(m, [1, 0])
    with pytest.raises(ValueError, match="item 0 has length 3, expected 0..2 frames"):
        forced_align(m[None], torch.tensor([3]), [[1]])
    with pytest.raises(ValueError, match="1 items of log-probabilities"):
        forced_align(m[None], torch.tensor([2]), [[1], [2]])


def test_no_targets_give_no_spans():
    m = frames({0: 0.9}, {1: 0.9})
    assert align(m, []) == []
    assert forced_align(m[None], torch.tensor([0]), [[]]) == [[]]
    assert forced_align(torch.empty(2, 0, VOCAB), torch.tensor([0, 0]), [[], []]) == [[], []]


def test_batch_items_of_different_lengths_align_as_each_alone():
    generator = torch.Generator().manual_seed(0)
    items = []
    for length, targets in ((9, [1, 2, 2, 3]), (4, [4]), (12, [3, 1, 3, 1, 2]), (6, []),
                            (3, [2, 2])):
        logits = torch.randn(length, VOCAB, generator=generator) * 3
        items.append((logits.log_softmax(-1), targets))
    time = max(m.shape[0] for m, _ in items)
    batch = torch.full((len(items), time, VOCAB), math.log(1 / VOCAB))
    for index, (m, _) in enumerate(items):
        batch[index, : m.shape[0]] = m
    together = forced_align(batch, torch.tensor([m.shape[0] for m, _ in items]),
                            [t for _, t in items])
    alone = [align(m, t) for m, t in items]
    assert together == alone
    for result, (m, targets) in zip(together, items):
        assert len(result) == len(targets)
        assert all(0 <= s.first <= s.last < m.shape[0] for s in result)
        assert all(a.last < b.first for a, b in itertools.pairwise(result))


def test_a_path_score_is_the_sum_of_its_frames():
    """The Viterbi path is optimal: no other path of the targets scores higher (checked by
    enumerating every path on a small case)."""
    generator = torch.Generator().manual_seed(3)
    m = (torch.randn(6, VOCAB, generator=generator) * 2).log_softmax(-1)
    targets = [1, 2, 1]
    best = align(m, targets)

    def score(path_spans: list[tuple[int, int]]) -> float:
        on = {t: targets[k] for k, (a, b) in enumerate(path_spans) for t in range(a, b + 1)}
        return sum(m[t, on.get(t, 0)].item() for t in range(m.shape[0]))

    def all_paths(k: int, start: int) -> list[list[tuple[int, int]]]:
        if k == len(targets):
            return [[]]
        out = []
        for a in range(start, m.shape[0]):
            for b in range(a, m.shape[0]):
                for rest in all_paths(k + 1, b + 1):
                    out.append([(a, b)] + rest)
        return out

    candidates = all_paths(0, 0)
    assert max(score(p) for p in candidates) == pytest.approx(score(spans(best)), abs=1e-5)
