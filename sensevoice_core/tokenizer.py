"""SentencePiece tokenizer with SenseVoice's tag tokens looked up by name."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import sentencepiece as spm

from sensevoice_core import vocab
from sensevoice_core.errors import ModelFileError


@dataclass
class Tokenizer:
    path: Path
    processor: spm.SentencePieceProcessor = field(repr=False)

    @classmethod
    def from_file(cls, path: Path) -> Tokenizer:
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ModelFileError(path, f"cannot load sentencepiece model: {e}",
                                 expected="a sentencepiece .model file") from e
        return cls(path=path, processor=processor)

    @classmethod
    def from_bytes(cls, data: bytes, path: Path) -> Tokenizer:
        """A tokenizer from a serialized model; path is only a label for errors and logs."""
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(data)
        except (RuntimeError, TypeError) as e:
            raise ModelFileError(path, f"cannot load sentencepiece model: {e}") from e
        return cls(path=path, processor=processor)

    @property
    def vocab_size(self) -> int:
        return self.processor.GetPieceSize()

    def piece_id(self, piece: str) -> int | None:
        """The id of an exact piece, or None when the vocabulary lacks it."""
        token_id = self.processor.PieceToId(piece)
        if token_id == self.processor.unk_id() and piece != self.processor.IdToPiece(token_id):
            return None
        return token_id

    @cached_property
    def tag_names(self) -> dict[int, str]:
        """Id -> tag name ("en", "NEUTRAL", "Speech", "woitn") for every tag this vocabulary has."""
        names = {}
        for name in (*vocab.LANGUAGE_TAGS, *vocab.EMOTION_TAGS, *vocab.EVENT_TAGS,
                     *vocab.TEXT_NORM_TAGS):
            token_id = self.piece_id(vocab.tag_piece(name))
            if token_id is not None:
                names[token_id] = name
        return names

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.processor.DecodeIds(list(token_ids))

    def encode(self, text: str) -> list[int]:
        return self.processor.EncodeAsIds(text)


def build_sentencepiece_model(normal_pieces: Iterable[str], tag_pieces: Iterable[str]) -> bytes:
    """Serialise a BPE-type sentencepiece model with the given pieces, in order.

    Ids: 0 <unk>, 1 <s>, 2 </s>, then the normal pieces, then the tag pieces as user-defined
    symbols (so they are never split). Used to build tiny test vocabularies and the demo model's.
    """
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    piece_type = model_pb2.ModelProto.SentencePiece
    proto.pieces.add(piece="<unk>", score=0.0, type=piece_type.UNKNOWN)
    proto.pieces.add(piece="<s>", score=0.0, type=piece_type.CONTROL)
    proto.pieces.add(piece="</s>", score=0.0, type=piece_type.CONTROL)
    for rank, piece in enumerate(normal_pieces):
        proto.pieces.add(piece=piece, score=-float(rank), type=piece_type.NORMAL)
    tags = list(tag_pieces)
    for piece in tags:
        proto.pieces.add(piece=piece, score=0.0, type=piece_type.USER_DEFINED)

    trainer = proto.trainer_spec
    trainer.model_type = model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(proto.pieces)
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    trainer.user_defined_symbols.extend(tags)
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = True
    normalizer.escape_whitespaces = True
    return proto.SerializeToString(deterministic=True)


def all_tag_pieces() -> list[str]:
    names = (*vocab.LANGUAGE_TAGS, *vocab.EMOTION_TAGS, *vocab.EVENT_TAGS, *vocab.TEXT_NORM_TAGS)
    return [vocab.tag_piece(name) for name in names]
