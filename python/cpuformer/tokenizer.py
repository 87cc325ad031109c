"""Hugging Face ``tokenizer.json`` tokenizers run by cpuformer's C++ core.

``cpuformer.Tokenizer`` has the familiar surface of the ``tokenizers`` library (``from_file``, ``encode``,
``encode_batch``, ``decode``, ``enable_padding``, ...) and gives the same ids, tokens, offsets and decoded text for
the components it supports (see ``cpp/include/cpuformer/tokenizer.h``; anything else is a ``ValueError`` naming the
component when the file is loaded). Calling the tokenizer like a ``transformers`` tokenizer,
``tok(texts, padding=True, truncation=True, max_length=128, return_tensors="np")``, returns a dict of int64 arrays.

The GIL is released while the core runs, and one tokenizer may be used from several threads at once (configure
padding and truncation before sharing it).
"""
from __future__ import annotations

import json as _json
import os
from typing import Iterable, List, Optional, Sequence, Union

from . import _core

__all__ = ["Tokenizer", "Encoding"]


def _utf8(text, what: str = "text") -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates such as "\ud800"
        raise ValueError(f"{what} is not valid Unicode (it contains a lone surrogate at index {e.start})") from None


def _texts(texts, what: str) -> List[bytes]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise TypeError(f"{what} must be a list of str, got {type(texts).__name__}")
    return [_utf8(t, f"{what}[{i}]") for i, t in enumerate(texts)]


def _direction(direction: str) -> str:
    if not isinstance(direction, str) or direction not in ("right", "left"):
        raise ValueError(f"direction must be 'right' or 'left', got {direction!r}")
    return direction


def _count(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _read_config(model_dir: str) -> dict:
    cfg = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                d = _json.load(f)
            if not isinstance(d, dict):
                raise ValueError(f"{path}: expected a JSON object")
            cfg.update(d)
    return cfg


def _token(cfg: dict, key: str, default):
    v = cfg.get(key, default)
    if isinstance(v, dict):  # {"content": ..., ...} as transformers saves AddedToken
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _added(content: str, vocab: dict) -> dict:
    return {"id": vocab.get(content, 0), "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _bert_spec(vocab_path: str, cfg: dict) -> dict:
    """A BERT vocab.txt as transformers' BertTokenizerFast converts it."""
    vocab = {}
    with open(vocab_path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            vocab[line.rstrip("\n")] = i
    names = {k: _token(cfg, k, d) for k, d in (("unk_token", "[UNK]"), ("sep_token", "[SEP]"),
                                                ("pad_token", "[PAD]"), ("cls_token", "[CLS]"),
                                                ("mask_token", "[MASK]"))}
    cls_, sep = names["cls_token"], names["sep_token"]
    if cls_ not in vocab or sep not in vocab or names["unk_token"] not in vocab:
        raise ValueError(f"{vocab_path}: the vocabulary lacks {cls_!r}, {sep!r} or {names['unk_token']!r}")
    lower = cfg.get("do_lower_case", True)
    special = [names[k] for k in ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token") if names[k]]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_added(t, vocab) for t in special],
        "normalizer": {"type": "BertNormalizer", "clean_text": True,
                       "handle_chinese_chars": bool(cfg.get("tokenize_chinese_chars", True)),
                       "strip_accents": cfg.get("strip_accents"), "lowercase": bool(lower)},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": cls_, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": sep, "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": cls_, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": sep, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": sep, "type_id": 1}}],
            "special_tokens": {t: {"id": t, "ids": [vocab[t]], "tokens": [t]} for t in (cls_, sep)}},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": names["unk_token"], "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab},
    }


def _gpt2_spec(vocab_path: str, merges_path: str, cfg: dict) -> dict:
    """A GPT-2 vocab.json + merges.txt as transformers' GPT2TokenizerFast converts them."""
    with open(vocab_path, encoding="utf-8") as f:
        vocab = _json.load(f)
    if not isinstance(vocab, dict):
        raise ValueError(f"{vocab_path}: expected a JSON object of token -> id")
    merges = []
    with open(merges_path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.rstrip("\n")
            if (i == 0 and line.startswith("#version")) or not line:
                continue
            merges.append(line)
    apsp = bool(cfg.get("add_prefix_space", False))
    special = []
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        t = _token(cfg, key, None)
        if t and t in vocab and t not in special:
            special.append(t)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_added(t, vocab) for t in special],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": apsp, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                  "merges": merges},
    }


