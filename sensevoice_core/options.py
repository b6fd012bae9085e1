"""How to transcribe: the options of one call, with the defaults the settings take as theirs.

No torch here: the settings (read by every process) take their defaults from these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sensevoice_core.segmentation import Bounds, VadOptions
from sensevoice_core.vocab import Language, TextNorm, language_of, languages_of

BATCH_S_BOUNDS = Bounds(0.0, low_exclusive=True)  # seconds of padded audio per batch
MAX_AUDIO_S_BOUNDS = Bounds(0.0, low_exclusive=True)  # seconds; None (any length) also allowed


@dataclass(frozen=True)
class TranscribeOptions:
    language: Language = Language.AUTO  # the language prompt; AUTO lets the model decide
    use_itn: bool = False  # True: numerals and punctuation ("withitn"); False: spoken form
    vad: VadOptions = field(default_factory=VadOptions)  # where long audio is split
    batch_s: float = 120.0  # padded seconds of audio per batch of segments: bounds memory
    max_audio_s: float | None = None  # longer audio is refused (AudioTooLongError); None: any
    word_timestamps: bool = False  # Segment.words and .tokens, by CTC forced alignment
    # Auto language ID picks only among these (the language slot's other tags are masked);
    # empty: any. <|nospeech|> stays possible whatever the list.
    languages: tuple[Language, ...] = ()

    def __post_init__(self) -> None:
        # "en" or Language.EN; an unknown language is a ValueError naming the choices.
        object.__setattr__(self, "language", language_of(self.language))
        object.__setattr__(self, "use_itn", bool(self.use_itn))
        object.__setattr__(self, "word_timestamps", bool(self.word_timestamps))
        object.__setattr__(self, "languages", languages_of(self.languages))
        if self.languages and self.language is not Language.AUTO \
                and self.language not in self.languages:
            raise ValueError(f"language {self.language.value!r} is not among the allowed "
                             f"languages ({', '.join(lang.value for lang in self.languages)})")
        BATCH_S_BOUNDS.check("batch_s", self.batch_s)
        if self.max_audio_s is not None:
            MAX_AUDIO_S_BOUNDS.check("max_audio_s", self.max_audio_s)

    @property
    def text_norm(self) -> TextNorm:
        return TextNorm.WITH_ITN if self.use_itn else TextNorm.WITHOUT_ITN
