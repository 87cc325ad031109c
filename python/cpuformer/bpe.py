"""Byte-level BPE training in cpuformer's C++ core (``cpp/include/cpuformer/bpe_trainer.h``).

``train_bpe`` gives the same vocab and merges as the ``tokenizers`` library's trainer with the same settings::

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=..., min_frequency=..., special_tokens=...,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, trainer)          # or tok.train_from_iterator(texts, trainer)

(what ``tokenizers.ByteLevelBPETokenizer().train(...)`` does), and writes a GPT-2 style ``tokenizer.json``
(ByteLevel pre-tokenizer, post-processor and decoder, BPE model, the special tokens as special added tokens) that
``tokenizers.Tokenizer.from_str`` and ``cpuformer.Tokenizer`` load.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Union

from . import _core

__all__ = ["train_bpe"]

_PathLike = Union[str, os.PathLike]


def _utf8_str(s, what: str) -> str:
    if not isinstance(s, str):
        raise TypeError(f"train_bpe: {what} must be a str, got {type(s).__name__}")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates
        raise ValueError(f"train_bpe: {what} is not valid Unicode (a lone surrogate at index {e.start})") from None
    return s


def _int(v, name: str, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"train_bpe: {name} must be an int, got {type(v).__name__}")
    if v < low:
        raise ValueError(f"train_bpe: {name} must be >= {low}, got {v}")
    if v >= 2**63:
        raise ValueError(f"train_bpe: {name} is too large: {v}")
    return v


def train_bpe(files: Union[_PathLike, Sequence[_PathLike], None] = None, vocab_size: int = 8000,
              min_frequency: int = 2, special_tokens: Sequence[str] = ("<pad>", "<unk>", "<bos>", "<eos>"),
              path: Optional[_PathLike] = None, *, texts: Optional[Iterable[str]] = None,
              limit_alphabet=None, continuing_subword_prefix=None, end_of_word_suffix=None) -> str:
    """Train a byte-level BPE tokenizer and return its ``tokenizer.json`` text.

    files: a path or a list of paths of UTF-8 text files; each line (with its line ending) is one sequence, as
        ``tokenizers.Tokenizer.train(files)`` reads them. A file that is not valid UTF-8 is a ValueError naming it.
    texts: strings, each one sequence (as ``train_from_iterator``); fed after the files. At least one of files
        and texts must be given.
    vocab_size: the vocab size to stop at, counting the special tokens and the 256-char byte alphabet (the
        alphabet is always kept whole, so a smaller value gives special tokens + alphabet and no merges).
    min_frequency: a pair is merged only if it occurs at least this many times.
    special_tokens: first in the vocab (ids 0, 1, ...; a repeat is kept once), special added tokens in the file.
    path: if given, the JSON is also written there atomically (``cpuformer.io.atomic_write_bytes``).
    limit_alphabet, continuing_subword_prefix, end_of_word_suffix: not supported (ValueError if not None).
    """
    for name, v in (("limit_alphabet", limit_alphabet), ("continuing_subword_prefix", continuing_subword_prefix),
                    ("end_of_word_suffix", end_of_word_suffix)):
        if v is not None:
            raise ValueError(f"train_bpe: {name} is not supported (byte-level BPE only)")
    if files is None:
        file_list = []
    elif isinstance(files, (str, os.PathLike)):
        file_list = [files]
    elif isinstance(files, (bytes, bytearray)):
        raise TypeError("train_bpe: files must be a path (str or os.PathLike) or a list of paths, got bytes")
    else:
        file_list = list(files)
    paths = []
    for f in file_list:
        if not isinstance(f, (str, os.PathLike)):
            raise TypeError(f"train_bpe: each file must be a str or os.PathLike path, got {type(f).__name__}")
        p = os.fspath(f)
        if not isinstance(p, str):
            raise TypeError("train_bpe: file paths must be str, not bytes")
        if not os.path.isfile(p):
            raise FileNotFoundError(f"train_bpe: no such file: {p!r}")
        paths.append(_utf8_str(p, "a file path"))
    if texts is None:
        text_list = []
    elif isinstance(texts, (str, bytes)):
        raise TypeError("train_bpe: texts must be an iterable of str (one sequence each), not a single "
                        f"{type(texts).__name__}")
    else:
        text_list = [_utf8_str(t, "each text") for t in texts]
    if files is None and texts is None:
        raise ValueError("train_bpe: give files and/or texts to train on")
    vocab_size = _int(vocab_size, "vocab_size", 0)
    min_frequency = _int(min_frequency, "min_frequency", 0)
    if isinstance(special_tokens, (str, bytes)) or special_tokens is None:
        raise TypeError("train_bpe: special_tokens must be a sequence of str")
    specials = []
    for s in special_tokens:
        _utf8_str(s, "each special token")
        if not s:
            raise ValueError("train_bpe: a special token is empty")
        specials.append(s)
    json_text = _core._bpe_train(paths, text_list, vocab_size, min_frequency, specials)
    if path is not None:
        from .io import atomic_write_bytes

        atomic_write_bytes(os.fspath(path), [json_text.encode("utf-8")])
    return json_text
