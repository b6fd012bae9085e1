"""SenseVoice Small in plain PyTorch: a SANM encoder with a CTC head and 4 prompt frames.

Module and parameter names match FunASR's ``SenseVoiceSmall`` so that the official ``model.pt``
loads with ``load_state_dict(strict=True)``: ``encoder.encoders0`` (input 560 -> d),
``encoder.encoders`` (num_blocks - 1), ``encoder.after_norm``, ``encoder.tp_encoders``,
``encoder.tp_norm``, ``ctc.ctc_lo`` and ``embed`` (the 16 query rows).
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sensevoice_core.config import SenseVoiceDims
from sensevoice_core.vocab import EMOTION_QUERY_ROW, EVENT_QUERY_ROW, NUM_PROMPT_FRAMES

Device = torch.device | str | None


# Layers built on the meta device (to receive loaded weights) skip their random init: on
# meta it computes nothing, yet costs more than half of a full-size model's construction.
class Linear(nn.Linear):
    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class LayerNorm(nn.LayerNorm):
    def reset_parameters(self) -> None:
        if self.weight is None or not self.weight.is_meta:
            super().reset_parameters()


class Conv1d(nn.Conv1d):
    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


@lru_cache(maxsize=8)
def _position_table(length: int, depth: int) -> Tensor:
    """FunASR's sinusoidal encoding for positions 1..length, shape (length, depth), float32.

    Built with the same float32 operations as FunASR so the values agree to the last bit.
    """
    positions = torch.arange(1, length + 1, dtype=torch.float32)
    log_timescale_increment = torch.log(torch.tensor([10000.0])) / (depth / 2 - 1)
    inv_timescales = torch.exp(torch.arange(depth // 2).float() * -log_timescale_increment)
    scaled_time = positions[:, None] * inv_timescales[None, :]  # (length, depth/2)
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


def sinusoidal_positions(length: int, depth: int) -> Tensor:
    # Tables are cached per power-of-two length; a shorter sequence takes a prefix.
    bucket = 1 << max(6, (length - 1).bit_length())
    return _position_table(bucket, depth)[:length]


class SANMAttention(nn.Module):
    """Multi-head self-attention plus an FSMN memory block over the values (SAN-M)."""

    def __init__(self, in_size: int, d: int, heads: int, kernel_size: int, sanm_shift: int,
                 device: Device = None):
        super().__init__()
        self.heads = heads
        self.d = d
        self.linear_q_k_v = Linear(in_size, 3 * d, device=device)
        self.linear_out = Linear(d, d, device=device)
        self.fsmn_block = Conv1d(d, d, kernel_size, groups=d, bias=False, device=device)
        # A centred window of kernel_size frames; sanm_shift moves it into the past
        # (more left context) for streaming variants. SenseVoice Small uses 0.
        self.left_padding = (kernel_size - 1) // 2 + sanm_shift
        self.right_padding = kernel_size - 1 - self.left_padding

    def fsmn_memory(self, v: Tensor, pad_mask: Tensor | None) -> Tensor:
        # v: (B, T, d); pad_mask: (B, T, 1), 1.0 on real frames, so padding never leaks in.
        if pad_mask is not None:
            v = v * pad_mask
        # The depthwise conv runs as a channels-last 2-D conv over (B, d, T, 1): oneDNN's
        # fastest path here, and its output is already laid out as (B, T, d).
        frames = v.transpose(1, 2).unsqueeze(-1).contiguous(memory_format=torch.channels_last)
        if self.left_padding == self.right_padding:
            padding = (self.left_padding, 0)
        else:
            frames = F.pad(frames, (0, 0, self.left_padding, self.right_padding))
            padding = (0, 0)
        weight = self.fsmn_block.weight.unsqueeze(-1)  # (d, 1, kernel, 1)
        memory = F.conv2d(frames, weight, padding=padding, groups=self.d)
        memory = memory.squeeze(-1).transpose(1, 2)  # (B, T, d)
        # In-place updates of freshly computed outputs are autograd-safe (no backward reads
        # them) and skip a full-size allocation per op, which costs more than the op on CPU.
        memory += v
        if pad_mask is not None:
            memory *= pad_mask
        return memory

    def forward(self, x: Tensor, pad_mask: Tensor | None, attn_mask: Tensor | None) -> Tensor:
        batch, time, _ = x.shape
        q, k, v = self.linear_q_k_v(x).split(self.d, dim=-1)  # 3 x (B, T, d)
        memory = self.fsmn_memory(v, pad_mask)
        head_dim = self.d // self.heads
        q, k, v = (t.view(batch, time, self.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, T, hd)
        attended = attended.transpose(1, 2).reshape(batch, time, self.d)
        output = self.linear_out(attended)
        output += memory
        return output


class FeedForward(nn.Module):
    def __init__(self, d: int, hidden: int, device: Device = None):
        super().__init__()
        self.w_1 = Linear(d, hidden, device=device)
        self.w_2 = Linear(hidden, d, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(F.relu(self.w_1(x), inplace=True))


class SANMEncoderLayer(nn.Module):
    """Pre-norm block. The first block changes width (560 -> d), so it has no attention residual."""

    def __init__(self, in_size: int, dims: SenseVoiceDims, device: Device = None):
        super().__init__()
        d = dims.output_size
        self.self_attn = SANMAttention(in_size, d, dims.attention_heads, dims.kernel_size,
                                       dims.sanm_shift, device)
        self.feed_forward = FeedForward(d, dims.linear_units, device)
        self.norm1 = LayerNorm(in_size, device=device)
        self.norm2 = LayerNorm(d, device=device)
        self.attention_residual = in_size == d

    def forward(self, x: Tensor, pad_mask: Tensor | None, attn_mask: Tensor | None) -> Tensor:
        attended = self.self_attn(self.norm1(x), pad_mask, attn_mask)
        x = attended.add_(x) if self.attention_residual else attended
        return self.feed_forward(self.norm2(x)).add_(x)


class SenseVoiceEncoder(nn.Module):
    def __init__(self, dims: SenseVoiceDims, device: Device = None):
        super().__init__()
        d = dims.output_size
        self.output_size = d
        self.encoders0 = nn.ModuleList([SANMEncoderLayer(dims.input_size, dims, device)])
        self.encoders = nn.ModuleList(
            [SANMEncoderLayer(d, dims, device) for _ in range(dims.num_blocks - 1)]
        )
        self.after_norm = LayerNorm(d, device=device)
        self.tp_encoders = nn.ModuleList(
            [SANMEncoderLayer(d, dims, device) for _ in range(dims.tp_blocks)]
        )
        self.tp_norm = LayerNorm(d, device=device)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """x: (B, T, input_size), lengths: (B,) -> (B, T, output_size)."""
        batch, time, depth = x.shape
        # FunASR scales by sqrt(output_size), not sqrt(input_size), before adding positions.
        x = x * math.sqrt(self.output_size) + sinusoidal_positions(time, depth).to(x)
        pad_mask, attn_mask = None, None
        if bool((lengths < time).any()):
            valid = torch.arange(time, device=x.device)[None, :] < lengths[:, None]  # (B, T)
            pad_mask = valid[:, :, None].to(x.dtype)  # (B, T, 1)
            attn_mask = valid[:, None, None, :]  # (B, 1, 1, T): padded keys get no weight
        for layer in itertools.chain(self.encoders0, self.encoders):
            x = layer(x, pad_mask, attn_mask)
        x = self.after_norm(x)
        for layer in self.tp_encoders:
            x = layer(x, pad_mask, attn_mask)
        return self.tp_norm(x)


class CTCHead(nn.Module):
    def __init__(self, d: int, vocab_size: int, device: Device = None):
        super().__init__()
        self.ctc_lo = Linear(d, vocab_size, device=device)


def build_layers(
    dims: SenseVoiceDims, device: Device = None
) -> tuple[SenseVoiceEncoder, CTCHead, nn.Embedding]:
    """The three top-level modules, shared by SenseVoiceSmall and the transformers wrapper.

    device="meta" builds the structure without memory or init, for loading weights into it.
    Pass the device to the constructors rather than using a ``torch.device`` context: the
    context routes factory calls through Python decompositions that import sympy and
    torch._dynamo, about 2 s on the first construction in a process.
    """
    query_weight = torch.empty(dims.num_query_embeddings, dims.input_size, device=device)
    if query_weight.device.type != "meta":
        nn.init.normal_(query_weight)  # nn.Embedding's own init
    return (
        SenseVoiceEncoder(dims, device),
        CTCHead(dims.output_size, dims.vocab_size, device),
        nn.Embedding(dims.num_query_embeddings, dims.input_size, _weight=query_weight),
    )


def prompted_logits(
    encoder: SenseVoiceEncoder,
    ctc: CTCHead,
    embed: nn.Embedding,
    features: Tensor,
    lengths: Tensor,
    language_rows: Tensor,
    text_norm_rows: Tensor,
) -> tuple[Tensor, Tensor]:
    """Prepend the 4 prompt frames, encode, and project to the vocabulary.

    features: (B, T, input_size) LFR+CMVN features; lengths: (B,) valid frames;
    language_rows, text_norm_rows: (B,) rows of ``embed`` (see vocab.LANGUAGE_QUERY_ROW).
    Returns logits (B, 4 + T, vocab) and their valid lengths (B,).
    """
    batch = features.shape[0]
    # A converted model (convert.py) runs in its parameters' dtype: features are cast in, and
    # the CTC head (kept fp32 by convert.py; an Int8Linear answers in its input's dtype) gets
    # fp32 hidden states, so the logits are fp32, not rounded to bf16.
    features = features.to(embed.weight.dtype)
    event_rows = torch.full_like(language_rows, EVENT_QUERY_ROW)
    emotion_rows = torch.full_like(language_rows, EMOTION_QUERY_ROW)
    rows = torch.stack([language_rows, event_rows, emotion_rows, text_norm_rows], dim=1)
    prompt = embed(rows).to(features.dtype)  # (B, 4, input_size)
    assert prompt.shape == (batch, NUM_PROMPT_FRAMES, features.shape[2]), prompt.shape
    x = torch.cat([prompt, features], dim=1)
    lengths = lengths + NUM_PROMPT_FRAMES
    return ctc.ctc_lo(encoder(x, lengths).float()), lengths


class SenseVoiceSmall(nn.Module):
    def __init__(self, dims: SenseVoiceDims, device: Device = None):
        super().__init__()
        self.dims = dims
        self.compute_type = "float32"  # set by convert.py (a ConcreteComputeType)
        self.encoder, self.ctc, self.embed = build_layers(dims, device)

    def forward(
        self, features: Tensor, lengths: Tensor, language_rows: Tensor, text_norm_rows: Tensor
    ) -> tuple[Tensor, Tensor]:
        return prompted_logits(self.encoder, self.ctc, self.embed, features, lengths,
                               language_rows, text_norm_rows)
