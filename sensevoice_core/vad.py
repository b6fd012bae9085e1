"""Voice activity detection: Silero VAD in plain PyTorch, one speech probability per 32 ms.

The weights ship inside the ``silero-vad`` wheel as safetensors (no download, no TorchScript):
an STFT done as a convolution, four convolutions, one LSTM cell carried across 32 ms windows,
and a sigmoid. Each window sees the 64 samples before it. The convolutions of all windows run as
one batch; only the 128-wide LSTM runs window after window, inside ``nn.LSTM``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from sensevoice_core.errors import SenseVoiceError
from sensevoice_core.segmentation import WINDOW

CONTEXT = 64  # samples of the previous window each window also sees
WEIGHTS_FILE = "silero_vad_16k.safetensors"
WINDOWS_PER_BATCH = 2048  # about 65 s of audio through the convolutions at once


def weights_path() -> Path:
    """The weights inside the installed silero-vad package, found without importing it: its
    __init__ imports a module that sets torch's thread count to 1 for the whole process."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise SenseVoiceError("silero-vad is not installed; pip install silero-vad "
                              "(without extras)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / WEIGHTS_FILE
    if not path.is_file():
        raise SenseVoiceError(f"{path} is missing; reinstall silero-vad>=6")
    return path


class SileroVAD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, kernel_size=256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, kernel_size=3, padding=1)
        self.lstm = nn.LSTM(128, 128, batch_first=True)
        self.final_conv = nn.Conv1d(128, 1, kernel_size=1)

    @classmethod
    def from_package(cls) -> SileroVAD:
        state = load_file(str(weights_path()))
        cell = {"weight_ih": "weight_ih_l0", "weight_hh": "weight_hh_l0",
                "bias_ih": "bias_ih_l0", "bias_hh": "bias_hh_l0"}
        renamed = {(f"lstm.{cell[key[len('lstm_cell.'):]]}" if key.startswith("lstm_cell.")
                    else key): value for key, value in state.items()}
        model = cls()
        model.load_state_dict(renamed, strict=True)
        return model.eval()

    def window_features(self, windows: torch.Tensor) -> torch.Tensor:
        """(n, CONTEXT + WINDOW) samples -> (n, 128) features, every window independent."""
        x = nn.functional.pad(windows, (0, 64), mode="reflect").unsqueeze(1)
        x = self.stft_conv(x)
        x = torch.sqrt(x[:, :129] ** 2 + x[:, 129:] ** 2)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return torch.relu(self.conv4(x)).squeeze(-1)

    def forward(self, windows: torch.Tensor,
                state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive windows (n, CONTEXT + WINDOW) -> speech probabilities (n,), new state."""
        hidden, state = self.lstm(self.window_features(windows).unsqueeze(0), state)
        x = torch.relu(hidden[0]).unsqueeze(-1)  # (n, 128, 1)
        return torch.sigmoid(self.final_conv(x)).reshape(-1), state


class SpeechProbabilities:
    """Feeds audio of any chunking through the VAD: one probability per 32 ms window."""

    def __init__(self, model: SileroVAD):
        self.model = model
        self.pending = torch.zeros(0)
        self.context = torch.zeros(CONTEXT)
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.inference_mode()
    def feed(self, samples: torch.Tensor, final: bool = False) -> np.ndarray:
        audio = torch.cat([self.pending, samples.float()])
        whole = audio.numel() // WINDOW
        if final and audio.numel() % WINDOW:
            audio = nn.functional.pad(audio, (0, WINDOW - audio.numel() % WINDOW))
            whole += 1
        self.pending = audio[whole * WINDOW:]
        probabilities = []
        for first in range(0, whole, WINDOWS_PER_BATCH):
            count = min(WINDOWS_PER_BATCH, whole - first)
            span = torch.cat([self.context, audio[first * WINDOW:(first + count) * WINDOW]])
            windows = span.unfold(0, CONTEXT + WINDOW, WINDOW)
            chunk, self.state = self.model(windows, self.state)
            probabilities.append(chunk)
            self.context = span[-CONTEXT:]
        return torch.cat(probabilities).numpy() if probabilities else np.zeros(0, np.float32)


def speech_probabilities(model: SileroVAD, chunks: Iterable[torch.Tensor]) -> np.ndarray:
    """Probabilities for a whole stream of 16 kHz chunks (window i covers i*32 ms onward)."""
    stream = SpeechProbabilities(model)
    parts = [stream.feed(chunk) for chunk in chunks]
    parts.append(stream.feed(torch.zeros(0), final=True))
    return np.concatenate(parts)
