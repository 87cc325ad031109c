"""Character- and word-level tokenizers with PAD, UNK, BOS, EOS; vocabularies built from a corpus (minimum
frequency, maximum size), encode/decode, save/load as JSON."""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Iterable, List, Optional, Sequence

from ..io import atomic_write_bytes

__all__ = ["Tokenizer", "CharTokenizer", "WordTokenizer", "load_tokenizer"]

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


class Tokenizer:
    """Shared vocabulary logic. Ids 0-3 are ``<pad>``, ``<unk>``, ``<bos>``, ``<eos>``."""

    kind = "base"
    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    def __init__(self, tokens: Sequence[str]) -> None:
        self.itos: List[str] = list(SPECIALS) + [t for t in tokens if t not in SPECIALS]
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    # -- to be provided by subclasses -----------------------------------------------------------------------------
    @staticmethod
    def split(text: str) -> List[str]:
        raise NotImplementedError

    @staticmethod
    def join(tokens: List[str]) -> str:
        raise NotImplementedError

    # -- vocabulary -----------------------------------------------------------------------------------------------
    @classmethod
    def from_corpus(cls, texts: Iterable[str], min_freq: int = 1, max_size: Optional[int] = None) -> "Tokenizer":
        """Vocabulary of the tokens seen at least ``min_freq`` times, most frequent first (ties alphabetical), at
        most ``max_size`` entries including the four specials."""
        counts = Counter()
        for text in texts:
            counts.update(cls.split(text))
        tokens = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            tokens = tokens[: max(0, max_size - len(SPECIALS))]
        return cls(tokens)

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        ids = [self.stoi.get(t, self.unk_id) for t in self.split(text)]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.itos):
                raise IndexError(f"decode: id {i} outside the vocabulary of {len(self.itos)}")
            if skip_special and i < len(SPECIALS):
                if i == self.eos_id:
                    break
                continue
            out.append(self.itos[i])
        return self.join(out)

    # -- files ----------------------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "tokens": self.itos[len(SPECIALS):]}, ensure_ascii=False)

    def save(self, path: str) -> None:
        atomic_write_bytes(path, [self.to_json().encode("utf-8")])

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        return load_tokenizer(path)


class CharTokenizer(Tokenizer):
    """One token per character."""

    kind = "char"

    @staticmethod
    def split(text: str) -> List[str]:
        return list(text)

    @staticmethod
    def join(tokens: List[str]) -> str:
        return "".join(tokens)


_WORD_RE = re.compile(r"\w+(?:'\w+)?|[^\w\s]", re.UNICODE)


class WordTokenizer(Tokenizer):
    """Lower-cased words and punctuation marks; ``lower=False`` keeps case."""

    kind = "word"
    lower = True

    @staticmethod
    def split(text: str) -> List[str]:
        return _WORD_RE.findall(text.lower())

    @staticmethod
    def join(tokens: List[str]) -> str:
        text = " ".join(tokens)
        return re.sub(r" ([.,!?;:'\")\]])", r"\1", text)


def load_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer saved with ``save`` (its kind is in the file)."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a tokenizer file ({exc})") from None
    kinds = {"char": CharTokenizer, "word": WordTokenizer}
    if not isinstance(data, dict) or data.get("kind") not in kinds or not isinstance(data.get("tokens"), list):
        raise ValueError(f"{path}: not a cpuformer tokenizer file (needs 'kind' char/word and a 'tokens' list)")
    return kinds[data["kind"]](data["tokens"])
