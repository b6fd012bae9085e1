"""The model itself: padding masks, the official parameter layout, position encodings."""

import dataclasses

import pytest
import torch
from funasr.models.sense_voice.model import SenseVoiceSmall as FunASRSenseVoiceSmall

from sensevoice_core.config import SenseVoiceDims
from sensevoice_core.model import SenseVoiceSmall, _position_table, sinusoidal_positions
from sensevoice_core.random_model import random_model, small_dims


def run(model: SenseVoiceSmall, features: list[torch.Tensor]) -> list[torch.Tensor]:
    batch = torch.nn.utils.rnn.pad_sequence(features, batch_first=True)
    lengths = torch.tensor([f.shape[0] for f in features])
    rows = torch.zeros(len(features), dtype=torch.long)
    with torch.inference_mode():
        logits, out_lengths = model(batch, lengths, rows, rows + 15)
    return [logits[i, :n] for i, n in enumerate(out_lengths.tolist())]


@pytest.mark.parametrize("sanm_shift", [0, 2])
def test_a_padded_batch_gives_each_item_what_it_gets_alone(sanm_shift):
    model = random_model(dataclasses.replace(small_dims(), sanm_shift=sanm_shift), seed=1)
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(n, 560, generator=generator) for n in (37, 5, 80, 1)]
    batched = run(model, features)
    for item, alone in zip(batched, (run(model, [f])[0] for f in features)):
        assert item.shape == alone.shape
        assert (item - alone).abs().max().item() < 1e-4


def test_parameter_names_and_shapes_equal_funasr_at_full_size():
    dims = SenseVoiceDims()  # the official sizes
    ours = SenseVoiceSmall(dims, device="meta")
    with torch.device("meta"):
        reference = FunASRSenseVoiceSmall(
            encoder="SenseVoiceEncoderSmall",
            encoder_conf={"output_size": 512, "attention_heads": 4, "linear_units": 2048,
                          "num_blocks": 50, "tp_blocks": 20, "kernel_size": 11,
                          "sanm_shfit": 0, "normalize_before": True},
            input_size=560, vocab_size=dims.vocab_size,
        )
    ours_layout = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    reference_layout = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours_layout == reference_layout
    assert sum(v.numel() for v in ours.state_dict().values()) == 233_999_167


def test_position_table_prefix_matches_a_direct_computation():
    for length in (1, 63, 64, 65, 1000):
        assert torch.equal(sinusoidal_positions(length, 560), _position_table(length, 560))


def test_gradients_flow_for_training():
    model = random_model(small_dims()).train()
    features = torch.randn(2, 20, 560, requires_grad=True)
    lengths = torch.tensor([20, 12])
    rows = torch.tensor([0, 4])
    logits, _ = model(features, lengths, rows, rows * 0 + 14)
    logits.log_softmax(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert features.grad is not None and torch.isfinite(features.grad).all()
