"""CTC forced alignment: where in time each token of a known sequence was said.

Viterbi over CTC log-probabilities, batched: every item has its own length and target list;
the work is vectorised over items and states, with one loop over frames (and one back), on
whatever device the log-probabilities are on. The targets are the ids greedy decoding emitted
(decoding.py), not re-tokenised text, so every alignment asked for there is possible.

Greedy decoding's frame-wise argmax path is itself a path of the targets it emitted, and no path
scores higher, so on emitted ids the alignment places each token on the frames where it won
the argmax (up to exact ties); the Viterbi search decides only for targets that greedy did not
emit, such as a token that never wins a frame.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sensevoice_core.vocab import CTC_BLANK_ID

_STAY, _STEP, _SKIP = 0, 1, 2  # backpointers: from the same state, the one before, two before


@dataclass(frozen=True)
class TokenSpan:
    """One target token's place in the best alignment: frames first..last (inclusive, counted
    from the first frame given) and its probability, the highest over those frames."""

    first: int
    last: int
    probability: float


def required_frames(targets: Sequence[int]) -> int:
    """The fewest frames a CTC path of targets takes: one per token, plus a blank between two
    equal neighbours."""
    return len(targets) + sum(a == b for a, b in itertools.pairwise(targets))


def forced_align(log_probs: Tensor, lengths: Tensor, targets: Sequence[Sequence[int]],
                 blank_id: int = CTC_BLANK_ID,
                 log_norm: Tensor | None = None) -> list[list[TokenSpan]]:
    """The best (Viterbi) CTC path of each item's targets through its frames.

    log_probs: (B, T, V) log-probabilities (log-softmax over V), or raw logits with their
    per-frame logsumexp as log_norm (B, T), so that no full log-softmax is computed: only the
    columns the targets need are read. lengths: (B,) valid frames per item; targets: B lists
    of token ids (no blanks). Returns, per item, one TokenSpan per target in order. An item
    whose frames cannot hold its targets (fewer than ``required_frames``) is a ValueError
    naming it; an item with no targets gets [].
    """
    batch, time, _ = log_probs.shape
    if lengths.shape != (batch,) or len(targets) != batch:
        raise ValueError(f"forced_align: {batch} items of log-probabilities, "
                         f"{tuple(lengths.shape)} lengths and {len(targets)} target lists")
    lengths_list = [int(n) for n in lengths.tolist()]
    for index, (ids, frames) in enumerate(zip(targets, lengths_list)):
        if not 0 <= frames <= time:
            raise ValueError(f"forced_align: item {index} has length {frames}, expected "
                             f"0..{time} frames")
        if blank_id in ids:
            raise ValueError(f"forced_align: item {index}'s targets contain the blank id "
                             f"{blank_id}")
        if required_frames(ids) > frames:
            raise ValueError(f"forced_align: item {index} needs at least "
                             f"{required_frames(ids)} frames for its {len(ids)} tokens, "
                             f"it has {frames}")
    device = log_probs.device
    longest = max((len(ids) for ids in targets), default=0)
    if longest == 0 or time == 0:
        return [[] for _ in targets]
    states = 2 * longest + 1  # blank, token 1, blank, token 2, ..., blank
    extended = torch.full((batch, states), blank_id, dtype=torch.long)
    for index, ids in enumerate(targets):
        extended[index, 1:2 * len(ids):2] = torch.tensor(ids, dtype=torch.long)
    counts = torch.tensor([len(ids) for ids in targets])
    # A token state may be entered from two states back (skipping the blank between) unless
    # that state holds the same token: two equal tokens need a blank between them.
    skip = torch.zeros(batch, states, dtype=torch.bool)
    skip[:, 2:] = (extended[:, 2:] != blank_id) & (extended[:, 2:] != extended[:, :-2])
    beyond = torch.arange(states)[None, :] > 2 * counts[:, None]  # states past an item's end
    extended, skip, beyond = extended.to(device), skip.to(device), beyond.to(device)

    emissions = log_probs.gather(2, extended[:, None, :].expand(batch, time, states))
    emissions = emissions.float()
    if log_norm is not None:
        emissions -= log_norm.float()[:, :time, None]
    emissions.masked_fill_(beyond[:, None, :], float("-inf"))
    backpointers, final = _viterbi(emissions, skip, lengths.to(device), min(lengths_list))
    path = _trace_back(backpointers.cpu().numpy(), _end_states(final, targets))
    return _spans(torch.from_numpy(path).to(device), emissions, lengths_list,
                  [len(ids) for ids in targets])


def _viterbi(emissions: Tensor, skip: Tensor, lengths: Tensor,
             shortest: int) -> tuple[Tensor, Tensor]:
    """Backpointers (B, T, S) of the best path into each state at each frame (_STAY, _STEP or
    _SKIP: how many states back it came from), and each state's best score at each item's
    last frame (B, S).

    The states are kept in reverse order with two -inf states after them, so that the three
    ways into every state (stay, one back, two back) are one strided view (unfold), in that
    order: one max per frame gives the best and, on ties, prefers staying."""
    batch, time, states = emissions.shape
    device = emissions.device
    reversed_emissions = emissions.flip(-1)
    penalty = torch.zeros(batch, states, 3, device=device)
    penalty[:, :, _SKIP] = torch.where(skip.flip(-1), 0.0, float("-inf"))
    scores = torch.full((batch, states + 2), float("-inf"), device=device)
    scores[:, states - 2:states] = reversed_emissions[:, 0, -2:]
    backpointers = torch.zeros(batch, time, states, dtype=torch.uint8, device=device)
    for t in range(1, time):
        best, choice = (scores.unfold(1, 3, 1) + penalty).max(dim=-1)
        best += reversed_emissions[:, t]
        if t >= shortest:  # past an item's length its scores stay; every state points to itself
            done = (t >= lengths)[:, None]
            best = torch.where(done, scores[:, :states], best)
            choice.masked_fill_(done, _STAY)
        backpointers[:, t] = choice
        scores[:, :states] = best
    return backpointers.flip(-1), scores[:, :states].flip(-1)


def _end_states(final: Tensor, targets: Sequence[Sequence[int]]) -> list[int]:
    """Each item's better end: its last token or the blank after it. An item with targets
    and no finite path (a target impossible on every frame, NaN log-probabilities) is a
    ValueError naming it, rather than spans made up from a path that does not exist."""
    ends = []
    for index, (scores, ids) in enumerate(zip(final.tolist(), targets)):
        last_blank, last_token = 2 * len(ids), max(0, 2 * len(ids) - 1)
        best = max(scores[last_blank], scores[last_token])
        if ids and not math.isfinite(best):
            raise ValueError(f"forced_align: item {index} has no path of finite probability "
                             f"through its {len(ids)} targets (score {best})")
        ends.append(last_blank if scores[last_blank] >= scores[last_token] else last_token)
    return ends


def _trace_back(backpointers: np.ndarray, ends: list[int]) -> np.ndarray:
    """The state of each frame on the best paths, following the backpointers from the ends: a
    pointer chase, done on the CPU (one small array, no kernel per frame)."""
    batch, time, _ = backpointers.shape
    path = np.zeros((batch, time), dtype=np.int64)
    state = np.array(ends, dtype=np.int64)
    rows = np.arange(batch)
    for t in range(time - 1, -1, -1):
        path[:, t] = state
        state = state - backpointers[rows, t, state]
    return path


def _spans(path: Tensor, emissions: Tensor, lengths: list[int],
           counts: list[int]) -> list[list[TokenSpan]]:
    """First and last frame and best probability of every token state on the paths."""
    batch, time = path.shape
    longest = max(counts)
    frames = torch.arange(time, device=path.device).expand(batch, time)
    valid = frames < torch.tensor(lengths, device=path.device)[:, None]
    on_token = valid & (path % 2 == 1)
    token = torch.where(on_token, path // 2, longest)  # off-token frames go to a spare slot
    on_path = emissions.gather(2, path[:, :, None]).squeeze(2)
    first = torch.full((batch, longest + 1), time, device=path.device, dtype=torch.long)
    first = first.scatter_reduce(1, token, frames, "amin")
    last = torch.full_like(first, -1).scatter_reduce(1, token, frames, "amax")
    best = torch.full((batch, longest + 1), float("-inf"), device=path.device)
    best = best.scatter_reduce(1, token, on_path, "amax")
    first_l, last_l, prob_l = first.tolist(), last.tolist(), best.exp().tolist()
    return [[TokenSpan(first_l[b][k], last_l[b][k], prob_l[b][k]) for k in range(counts[b])]
            for b in range(batch)]