class Encoding:
    """One encoded text (or pair): ``ids``, ``tokens``, ``type_ids``, ``attention_mask``, ``special_tokens_mask``,
    ``offsets`` (character offsets into the original text, as the ``tokenizers`` Python binding gives them; for a
    pair, the second text's offsets are relative to that text), ``byte_offsets`` (the same in UTF-8 bytes),
    ``word_ids`` (None for special and padding tokens) and ``sequence_ids``."""

    __slots__ = ("_e",)

    def __init__(self, core_encoding):
        self._e = core_encoding

    ids = property(lambda self: list(self._e.ids))
    tokens = property(lambda self: list(self._e.tokens))
    type_ids = property(lambda self: list(self._e.type_ids))
    attention_mask = property(lambda self: list(self._e.attention_mask))
    special_tokens_mask = property(lambda self: list(self._e.special_tokens_mask))
    offsets = property(lambda self: list(self._e.offsets))
    byte_offsets = property(lambda self: list(self._e.byte_offsets))
    word_ids = property(lambda self: [None if w < 0 else w for w in self._e.word_ids])
    sequence_ids = property(lambda self: [None if s < 0 else s for s in self._e.sequence_ids])

    def __len__(self) -> int:
        return len(self._e)

    def __repr__(self) -> str:
        return f"Encoding(num_tokens={len(self)}, tokens={self.tokens[:8]}{'...' if len(self) > 8 else ''})"


class Tokenizer:
    """A tokenizer loaded from a ``tokenizer.json`` (``from_file``, ``from_str``, ``from_pretrained``)."""

    def __init__(self, core, json_text: str):
        if not isinstance(core, _core._Tokenizer):
            raise TypeError("use Tokenizer.from_file, Tokenizer.from_str or Tokenizer.from_pretrained")
        self._t = core
        self._json = json_text  # what copy, deepcopy and pickle rebuild it from (with the current settings)

    def __reduce__(self):
        return (_restore, (self._json, self.padding, self.truncation))

    # ---- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "Tokenizer":
        """Load a ``tokenizer.json`` file. ValueError (naming the field or component) for a file it cannot run."""
        path = os.fspath(path)
        if not isinstance(path, str):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such tokenizer file: {path!r}")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 (byte {exc.start})") from None
        try:
            return cls.from_str(text)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def from_str(cls, json: str) -> "Tokenizer":
        """Load a tokenizer from the text of a ``tokenizer.json``."""
        text = _utf8(json, "json").decode("utf-8")
        return cls(_core._Tokenizer.from_str(text), text)

    @classmethod
    def from_pretrained(cls, model_dir: Union[str, os.PathLike]) -> "Tokenizer":
        """Load the tokenizer of a model directory (as ``transformers`` and ``sentence-transformers`` save them):
        its ``tokenizer.json``; without one, a BERT ``vocab.txt`` or a GPT-2 ``vocab.json`` + ``merges.txt``, built
        the way ``transformers`` converts them to a fast tokenizer (settings from ``tokenizer_config.json``)."""
        model_dir = os.fspath(model_dir)
        path = os.path.join(model_dir, "tokenizer.json")
        if os.path.isfile(path):
            return cls.from_file(path)
        cfg = _read_config(model_dir)
        if os.path.isfile(os.path.join(model_dir, "vocab.txt")):
            return cls.from_str(_json.dumps(_bert_spec(os.path.join(model_dir, "vocab.txt"), cfg)))
        vocab, merges = os.path.join(model_dir, "vocab.json"), os.path.join(model_dir, "merges.txt")
        if os.path.isfile(vocab) and os.path.isfile(merges):
            return cls.from_str(_json.dumps(_gpt2_spec(vocab, merges, cfg)))
        raise FileNotFoundError(f"{model_dir!r} has no tokenizer.json, vocab.txt or vocab.json + merges.txt")

    # ---- encoding ------------------------------------------------------------------------------------------
    def encode(self, sequence: str, pair: Optional[str] = None, add_special_tokens: bool = True) -> Encoding:
        """Encode one text (or a pair), with this tokenizer's truncation and padding."""
        a = _utf8(sequence, "sequence")
        b = None if pair is None else _utf8(pair, "pair")
        return Encoding(self._t.encode(a, b, bool(add_special_tokens)))

    def _pairs(self, inputs):
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Iterable):
            raise TypeError(f"inputs must be a list of str or of (str, str) pairs, got {type(inputs).__name__}")
        inputs = list(inputs)
        if inputs and all(isinstance(x, (tuple, list)) for x in inputs):
            if any(len(x) != 2 for x in inputs):
                raise ValueError("each pair must have exactly two texts")
            return _texts([x[0] for x in inputs], "inputs"), _texts([x[1] for x in inputs], "pairs")
        return _texts(inputs, "inputs"), None

    def encode_batch(self, inputs: Sequence, add_special_tokens: bool = True) -> List[Encoding]:
        """Encode many texts (or (text, pair) tuples) over cpuformer's threads; padding to the longest is over
        the batch."""
        a, b = self._pairs(inputs)
        encs = self._t.encode_batch(a, b, bool(add_special_tokens), True, None, None)
        return [Encoding(e) for e in encs]

    def __call__(self, text, text_pair=None, add_special_tokens: bool = True, padding=False, truncation=False,
                 max_length: Optional[int] = None, return_tensors: Optional[str] = None,
                 pad_to_multiple_of: Optional[int] = None):
        """``transformers``-style call: returns a dict with ``input_ids``, ``attention_mask`` and
        ``token_type_ids``: lists (one per text), or (B, T) int64 numpy arrays with ``return_tensors="np"``.

        ``padding``: False, True/"longest" or "max_length"; ``truncation``: False, True/"longest_first",
        "only_first" or "only_second" (to ``max_length``). The file's own padding/truncation settings are not used,
        as in ``transformers``."""
        single = isinstance(text, str)
        texts = [text] if single else text
        pairs = None
        if text_pair is not None:
            pairs = [text_pair] if isinstance(text_pair, str) else text_pair
        a = _texts(texts, "text")
        b = None if pairs is None else _texts(pairs, "text_pair")
        if b is not None and len(b) != len(a):
            raise ValueError(f"{len(a)} texts but {len(b)} text_pair entries")
        trunc = None
        if truncation not in (False, None, "do_not_truncate"):
            strategy = "longest_first" if truncation is True else truncation
            if strategy not in ("longest_first", "only_first", "only_second"):
                raise ValueError(f"truncation must be a bool or 'longest_first', 'only_first', 'only_second', "
                                 f"got {truncation!r}")
            if max_length is None:
                own = self._t.get_truncation()
                if own is None:
                    raise ValueError("truncation needs max_length (this tokenizer has no truncation settings)")
                max_length = own["max_length"]
            trunc = (_count(max_length, "max_length"), strategy, "right", 0)
        pad = None
        if padding not in (False, None, "do_not_pad"):
            if padding is True or padding == "longest":
                length = None
            elif padding == "max_length":
                if max_length is None:
                    raise ValueError("padding='max_length' needs max_length")
                length = _count(max_length, "max_length")
            else:
                raise ValueError(f"padding must be a bool, 'longest' or 'max_length', got {padding!r}")
            pad = (length, "right", _count(pad_to_multiple_of, "pad_to_multiple_of", True)) + self._pad_defaults()
        encs = self._t.encode_batch(a, b, bool(add_special_tokens), False, trunc, pad)
        if return_tensors is None:
            out = {"input_ids": [list(e.ids) for e in encs], "attention_mask": [list(e.attention_mask) for e in encs],
                   "token_type_ids": [list(e.type_ids) for e in encs]}
            if single:
                out = {k: v[0] for k, v in out.items()}
            return out
        if return_tensors != "np":
            raise ValueError(f"return_tensors must be None or 'np', got {return_tensors!r}")
        ids, mask, types = _core._tokenizer_arrays(encs)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def _pad_defaults(self):
        own = self._t.get_padding()
        if own is not None:
            return (own["pad_id"], own["pad_type_id"], own["pad_token"])
        for tok in ("[PAD]", "<pad>"):
            i = self._t.token_to_id(tok)
            if i is not None:
                return (i, 0, tok)
        raise ValueError("padding needs a pad token: this tokenizer has no padding settings and no [PAD] or <pad> "
                         "token (call enable_padding(pad_id=..., pad_token=...) first)")

    # ---- decoding ------------------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """ids -> text. An id that is not in the vocabulary is a ValueError."""
        ids = self._ids(ids)
        return self._t.decode(ids, bool(skip_special_tokens))

    def decode_batch(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> List[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    @staticmethod
    def _ids(ids) -> List[int]:
        try:
            import numpy as np
            if isinstance(ids, np.ndarray):
                if ids.ndim != 1 or ids.dtype.kind not in "iu":
                    raise TypeError(f"ids must be a 1-D integer array, got {ids.dtype} with shape {ids.shape}")
                ids = ids.tolist()
        except ImportError:  # pragma: no cover
            pass
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"ids must be a list of int, got {type(ids).__name__}")
        out = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int):
                try:
                    import numpy as np
                    if isinstance(i, np.integer):
                        i = int(i)
                    else:
                        raise TypeError
                except (ImportError, TypeError):
                    raise TypeError(f"ids must be ints, got {type(i).__name__}") from None
            if not -(2 ** 63) <= i < 2 ** 63:
                raise ValueError(f"id {i} is not in the vocabulary")
            out.append(i)
        return out

    # ---- vocabulary ----------------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> Optional[int]:
        if not isinstance(token, str):
            raise TypeError(f"token must be a str, got {type(token).__name__}")
        return self._t.token_to_id(_utf8(token, "token").decode("utf-8"))

    def id_to_token(self, id: int) -> Optional[str]:
        if isinstance(id, bool) or not isinstance(id, int):
            raise TypeError(f"id must be an int, got {type(id).__name__}")
        if not -(2 ** 63) <= id < 2 ** 63:
            return None
        return self._t.id_to_token(id)

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self._t.vocab_size(bool(with_added_tokens))

    # ---- padding and truncation ----------------------------------------------------------------------------
    def enable_padding(self, direction: str = "right", pad_id: int = 0, pad_type_id: int = 0,
                       pad_token: str = "[PAD]", length: Optional[int] = None,
                       pad_to_multiple_of: Optional[int] = None) -> None:
        """Pad every encoding to ``length`` (or, with None, to the longest of each batch)."""
        self._t.set_padding((_count(length, "length", True), _direction(direction),
                             _count(pad_to_multiple_of, "pad_to_multiple_of", True), _count(pad_id, "pad_id"),
                             _count(pad_type_id, "pad_type_id"), _utf8(pad_token, "pad_token").decode("utf-8")))

    def no_padding(self) -> None:
        self._t.set_padding(None)

    @property
    def padding(self) -> Optional[dict]:
        return self._t.get_padding()

    def enable_truncation(self, max_length: int, stride: int = 0, strategy: str = "longest_first",
                          direction: str = "right") -> None:
        """Truncate every encoding to ``max_length`` tokens (special tokens included). ``stride`` only shapes
        overflowing windows, which are not returned; it must be smaller than max_length."""
        if strategy not in ("longest_first", "only_first", "only_second"):
            raise ValueError(f"strategy must be 'longest_first', 'only_first' or 'only_second', got {strategy!r}")
        self._t.set_truncation((_count(max_length, "max_length"), strategy, _direction(direction),
                                _count(stride, "stride")))

    def no_truncation(self) -> None:
        self._t.set_truncation(None)

    @property
    def truncation(self) -> Optional[dict]:
        return self._t.get_truncation()

    def __repr__(self) -> str:
        return f"cpuformer.Tokenizer(vocab_size={self.get_vocab_size()})"


def _restore(json_text: str, padding: Optional[dict], truncation: Optional[dict]) -> Tokenizer:
    """A tokenizer rebuilt from its tokenizer.json text with the given settings (for copy, deepcopy, pickle)."""
    tok = Tokenizer.from_str(json_text)
    if padding is None:
        tok.no_padding()
    else:
        tok.enable_padding(**padding)
    if truncation is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(**truncation)
    return tok
