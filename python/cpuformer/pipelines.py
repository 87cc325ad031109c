"""Task pipelines over cpuformer models: ``cpuformer.pipeline(task, model, **kw)``, as ``transformers.pipeline``.

``model`` is a directory (a Hugging Face model directory, a sentence-transformers directory, or the output directory
of one of cpuformer's training jobs), a cpuformer model file (``model.safetensors`` written by ``cpuformer.save`` or a
training checkpoint), or an already loaded model (``from_pretrained``'s models, ``SentenceEncoder``, or cpuformer's
own ``GPT`` / ``TransformerClassifier`` / ``Seq2SeqTransformer``) with ``tokenizer=...``. Inputs and outputs follow
``transformers``: one input gives one result, a list gives a list in the same order (inputs are batched internally,
``batch_size`` at a time, sorted by length; the order is restored).

Tasks:

- ``"feature-extraction"``: per-token hidden states; each text gives a nested list (1, T, H) as ``transformers``
  returns it (``return_tensors=True``: a (1, T, H) float32 array).
- ``"sentence-embedding"``: ``SentenceEncoder`` embeddings, (D,) float32 per text ((N, D) for a list).
- ``"sentence-similarity"``: ``pipe(source, [candidates])`` or ``pipe({"source_sentence": s, "sentences": [...]})``
  -> cosine scores (list of float); ``pipe([(a, b), ...])`` -> one score per pair.
- ``"text-classification"`` (``"sentiment-analysis"``): ``[{"label", "score"}]`` with labels from ``id2label``,
  scores by softmax (sigmoid for ``problem_type="multi_label_classification"`` or a single logit; none for
  regression; ``function_to_apply`` overrides). Without ``top_k`` a text gives its best label (a one-element list for
  a single text, as ``transformers``); ``top_k=k`` (or None for all) gives the k best, sorted. Text pairs (cross-
  encoders): ``{"text": a, "text_pair": b}``.
- ``"token-classification"`` (``"ner"``): entities with ``start``/``end`` character offsets into the text;
  ``aggregation_strategy`` "none" (per token: entity, score, index, word, start, end), "simple" (adjacent tokens of
  one entity grouped as ``transformers`` groups B-/I- tags: entity_group, score, word, start, end), "first",
  "average", "max" (word-level, for tokenizers with a continuing-subword prefix). "O" is ignored
  (``ignore_labels``). Texts longer than the model are truncated.
- ``"question-answering"``: ``pipe(question=q, context=c)`` or ``pipe({"question", "context"})`` -> ``{"score",
  "start", "end", "answer"}`` (character offsets into the context; spans aligned to words) as ``transformers`` 4.x
  computed it: start x end probabilities over the context tokens, ``max_answer_len`` 15, ``top_k``. A context longer
  than ``max_seq_len`` (default min(384, the model's length)) is cut into overlapping windows of context tokens
  (``doc_stride``, default min(128, max_seq_len // 2)) as the tokenizer's overflowing tokens are, and the best span
  over all windows wins.
- ``"fill-mask"``: ``top_k`` (default 5) ``{"score", "token", "token_str", "sequence"}`` per mask token
  (``targets`` restricts the candidates).
- ``"text-generation"``: ``[{"generated_text": prompt + continuation}]`` (``return_full_text=False``: the
  continuation only). ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
  ``eos_token_id``; defaults from the model's ``generation_config.json`` where it sets them, else
  ``max_new_tokens=256`` and greedy decoding. Greedy prompts are batched (left-padded, which gives what each gets
  alone); sampled prompts run one at a time, each with ``seed``. ``stream=True`` (one prompt) returns an iterator of
  text pieces of the continuation as the tokens are produced; their concatenation is the continuation that
  ``return_full_text=False`` gives (a piece is emitted only once it is stable: text ending in an incomplete UTF-8
  character, U+FFFD, is held back until the next token completes it).
- ``"translation"`` / ``"text2text-generation"`` (``"summarization"``): ``Seq2SeqLM.generate`` / cpuformer's
  ``Seq2SeqTransformer.translate``; ``num_beams``, ``max_new_tokens`` (defaults from ``generation_config.json``:
  ``num_beams``, ``max_length`` - 1, else 1 and 19 as ``transformers``' defaults); ``[{"translation_text"}]`` /
  ``[{"generated_text"}]``.
- ``"image-classification"``: numpy images, HWC (uint8 0-255, or float: values above 1 are taken as 0-255) or CHW
  float, grayscale HW; resized to the model's ``image_size`` with bilinear interpolation (as PIL's, in float),
  rescaled, normalised (mean = std = 0.5 unless ``preprocessor_config.json`` says otherwise); ``top_k`` (default 5)
  ``{"label", "score"}``.

cpuformer's own models: a ``GPT`` does ``text-generation`` with the tokenizer its job saved (``tokenizer.json``: a
character tokenizer or a byte-level BPE); a ``TransformerClassifier`` does ``text-classification`` (``tokenizer.json``
of its word tokenizer; labels from ``labels.json`` (a list of names, or {"id": name}) or ``LABEL_<i>``); a
``Seq2SeqTransformer`` does ``translation`` (``source_tokenizer.json`` and ``target_tokenizer.json``). See
:func:`load_model`.

Errors (an unknown task, a model that cannot do the task, a missing tokenizer) are a ``ValueError`` naming them.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

from . import _core
from .models.pretrained import _read_json
from .tokenizer import Tokenizer

__all__ = ["pipeline", "load_model", "Pipeline", "TrainedModel", "IncrementalDecoder", "TASKS"]

TASKS = ("feature-extraction", "sentence-embedding", "sentence-similarity", "text-classification",
         "token-classification", "question-answering", "fill-mask", "text-generation", "translation",
         "text2text-generation", "image-classification")
_ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification",
            "summarization": "text2text-generation"}


def _canonical_task(task) -> str:
    if not isinstance(task, str):
        raise ValueError(f"task must be a str, one of {', '.join(TASKS)}; got {task!r}")
    t = _ALIASES.get(task, task)
    if t.startswith("translation_"):  # translation_en_to_fr as transformers 4 named it
        t = "translation"
    if t not in TASKS:
        raise ValueError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    return t


# ----------------------------------------------------------------------------------------------- loading models

class TrainedModel:
    """A model trained by cpuformer's jobs with what it needs to run a task: ``model`` (GPT,
    TransformerClassifier or Seq2SeqTransformer), ``tokenizer`` (or ``source_tokenizer`` / ``target_tokenizer``
    for a Seq2SeqTransformer), ``id2label``, ``path``."""

    def __init__(self, model, tokenizer=None, source_tokenizer=None, target_tokenizer=None,
                 id2label: Optional[Dict[int, str]] = None, path: Optional[str] = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.source_tokenizer, self.target_tokenizer = source_tokenizer, target_tokenizer
        self.id2label, self.path = id2label, path

    def __repr__(self) -> str:
        return f"TrainedModel({type(self.model).__name__}, {self.path!r})"


def load_tokenizer_file(path: str):
    """A tokenizer file a training job wrote: cpuformer's character/word tokenizer ({"kind": ...}) or a Hugging
    Face ``tokenizer.json`` (the byte-level BPE jobs), as a :class:`cpuformer.Tokenizer`."""
    data = _read_json(path)
    if isinstance(data, dict) and data.get("kind") in ("char", "word"):
        from .data.tokenizers import load_tokenizer
        return load_tokenizer(path)
    return Tokenizer.from_file(path)


def _newest_checkpoint_model(directory: str) -> Optional[str]:
    from .train import latest_checkpoint
    ckpt = latest_checkpoint(directory)
    if ckpt and os.path.isfile(os.path.join(ckpt, "model.safetensors")):
        return os.path.join(ckpt, "model.safetensors")
    return None


def _labels_of(directory: str, num_classes: int) -> Dict[int, str]:
    path = os.path.join(directory, "labels.json")
    if os.path.isfile(path):
        data = _read_json(path)
        if isinstance(data, list):
            return {i: str(v) for i, v in enumerate(data)}
        if isinstance(data, dict):
            data = data.get("id2label", data)
            try:
                return {int(k): str(v) for k, v in data.items()}
            except (TypeError, ValueError):
                pass
        raise ValueError(f"{path}: expected a list of label names or an object id -> name")
    return {i: f"LABEL_{i}" for i in range(num_classes)}


def _load_trained(path: str) -> TrainedModel:
    from .serialization import load
    if os.path.isdir(path):
        file = os.path.join(path, "model.safetensors")
        if not os.path.isfile(file):
            file = _newest_checkpoint_model(path)
        if file is None:
            raise ValueError(f"{path}: not a model directory (no config.json for a Hugging Face model, no "
                             "model.safetensors or checkpoint-N/model.safetensors for a cpuformer model)")
        run_dir = path
    else:
        file = path
        run_dir = os.path.dirname(os.path.abspath(path))
    model = load(file)
    # the tokenizer files sit next to the model file, or in the run directory above a checkpoint-N folder
    dirs = [run_dir]
    if os.path.basename(run_dir.rstrip(os.sep)).startswith("checkpoint-"):
        dirs.append(os.path.dirname(run_dir.rstrip(os.sep)))

    def find(name):
        for d in dirs:
            p = os.path.join(d, name)
            if os.path.isfile(p):
                return load_tokenizer_file(p)
        return None

    name = type(model).__name__
    if name == "Seq2SeqTransformer":
        src, tgt = find("source_tokenizer.json"), find("target_tokenizer.json")
        shared = find("tokenizer.json")
        return TrainedModel(model, source_tokenizer=src or shared, target_tokenizer=tgt or shared, path=path)
    labels = None
    if name == "TransformerClassifier":
        where = [d for d in dirs if os.path.isfile(os.path.join(d, "labels.json"))]
        labels = _labels_of(where[0] if where else run_dir, model.config["num_classes"])
    return TrainedModel(model, tokenizer=find("tokenizer.json"), id2label=labels, path=path)


_SENTENCE_TASKS = ("sentence-embedding", "sentence-similarity")


def load_model(path, task: Optional[str] = None, **kwargs):
    """Load what ``path`` holds: a sentence-transformers directory (``modules.json``; as a ``SentenceEncoder`` for
    the sentence tasks or no task, else its Transformer module), a Hugging Face directory (``config.json``:
    ``from_pretrained``), or a cpuformer model (a ``model.safetensors`` file or a directory with one, or a training
    job's output directory: its newest checkpoint) as a :class:`TrainedModel` with the tokenizer and labels found
    beside it. ``kwargs`` go to ``from_pretrained`` (``dtype``, ``weights``)."""
    from .models.pretrained import SentenceEncoder, from_pretrained
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        modules = os.path.join(path, "modules.json")
        if os.path.isfile(modules):
            if task in (None,) + _SENTENCE_TASKS:
                return SentenceEncoder.from_pretrained(path, **kwargs)
            for mod in _read_json(modules):
                if str(mod.get("type", "")).endswith("Transformer"):
                    return from_pretrained(os.path.join(path, mod.get("path", "")), **kwargs)
        if os.path.isfile(os.path.join(path, "config.json")):
            if task in _SENTENCE_TASKS:
                return SentenceEncoder.from_pretrained(path, **kwargs)
            return from_pretrained(path, **kwargs)
    return _load_trained(path)


# ----------------------------------------------------------------------------------------------- tokenizer helpers

class _TokInfo:
    """What the pipelines need to know about a Hugging Face tokenizer: special tokens and ids, its length limit,
    its model's continuing-subword prefix."""

    def __init__(self, tok: Tokenizer, directory: Optional[str]) -> None:
        cfg: Dict[str, Any] = {}
        if directory:
            for name in ("special_tokens_map.json", "tokenizer_config.json"):
                p = os.path.join(directory, name)
                if os.path.isfile(p):
                    d = _read_json(p)
                    if isinstance(d, dict):
                        cfg.update(d)
        try:
            spec = json.loads(tok._json)
        except ValueError:  # pragma: no cover
            spec = {}
        model = spec.get("model") or {}
        self.subword_prefix = model.get("continuing_subword_prefix") or None
        self.decoder_type = (spec.get("decoder") or {}).get("type")
        self.tok = tok

        def special(key, defaults):
            v = cfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            for cand in ([v] if isinstance(v, str) else []) + list(defaults):
                if cand and tok.token_to_id(cand) is not None:
                    return cand, tok.token_to_id(cand)
            return None, None

        self.mask_token, self.mask_id = special("mask_token", ["[MASK]", "<mask>"])
        self.cls_token, self.cls_id = special("cls_token", ["[CLS]", "<s>"])
        self.pad_token, self.pad_id = special("pad_token", ["[PAD]", "<pad>"])
        self.unk_token, self.unk_id = special("unk_token", ["[UNK]", "<unk>"])
        mml = cfg.get("model_max_length")
        self.model_max_length = int(mml) if isinstance(mml, (int, float)) and 0 < mml < 1e9 else None

    def tokens_to_string(self, tokens: List[str]) -> str:
        """transformers' convert_tokens_to_string for a fast tokenizer: the decoder over the tokens."""
        ids = [self.tok.token_to_id(t) for t in tokens]
        if all(i is not None for i in ids):
            return self.tok.decode(ids, skip_special_tokens=False)
        if self.decoder_type == "WordPiece" or self.subword_prefix:  # a word not in the vocabulary (an [UNK])
            prefix = self.subword_prefix or "##"
            out = ""
            for i, t in enumerate(tokens):
                out += t[len(prefix):] if t.startswith(prefix) else (" " + t if i else t)
            return out
        return "".join(tokens)


def _pad_rows(rows: List[List[int]], pad: int, left: bool = False):
    T = max(len(r) for r in rows)
    ids = np.full((len(rows), T), pad, np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    for b, r in enumerate(rows):
        if left:
            ids[b, T - len(r):] = r
            mask[b, T - len(r):] = 1
        else:
            ids[b, :len(r)] = r
            mask[b, :len(r)] = 1
    return ids, mask


def _batches(lengths: Sequence[int], batch_size: int):
    """Index batches of at most batch_size, longest first (so that each batch pads little)."""
    order = np.argsort([-n for n in lengths], kind="stable")
    for i in range(0, len(order), batch_size):
        yield [int(j) for j in order[i:i + batch_size]]


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _gen_config(directory: Optional[str]) -> dict:
    if directory:
        p = os.path.join(directory, "generation_config.json")
        if os.path.isfile(p):
            d = _read_json(p)
            if isinstance(d, dict):
                return d
    return {}


# ----------------------------------------------------------------------------------------------- incremental decode

class IncrementalDecoder:
    """Text of a growing id sequence, piece by piece: ``push(id)`` returns the new stable text (possibly ""),
    ``flush()`` whatever was held back. The ids so far are decoded whole and only the new suffix is emitted; text
    ending in U+FFFD (an incomplete UTF-8 character from byte-level pieces) is held back until a later token
    completes it, so the pieces concatenate to ``decode(all ids)``."""

    def __init__(self, decode) -> None:
        self._decode, self.ids, self.emitted = decode, [], ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self._decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def flush(self) -> str:
        text = self._decode(self.ids)
        if text.startswith(self.emitted):
            piece = text[len(self.emitted):]
        else:  # the decoder changed text already emitted (a clean-up rule): emit only what is longer
            piece = text[len(self.emitted):] if len(text) > len(self.emitted) else ""
        self.emitted = text
        return piece


# ----------------------------------------------------------------------------------------------- pipelines

class Pipeline:
    """Base class: ``pipe(inputs, **kw)``; keyword arguments given to :func:`pipeline` are defaults for calls."""

    task = ""

    def __init__(self, model, tokenizer=None, batch_size: int = 8, **defaults) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.model, self.tokenizer, self.batch_size, self.defaults = model, tokenizer, batch_size, defaults

    def __call__(self, inputs, **kw):
        params = {**self.defaults, **kw}
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        results = self._run(items, **params) if items else []
        return results[0] if single else results

    def _run(self, items, **params):  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, model={self.model!r})"


def _text(x, what="input") -> str:
    if not isinstance(x, str):
        raise TypeError(f"each {what} must be a str, got {type(x).__name__}")
    return x


class _EncoderPipeline(Pipeline):
    """Shared tokenization for Hugging Face encoder tasks (truncated to the model's length)."""

    def __init__(self, model, tokenizer, batch_size=8, id2label=None, **defaults):
        super().__init__(model, tokenizer, batch_size, **defaults)
        self.info = _TokInfo(tokenizer, getattr(model, "directory", None))
        limit = model._core.max_positions or 512
        if self.info.model_max_length:
            limit = min(limit, self.info.model_max_length)
        self.max_length = limit
        self.id2label = dict(id2label or getattr(model, "id2label", {}) or {})
        self._trunc = copy.copy(tokenizer)  # a private copy with truncation: the caller's tokenizer is untouched
        self._trunc.no_padding()
        self._trunc.enable_truncation(limit)

    def _encodings(self, texts, pairs=None):
        return self._trunc.encode_batch(list(zip(texts, pairs)) if pairs is not None else texts)

    def _arrays(self, encs):
        ids, mask = _pad_rows([e.ids for e in encs], self.info.pad_id or 0)
        types, _ = _pad_rows([e.type_ids for e in encs], 0)
        return ids, mask, types


class FeatureExtractionPipeline(_EncoderPipeline):
    task = "feature-extraction"

    def _run(self, items, return_tensors=False):
        from .models.pretrained import CausalLM
        texts = [_text(t) for t in items]
        out: List[Any] = [None] * len(texts)
        encs = self._encodings(texts)
        for idx in _batches([len(e) for e in encs], self.batch_size):
            ids, mask, types = self._arrays([encs[i] for i in idx])
            if isinstance(self.model, CausalLM):
                hidden = self.model.hidden_states(ids, mask)
            else:
                hidden = self.model.hidden_states(ids, mask, types)
            for r, i in enumerate(idx):
                h = np.ascontiguousarray(hidden[r:r + 1, :len(encs[i])])  # right padding
                out[i] = h if return_tensors else h.tolist()
        return out


class SentenceEmbeddingPipeline(Pipeline):
    task = "sentence-embedding"

    def __call__(self, inputs, normalize_embeddings: Optional[bool] = None, **kw):
        texts = [inputs] if isinstance(inputs, str) else [_text(t) for t in inputs]
        emb = self.model.encode(texts, batch_size=self.batch_size,
                                normalize_embeddings=self.defaults.get("normalize_embeddings", normalize_embeddings))
        return emb[0] if isinstance(inputs, str) else emb


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    na = np.maximum(np.linalg.norm(a, axis=-1), 1e-12)
    nb = np.maximum(np.linalg.norm(b, axis=-1), 1e-12)
    return (a * b).sum(-1) / (na * nb)


class SentenceSimilarityPipeline(Pipeline):
    task = "sentence-similarity"

    def __call__(self, inputs, candidates=None, **kw):
        if isinstance(inputs, dict):
            if "source_sentence" not in inputs or "sentences" not in inputs:
                raise ValueError('sentence-similarity: a dict input needs "source_sentence" and "sentences"')
            inputs, candidates = inputs["source_sentence"], inputs["sentences"]
        if isinstance(inputs, str):
            if candidates is None:
                raise ValueError("sentence-similarity: give (source, candidates) or a list of (a, b) pairs")
            cands = [candidates] if isinstance(candidates, str) else [_text(c) for c in candidates]
            emb = self.model.encode([inputs] + cands, batch_size=self.batch_size)
            return [float(s) for s in _cos(emb[:1], emb[1:])]
        pairs = list(inputs)
        if any(not isinstance(p, (tuple, list)) or len(p) != 2 for p in pairs):
            raise ValueError("sentence-similarity: a list input must hold (text, text) pairs")
        flat = [_text(t) for p in pairs for t in p]
        emb = self.model.encode(flat, batch_size=self.batch_size) if flat else np.zeros((0, 1), np.float32)
        return [float(s) for s in _cos(emb[0::2], emb[1::2])]


class TextClassificationPipeline(Pipeline):
    task = "text-classification"
    _UNSET = object()

    def __init__(self, model, tokenizer, batch_size=8, id2label=None, **defaults):
        super().__init__(model, tokenizer, batch_size, **defaults)
        self.own = isinstance(model, TrainedModel)
        if self.own:
            self.id2label = dict(id2label or model.id2label or {})
            self.problem_type = None
            n = model.model.config["num_classes"]
        else:
            self.info = _TokInfo(tokenizer, model.directory)
            limit = model._core.max_positions or 512
            self.max_length = min(limit, self.info.model_max_length or limit)
            self.id2label = dict(id2label or model.id2label)
            self.problem_type = model.config.get("problem_type")
            n = model._core.num_labels
        for i in range(n):
            self.id2label.setdefault(i, f"LABEL_{i}")

    def __call__(self, inputs, top_k=_UNSET, **kw):
        legacy = top_k is TextClassificationPipeline._UNSET and "top_k" not in self.defaults
        if top_k is TextClassificationPipeline._UNSET:
            top_k = self.defaults.get("top_k", 1)
        params = {k: v for k, v in {**self.defaults, **kw}.items() if k != "top_k"}
        single = isinstance(inputs, (str, dict))
        items = [inputs] if single else list(inputs)
        scores = self._scores(items, **params)
        out = []
        for s in scores:
            ranked = sorted(({"label": self.id2label[i], "score": float(v)} for i, v in enumerate(s)),
                            key=lambda d: d["score"], reverse=True)
            if legacy:
                out.append(ranked[0])
            else:
                out.append(ranked if top_k is None else ranked[:int(top_k)])
        if single:  # as transformers: a str alone gives a one-element list, a {"text", "text_pair"} dict a dict
            return [out[0]] if legacy and isinstance(inputs, str) else out[0]
        return out

    def _scores(self, items, function_to_apply=None):
        texts, pairs = [], []
        for x in items:
            if isinstance(x, dict):
                if "text" not in x:
                    raise ValueError('text-classification: a dict input needs "text" (and "text_pair")')
                texts.append(_text(x["text"]))
                pairs.append(x.get("text_pair"))
            elif isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(t, str) for t in x):
                texts.append(x[0])
                pairs.append(x[1])
            else:
                texts.append(_text(x))
                pairs.append(None)
        if self.own and any(p is not None for p in pairs):
            raise ValueError("text-classification: a cpuformer TransformerClassifier takes single texts, not pairs")
        logits = [None] * len(texts)
        if self.own:
            m, tok = self.model.model, self.model.tokenizer
            max_len = m.config["max_len"]
            rows = [(tok.encode(t) or [tok.unk_id])[:max_len] for t in texts]
            for idx in _batches([len(r) for r in rows], self.batch_size):
                ids, _ = _pad_rows([rows[i] for i in idx], m.config["pad_id"])
                out = np.asarray(m(ids))
                for r, i in enumerate(idx):
                    logits[i] = out[r]
        else:
            encs = [self.tokenizer.encode(t, p) for t, p in zip(texts, pairs)]
            groups: Dict[bool, List[int]] = {}
            for i, p in enumerate(pairs):
                groups.setdefault(p is not None, []).append(i)
            for has_pair, members in groups.items():
                for sub in _batches([len(encs[i]) for i in members], self.batch_size):
                    idx = [members[j] for j in sub]
                    enc = self.tokenizer([texts[i] for i in idx], [pairs[i] for i in idx] if has_pair else None,
                                         padding=True, truncation="longest_first", max_length=self.max_length,
                                         return_tensors="np")
                    out = self.model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
                    for r, i in enumerate(idx):
                        logits[i] = out[r]
        fn = function_to_apply
        if fn is None:
            if self.problem_type == "regression":
                fn = "none"
            elif self.problem_type == "multi_label_classification" or len(self.id2label) == 1:
                fn = "sigmoid"
            else:
                fn = "softmax"
        fn = str(fn).lower()
        if fn not in ("softmax", "sigmoid", "none"):
            raise ValueError(f"function_to_apply must be 'softmax', 'sigmoid' or 'none', got {function_to_apply!r}")
        apply = {"softmax": _softmax, "sigmoid": _sigmoid, "none": lambda x: np.asarray(x, np.float64)}[fn]
        return [apply(np.asarray(lg, np.float32)) for lg in logits]


class TokenClassificationPipeline(_EncoderPipeline):
    task = "token-classification"

    def _run(self, items, aggregation_strategy="none", ignore_labels=None):
        strategy = str(aggregation_strategy or "none").lower()
        if strategy not in ("none", "simple", "first", "average", "max"):
            raise ValueError(f"aggregation_strategy must be none, simple, first, average or max, got "
                             f"{aggregation_strategy!r}")
        if strategy in ("first", "average", "max") and not self.info.subword_prefix:
            raise ValueError(f"aggregation_strategy {strategy!r} needs a tokenizer with a continuing-subword "
                             "prefix (word-aware); use 'simple'")
        ignore = ["O"] if ignore_labels is None else list(ignore_labels)
        id2label = self.id2label
        texts = [_text(t) for t in items]
        out: List[Any] = [None] * len(texts)
        all_encs = self._encodings(texts)
        for idx in _batches([len(e) for e in all_encs], self.batch_size):
            ids, mask, types = self._arrays([all_encs[i] for i in idx])
            logits = self.model(ids, mask, types)
            for r, i in enumerate(idx):
                e = all_encs[i]
                probs = _softmax(logits[r, :len(e)]).astype(np.float32)
                pre = self._pre_entities(texts[i], e, probs, strategy)
                ents = self._aggregate(pre, strategy, id2label)
                out[i] = [x for x in ents if x.get("entity", x.get("entity_group")) not in ignore]
        return out

    def _pre_entities(self, sentence, enc, probs, strategy):
        pre = []
        tokens, special, offsets, ids = enc.tokens, enc.special_tokens_mask, enc.offsets, enc.ids
        for i in range(len(ids)):
            if special[i]:
                continue
            word = tokens[i]
            s, e = offsets[i]
            ref = sentence[s:e]
            if self.info.subword_prefix:
                is_sub = len(word) != len(ref)
            else:
                is_sub = s > 0 and " " not in sentence[s - 1:s + 1]
            if ids[i] == self.info.unk_id:
                word, is_sub = ref, False
            pre.append({"word": word, "scores": probs[i], "start": s, "end": e, "index": i, "is_subword": is_sub})
        return pre

    def _aggregate(self, pre, strategy, id2label):
        if strategy in ("none", "simple"):
            ents = []
            for p in pre:
                k = int(p["scores"].argmax())
                ents.append({"entity": id2label[k], "score": float(p["scores"][k]), "index": p["index"],
                             "word": p["word"], "start": p["start"], "end": p["end"]})
        else:
            ents, group = [], None
            for p in pre:
                if group is None:
                    group = [p]
                elif p["is_subword"]:
                    group.append(p)
                else:
                    ents.append(self._word(group, strategy, id2label))
                    group = [p]
            if group:
                ents.append(self._word(group, strategy, id2label))
        if strategy == "none":
            return ents
        return self._group(ents)

    def _word(self, group, strategy, id2label):
        if strategy == "first":
            scores = group[0]["scores"]
        elif strategy == "max":
            scores = max(group, key=lambda p: p["scores"].max())["scores"]
        else:
            scores = np.nanmean(np.stack([p["scores"] for p in group]), axis=0)
        k = int(scores.argmax())
        return {"entity": id2label[k], "score": float(scores[k]),
                "word": self.info.tokens_to_string([p["word"] for p in group]),
                "start": group[0]["start"], "end": group[-1]["end"]}

    @staticmethod
    def _tag(name):
        if name.startswith("B-"):
            return "B", name[2:]
        if name.startswith("I-"):
            return "I", name[2:]
        return "I", name

    def _group(self, ents):
        groups, current = [], []
        for ent in ents:
            if not current:
                current.append(ent)
                continue
            bi, tag = self._tag(ent["entity"])
            _, last_tag = self._tag(current[-1]["entity"])
            if tag == last_tag and bi != "B":
                current.append(ent)
            else:
                groups.append(self._group_one(current))
                current = [ent]
        if current:
            groups.append(self._group_one(current))
        return groups

    def _group_one(self, ents):
        return {"entity_group": ents[0]["entity"].split("-", 1)[-1],
                "score": float(np.nanmean([e["score"] for e in ents])),
                "word": self.info.tokens_to_string([e["word"] for e in ents]),
                "start": ents[0]["start"], "end": ents[-1]["end"]}


def pair_template(tokenizer):
    """A text pair's special-token layout around (question, context): (prefix, middle, suffix) as (ids, type ids),
    the type id of the question tokens and of the context tokens: ``prefix, q_type, middle, c_type, suffix``."""
    e = tokenizer.encode("q", "c")
    seq, ids, types = e.sequence_ids, e.ids, e.type_ids
    firsts = [i for i, s in enumerate(seq) if s == 0]
    seconds = [i for i, s in enumerate(seq) if s == 1]
    if not firsts or not seconds:
        raise ValueError("question-answering: the tokenizer does not encode text pairs")
    a0, a1, b0, b1 = firsts[0], firsts[-1], seconds[0], seconds[-1]
    part = lambda lo, hi: (ids[lo:hi], types[lo:hi])  # noqa: E731
    return part(0, a0), types[a0], part(a1 + 1, b0), types[b0], part(b1 + 1, len(ids))


class QuestionAnsweringPipeline(_EncoderPipeline):
    task = "question-answering"

    def __call__(self, inputs=None, context=None, question=None, **kw):
        if inputs is None and question is not None:
            inputs = {"question": question, "context": context}
        elif isinstance(inputs, str) and context is not None:
            inputs = {"question": inputs, "context": context}
        if isinstance(question, (list, tuple)) and isinstance(context, (list, tuple)):
            inputs = [{"question": q, "context": c} for q, c in zip(question, context)]
        single = isinstance(inputs, dict)
        items = [inputs] if single else list(inputs or [])
        for x in items:
            if not isinstance(x, dict) or not isinstance(x.get("question"), str) or \
                    not isinstance(x.get("context"), str):
                raise ValueError('question-answering: give question=..., context=... or {"question", "context"} '
                                 "dicts (str values)")
        params = {**self.defaults, **kw}
        results = [self._answer(x["question"], x["context"], **params) for x in items]
        return results[0] if single else results

    def _template(self, q_ids):
        return pair_template(self.tokenizer)

    def _answer(self, question, context, top_k=1, doc_stride=None, max_answer_len=15, max_seq_len=None,
                max_question_len=64, handle_impossible_answer=False, align_to_words=True):
        max_seq_len = int(max_seq_len or min(384, self.max_length))
        doc_stride = int(doc_stride if doc_stride is not None else min(128, max_seq_len // 2))
        q = self.tokenizer.encode(question, add_special_tokens=False)
        c = self.tokenizer.encode(context, add_special_tokens=False)
        (pre, pre_t), q_type, (mid, mid_t), c_type, (suf, suf_t) = self._template(q.ids)
        budget = max_seq_len - len(pre) - len(q.ids) - len(mid) - len(suf)
        if budget <= 0:
            raise ValueError(f"question-answering: the question ({len(q.ids)} tokens) leaves no room for the context "
                             f"in max_seq_len {max_seq_len}")
        if doc_stride >= budget:
            raise ValueError(f"question-answering: doc_stride ({doc_stride}) must be smaller than the context "
                             f"tokens per window ({budget})")
        n = len(c.ids)
        windows, start = [], 0
        while True:  # the tokenizer's overflowing windows: step budget - stride, each up to budget tokens
            stop = min(start + budget, n)
            windows.append((start, stop))
            if stop >= n:
                break
            start += budget - doc_stride
        rows, types, ctx_pos = [], [], []
        for lo, hi in windows:
            rows.append(list(pre) + q.ids + list(mid) + c.ids[lo:hi] + list(suf))
            types.append(list(pre_t) + [q_type] * len(q.ids) + list(mid_t) + [c_type] * (hi - lo) + list(suf_t))
            ctx_pos.append(len(pre) + len(q.ids) + len(mid))
        answers = []
        min_null = 1000000.0
        c_offsets, c_words = c.offsets, c.word_ids
        for bi in range(0, len(rows), self.batch_size):
            ids, mask = _pad_rows(rows[bi:bi + self.batch_size], self.info.pad_id or 0)
            tt, _ = _pad_rows(types[bi:bi + self.batch_size], 0)
            start_logits, end_logits = self.model(ids, mask, tt)
            for r in range(ids.shape[0]):
                w = bi + r
                lo, hi = windows[w]
                T = ids.shape[1]
                p_mask = np.ones(T, bool)  # True = not a possible answer token
                p_mask[ctx_pos[w]:ctx_pos[w] + hi - lo] = False
                if self.info.cls_id is not None:
                    p_mask[ids[r] == self.info.cls_id] = False
                undesired = (~p_mask) & (mask[r] == 1)  # tokens allowed
                s = np.where(undesired, start_logits[r], -10000.0)
                e = np.where(undesired, end_logits[r], -10000.0)
                s = _softmax(s.astype(np.float32)).astype(np.float32)
                e = _softmax(e.astype(np.float32)).astype(np.float32)
                if handle_impossible_answer:
                    min_null = min(min_null, float(s[0] * e[0]))
                s[0] = e[0] = 0.0
                outer = np.triu(np.tril(np.outer(s, e), max_answer_len - 1))
                flat = outer.ravel()
                k = int(top_k)
                order = np.argsort(-flat, kind="stable")[:k] if k > 1 else [int(np.argmax(flat))]
                allowed = set(np.nonzero(undesired)[0].tolist())
                for idx in order:
                    si, ei = divmod(int(idx), T)
                    if si not in allowed or ei not in allowed:
                        continue
                    score = float(outer[si, ei])
                    cs, ce = si - ctx_pos[w] + lo, ei - ctx_pos[w] + lo
                    if 0 <= cs < n and 0 <= ce < n:
                        a, b = self._chars(c_offsets, c_words, cs, ce, align_to_words)
                    else:  # the CLS token: no span
                        a, b = 0, 0
                    answers.append({"score": score, "start": a, "end": b, "answer": context[a:b]})
        if handle_impossible_answer:
            answers.append({"score": min_null, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:int(top_k)]
        if int(top_k) == 1:
            return answers[0] if answers else {"score": 0.0, "start": 0, "end": 0, "answer": ""}
        return answers

    @staticmethod
    def _chars(offsets, words, s, e, align):
        if align and words[s] is not None and words[e] is not None:
            ws = [i for i, w in enumerate(words) if w == words[s]]
            we = [i for i, w in enumerate(words) if w == words[e]]
            return offsets[ws[0]][0], offsets[we[-1]][1]
        return offsets[s][0], offsets[e][1]


class FillMaskPipeline(_EncoderPipeline):
    task = "fill-mask"

    def __init__(self, model, tokenizer, batch_size=8, **defaults):
        super().__init__(model, tokenizer, batch_size, **defaults)
        if self.info.mask_id is None:
            raise ValueError("fill-mask: the tokenizer has no mask token ([MASK] or <mask>)")

    def _run(self, items, top_k=5, targets=None):
        texts = [_text(t) for t in items]
        target_ids = None
        if targets is not None:
            targets = [targets] if isinstance(targets, str) else list(targets)
            target_ids = []
            for t in targets:
                i = self.tokenizer.token_to_id(t)
                if i is None:
                    enc = self.tokenizer.encode(t, add_special_tokens=False).ids
                    if not enc:
                        continue
                    i = enc[0]
                target_ids.append(i)
            target_ids = np.array(sorted(set(target_ids)), np.int64)
            if not len(target_ids):
                raise ValueError("fill-mask: at least one target must be provided")
        encs = self._encodings(texts)
        for t, e in zip(texts, encs):
            if self.info.mask_id not in e.ids:
                raise ValueError(f"fill-mask: no mask token ({self.info.mask_token}) in {t!r}")
        out: List[Any] = [None] * len(texts)
        for idx in _batches([len(e) for e in encs], self.batch_size):
            ids, mask, types = self._arrays([encs[i] for i in idx])
            logits = self.model(ids, mask, types)
            for r, i in enumerate(idx):
                row = ids[r][mask[r] == 1]
                where = np.nonzero(row == self.info.mask_id)[0]
                single = len(where) == 1
                per_mask = []
                for m in where:
                    probs = _softmax(logits[r, m].astype(np.float32)).astype(np.float32)
                    cand = np.arange(len(probs)) if target_ids is None else target_ids
                    p = probs[cand]
                    k = min(int(top_k), len(cand))
                    best = np.argsort(-p, kind="stable")[:k]
                    props = []
                    for b in best:
                        tok_id = int(cand[b])
                        seq = row.copy()
                        seq[m] = tok_id
                        if self.info.pad_id is not None:
                            seq = seq[seq != self.info.pad_id]
                        props.append({"score": float(p[b]), "token": tok_id,
                                      "token_str": self.tokenizer.decode([tok_id], skip_special_tokens=False),
                                      "sequence": self.tokenizer.decode(seq.tolist(), skip_special_tokens=single)})
                    per_mask.append(props)
                out[i] = per_mask[0] if single else per_mask
        return out


class ImageClassificationPipeline(Pipeline):
    task = "image-classification"

    def __init__(self, model, tokenizer=None, batch_size=8, **defaults):
        super().__init__(model, tokenizer, batch_size, **defaults)
        cfg = model.config
        pp = {}
        p = os.path.join(model.directory, "preprocessor_config.json")
        if os.path.isfile(p):
            pp = _read_json(p)
        size = pp.get("size") or {}
        if isinstance(size, int):
            size = {"height": size, "width": size}
        default = int(cfg.get("image_size", 224))
        self.size = (int(size.get("height", size.get("shortest_edge", default))),
                     int(size.get("width", size.get("shortest_edge", default))))
        self.do_resize = pp.get("do_resize", True)
        self.do_rescale = pp.get("do_rescale", True)
        self.rescale = float(pp.get("rescale_factor", 1 / 255))
        self.do_normalize = pp.get("do_normalize", True)
        self.mean = np.asarray(pp.get("image_mean", [0.5, 0.5, 0.5]), np.float32)
        self.std = np.asarray(pp.get("image_std", [0.5, 0.5, 0.5]), np.float32)
        self.channels = int(cfg.get("num_channels", 3))
        self.problem_type = cfg.get("problem_type")

    def preprocess(self, image) -> np.ndarray:
        """One image -> (C, H, W) float32 pixel values."""
        a = np.asarray(image)
        if a.dtype == object or a.ndim not in (2, 3) or a.size == 0:
            raise ValueError(f"image-classification: an image must be a numpy array HW, HWC or CHW, got shape "
                             f"{a.shape}")
        scale_needed = a.dtype == np.uint8 or (a.dtype.kind in "iu") or (a.dtype.kind == "f" and a.max() > 1.0)
        x = a.astype(np.float32)
        if x.ndim == 2:
            x = x[..., None]
        elif x.shape[-1] not in (1, 3, 4) and x.shape[0] in (1, 3, 4):
            x = np.transpose(x, (1, 2, 0))  # CHW -> HWC
        if x.shape[-1] == 4:
            x = x[..., :3]
        if x.shape[-1] == 1 and self.channels == 3:
            x = np.repeat(x, 3, axis=-1)
        if self.do_resize and x.shape[:2] != self.size:
            x = resize_bilinear(x, self.size)
        if self.do_rescale and scale_needed:
            x = x * np.float32(self.rescale)
        if self.do_normalize:
            x = (x - self.mean) / self.std
        return np.ascontiguousarray(np.transpose(x, (2, 0, 1)), np.float32)

    def __call__(self, inputs, top_k=None, function_to_apply=None, **kw):
        top_k = self.defaults.get("top_k", 5) if top_k is None else top_k
        single = isinstance(inputs, np.ndarray) or not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        id2label = self.model.id2label
        out = []
        for i in range(0, len(items), self.batch_size):
            px = np.stack([self.preprocess(im) for im in items[i:i + self.batch_size]])
            logits = self.model(px)
            for lg in logits:
                fn = function_to_apply or ("sigmoid" if self.problem_type == "multi_label_classification"
                                           or len(lg) == 1 else "softmax")
                s = _sigmoid(lg) if fn == "sigmoid" else (_softmax(lg) if fn == "softmax" else lg)
                ranked = sorted(({"label": id2label.get(j, f"LABEL_{j}"), "score": float(v)}
                                 for j, v in enumerate(s)), key=lambda d: d["score"], reverse=True)
                out.append(ranked[:min(int(top_k), len(ranked))])
        return out[0] if single else out


def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear (triangle filter) weights as PIL's resample: the filter widened by the scale when
    shrinking (antialiasing), sample centres at half pixels."""
    scale = n_in / n_out
    fs = max(scale, 1.0)
    support = fs
    w = np.zeros((n_out, n_in), np.float64)
    for o in range(n_out):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        x = np.arange(lo, hi)
        k = np.maximum(0.0, 1.0 - np.abs((x - center + 0.5) / fs))
        total = k.sum()
        if total > 0:
            w[o, lo:hi] = k / total
    return w


def resize_bilinear(image: np.ndarray, size) -> np.ndarray:
    """Resize an HWC float image to ``size`` = (height, width), bilinear as PIL (in float, no rounding)."""
    h, w = int(size[0]), int(size[1])
    wh = _resize_weights(image.shape[0], h)
    ww = _resize_weights(image.shape[1], w)
    x = np.einsum("oh,hwc->owc", wh, image.astype(np.float64))
    x = np.einsum("pw,owc->opc", ww, x)
    return x.astype(np.float32)


# ----------------------------------------------------------------------------------------------- generation

class TextGenerationPipeline(Pipeline):
    task = "text-generation"

    def __init__(self, model, tokenizer, batch_size=8, **defaults):
        super().__init__(model, tokenizer, batch_size, **defaults)
        self.own = isinstance(model, TrainedModel)
        self.gen = {} if self.own else _gen_config(model.directory)

    def _settings(self, kw):
        p = {**self.defaults, **kw}
        g = self.gen
        s = dict(max_new_tokens=p.get("max_new_tokens", g.get("max_new_tokens", 256)),
                 do_sample=bool(p.get("do_sample", False)),
                 temperature=p.get("temperature", g.get("temperature", 1.0)),
                 top_k=p.get("top_k", g.get("top_k")), top_p=p.get("top_p", g.get("top_p")),
                 seed=p.get("seed"), eos_token_id=p.get("eos_token_id"),
                 return_full_text=p.get("return_full_text", True), stream=p.get("stream", False))
        if "do_sample" not in p and g.get("do_sample"):
            s["do_sample"] = True
        unknown = set(p) - set(s) - {"skip_special_tokens"}
        if unknown:
            raise ValueError(f"text-generation: unknown arguments {sorted(unknown)}")
        if isinstance(s["max_new_tokens"], bool) or int(s["max_new_tokens"]) < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {s['max_new_tokens']!r}")
        s["max_new_tokens"] = int(s["max_new_tokens"])
        if s["temperature"] is not None and float(s["temperature"]) <= 0 and s["do_sample"]:
            raise ValueError(f"temperature must be > 0 when sampling, got {s['temperature']!r}")
        if s["do_sample"] and s["seed"] is None:
            s["seed"] = int(np.random.SeedSequence().entropy % (1 << 63))
        return s

    def _encode(self, text: str) -> List[int]:
        if self.own:
            tok = self.model.tokenizer
            if isinstance(tok, Tokenizer):
                return tok.encode(text, add_special_tokens=False).ids
            return tok.encode(text)
        return self.tokenizer.encode(text).ids

    def _decode(self, ids) -> str:
        tok = self.model.tokenizer if self.own else self.tokenizer
        ids = [int(i) for i in ids]
        if isinstance(tok, Tokenizer):
            return tok.decode(ids, skip_special_tokens=True)
        return tok.decode(ids)

    def __call__(self, inputs, **kw):
        s = self._settings(kw)
        if s.pop("stream"):
            if not isinstance(inputs, str):
                raise ValueError("text-generation: stream=True takes one prompt (a str)")
            return self._stream(_text(inputs, "prompt"), s)
        single = isinstance(inputs, str)
        prompts = [inputs] if single else [_text(t, "prompt") for t in inputs]
        full = s.pop("return_full_text")
        rows = [self._encode(p) for p in prompts]
        for p, r in zip(prompts, rows):
            if not r:
                raise ValueError(f"text-generation: the prompt {p!r} encodes to no tokens")
        news: List[List[int]] = [[] for _ in rows]
        if s["do_sample"]:  # one at a time: each prompt gets the seed's stream, whatever the batch
            for i, r in enumerate(rows):
                news[i] = self._generate([r], s)[0]
        else:
            for idx in _batches([len(r) for r in rows], self.batch_size):
                for i, new in zip(idx, self._generate([rows[i] for i in idx], s)):
                    news[i] = new
        out = []
        for p, new in zip(prompts, news):
            text = self._decode(new)
            out.append([{"generated_text": p + text if full else text}])
        return out[0] if single else out

    def _eos(self, s):
        e = s["eos_token_id"]
        if e is None:
            if self.own:
                return []
            return list(self.model._core.eos_token_ids)
        return [int(e)] if isinstance(e, (int, np.integer)) else [int(x) for x in e]

    def _generate(self, rows: List[List[int]], s) -> List[List[int]]:
        eos = self._eos(s)
        n = s["max_new_tokens"]
        if n == 0:
            return [[] for _ in rows]
        if self.own:
            m = self.model.model
            arg = [np.asarray(r, np.int64) for r in rows]
            if len({len(r) for r in rows}) == 1:
                arg = np.asarray(rows, np.int64)
            out = m.generate(arg, n, temperature=float(s["temperature"] or 1.0), top_k=s["top_k"] or None,
                             top_p=s["top_p"], greedy=not s["do_sample"], seed=s["seed"],
                             eos_id=eos[0] if eos else None)
            news = [list(np.asarray(o)[len(r):]) for o, r in zip(out, rows)]
        else:
            pad = self.model._core.pad_token_id
            if pad is None or pad < 0:
                pad = eos[0] if eos else 0
            ids, mask = _pad_rows(rows, pad, left=True)
            out = self.model.generate(ids, n, attention_mask=mask, do_sample=s["do_sample"],
                                      temperature=float(s["temperature"] or 1.0), top_k=s["top_k"],
                                      top_p=s["top_p"], eos_token_id=eos if s["eos_token_id"] is not None else None,
                                      pad_token_id=pad, seed=s["seed"])
            news = [list(o[ids.shape[1]:]) for o in out]
        result = []
        for new in news:
            new = [int(t) for t in new]
            for j, t in enumerate(new):
                if t in eos:
                    new = new[:j + 1]
                    break
            result.append(new)
        return result

    def _stream(self, prompt: str, s) -> Iterator[str]:
        ids = self._encode(prompt)
        if not ids:
            raise ValueError(f"text-generation: the prompt {prompt!r} encodes to no tokens")
        tokens = self._own_tokens(ids, s) if self.own else self._hf_tokens(ids, s)
        dec = IncrementalDecoder(self._decode)

        def pieces():
            for t in tokens:
                piece = dec.push(t)
                if piece:
                    yield piece
            tail = dec.flush()
            if tail:
                yield tail
        return pieces()

    def _hf_tokens(self, ids, s):
        eos = set(self._eos(s))
        n = s["max_new_tokens"]
        core = self.model._core
        sampler = _core._TokenSampler(bool(s["do_sample"]), float(s["temperature"] or 1.0), int(s["top_k"] or 0),
                                      1.0 if s["top_p"] is None else float(s["top_p"]), int(s["seed"] or 0))
        capacity = len(ids) + n
        if core.max_positions and capacity > core.max_positions:
            raise ValueError(f"text-generation: prompt ({len(ids)} tokens) + max_new_tokens ({n}) exceeds the "
                             f"model's {core.max_positions} positions")

        def gen():
            if n == 0:
                return
            batch = _core._DecoderBatch(core, 1, capacity)
            logits = batch.prefill(0, list(ids), n)
            for k in range(n):
                tok = sampler.next(logits)
                yield tok
                if tok in eos or k == n - 1:
                    return
                logits = batch.step([0], [tok])[0]
        return gen()

    def _own_tokens(self, ids, s):
        """cpuformer GPT.generate's loop, one token at a time (the same caches, sampling and generator)."""
        from .models.gpt import sample_next
        m = self.model.model
        eos = self._eos(s)
        n = s["max_new_tokens"]

        def gen():
            rng = np.random.default_rng(s["seed"])
            out = np.asarray([ids], np.int64)
            caches = None
            was_training = m.training
            m.eval()
            try:
                for _ in range(n):
                    total = out.shape[1]
                    if total <= m.block_size:
                        if caches is None:
                            caches = [b.new_cache(1, m.block_size) for b in m.blocks]
                            logits = m._step_cached(out, caches, 0)
                        else:
                            logits = m._step_cached(out[:, -1:], caches, total - 1)
                    else:
                        logits = m.forward(out[:, -m.block_size:])[:, -1]
                    nxt = sample_next(logits, rng, float(s["temperature"] or 1.0), s["top_k"] or None, s["top_p"],
                                      not s["do_sample"])
                    out = np.concatenate([out, nxt[:, None].astype(np.int64)], axis=1)
                    if out.shape[1] > m.block_size:
                        caches = None
                    tok = int(nxt[0])
                    yield tok
                    if tok in eos:
                        return
            finally:
                m.train(was_training)
        return gen()


class Text2TextGenerationPipeline(Pipeline):
    task = "text2text-generation"
    key = "generated_text"

    def __init__(self, model, tokenizer, batch_size=8, **defaults):
        super().__init__(model, tokenizer, batch_size, **defaults)
        self.own = isinstance(model, TrainedModel)
        if self.own:
            self.src, self.tgt = model.source_tokenizer, model.target_tokenizer
            if self.src is None or self.tgt is None:
                raise ValueError(f"{self.task}: the Seq2SeqTransformer needs source and target tokenizers "
                                 "(source_tokenizer.json and target_tokenizer.json, or tokenizer=(source, target))")
            self.gen = {}
        else:
            self.gen = _gen_config(model.directory)
            self.info = _TokInfo(tokenizer, model.directory)
            limit = model._core.max_positions or 512
            self.max_length = min(limit, self.info.model_max_length or limit)

    def __call__(self, inputs, num_beams=None, max_new_tokens=None, prefix="", **kw):
        unknown = set(kw) - {"length_penalty"}
        if unknown:
            raise ValueError(f"{self.task}: unknown arguments {sorted(unknown)}")
        g = self.gen
        num_beams = int(num_beams or self.defaults.get("num_beams") or g.get("num_beams") or 1)
        if max_new_tokens is None:
            max_new_tokens = self.defaults.get("max_new_tokens")
        if max_new_tokens is None:
            max_new_tokens = g.get("max_new_tokens") or (int(g["max_length"]) - 1 if g.get("max_length") else 19)
        max_new_tokens = int(max_new_tokens)
        single = isinstance(inputs, str)
        texts = [prefix + _text(t) for t in ([inputs] if single else inputs)]
        out: List[Any] = [None] * len(texts)
        if self.own:
            m = self.model.model
            enc = lambda t: (t.encode(x, add_special_tokens=False).ids if isinstance(t, Tokenizer)  # noqa: E731
                             else t.encode(x))
            rows = []
            for x in texts:
                r = enc(self.src)[: m.config["max_len"]]
                rows.append(r or [getattr(self.src, "unk_id", 1)])
            for idx in _batches([len(r) for r in rows], self.batch_size):
                ids, _ = _pad_rows([rows[i] for i in idx], m.config["pad_id"])
                hyps = m.translate(ids, max_len=max_new_tokens, beam_size=num_beams,
                                   **({"length_penalty": kw["length_penalty"]} if "length_penalty" in kw else {}))
                for i, h in zip(idx, hyps):
                    out[i] = self.tgt.decode(h, skip_special_tokens=True) if isinstance(self.tgt, Tokenizer) \
                        else self.tgt.decode(h)
        else:
            lengths = [len(e) for e in self.tokenizer.encode_batch(texts)]
            for idx in _batches(lengths, self.batch_size):
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation="longest_first",
                                     max_length=self.max_length, return_tensors="np")
                gen = self.model.generate(enc["input_ids"], max_new_tokens, attention_mask=enc["attention_mask"],
                                          num_beams=num_beams, **kw)
                for r, i in enumerate(idx):
                    out[i] = self.tokenizer.decode(gen[r].tolist(), skip_special_tokens=True)
        res = [[{self.key: t}] for t in out]
        return res[0] if single else res


class TranslationPipeline(Text2TextGenerationPipeline):
    task = "translation"
    key = "translation_text"


_PIPELINES = {"feature-extraction": FeatureExtractionPipeline, "sentence-embedding": SentenceEmbeddingPipeline,
              "sentence-similarity": SentenceSimilarityPipeline, "text-classification": TextClassificationPipeline,
              "token-classification": TokenClassificationPipeline, "question-answering": QuestionAnsweringPipeline,
              "fill-mask": FillMaskPipeline, "text-generation": TextGenerationPipeline,
              "translation": TranslationPipeline, "text2text-generation": Text2TextGenerationPipeline,
              "image-classification": ImageClassificationPipeline}

# task -> heads of a Hugging Face model that can do it
_HEADS = {"text-classification": ("sequence-classification",), "token-classification": ("token-classification",),
          "question-answering": ("question-answering",), "fill-mask": ("masked-lm",),
          "text-generation": ("causal-lm",), "translation": ("seq2seq-lm",),
          "text2text-generation": ("seq2seq-lm",), "image-classification": ("image-classification",)}
# task -> cpuformer model classes that can do it
_OWN = {"text-classification": ("TransformerClassifier",), "text-generation": ("GPT",),
        "translation": ("Seq2SeqTransformer",), "text2text-generation": ("Seq2SeqTransformer",)}


def _describe(model) -> str:
    if isinstance(model, TrainedModel):
        return f"cpuformer {type(model.model).__name__}" + (f" ({model.path})" if model.path else "")
    arch = getattr(model, "architecture", None) or getattr(model, "model_type", None)
    where = getattr(model, "directory", None)
    return f"{type(model).__name__} {arch!r}" + (f" ({where})" if where else "")


def pipeline(task: str, model, tokenizer=None, batch_size: int = 8, id2label=None, **kwargs) -> Pipeline:
    """A pipeline for ``task`` (see the module docstring) over ``model``: a path (:func:`load_model`) or a loaded
    model. ``tokenizer``: a :class:`cpuformer.Tokenizer` (or a path to a tokenizer file or a directory holding one)
    for a loaded model without its own; for a cpuformer Seq2SeqTransformer a (source, target) pair. Other keyword
    arguments (``top_k``, ``max_new_tokens``, ``aggregation_strategy``, ...) become defaults of every call."""
    from .models.pretrained import CausalLM, EncoderModel, PretrainedModel, SentenceEncoder, VisionModel
    task = _canonical_task(task)
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model, task)
    if isinstance(tokenizer, (str, os.PathLike)):
        tp = os.fspath(tokenizer)
        tokenizer = Tokenizer.from_pretrained(tp) if os.path.isdir(tp) else load_tokenizer_file(tp)
    own_classes = ("GPT", "TransformerClassifier", "Seq2SeqTransformer")
    if type(model).__name__ in own_classes and not isinstance(model, TrainedModel):
        if type(model).__name__ == "Seq2SeqTransformer":
            src, tgt = tokenizer if isinstance(tokenizer, (tuple, list)) else (tokenizer, tokenizer)
            model = TrainedModel(model, source_tokenizer=src, target_tokenizer=tgt)
        else:
            n = model.config.get("num_classes", 0)
            model = TrainedModel(model, tokenizer=tokenizer, id2label={i: f"LABEL_{i}" for i in range(n)})
        tokenizer = None
    if not isinstance(model, (PretrainedModel, SentenceEncoder, TrainedModel)):
        raise ValueError(f"pipeline: model must be a path, a from_pretrained model, a SentenceEncoder or a cpuformer "
                         f"GPT / TransformerClassifier / Seq2SeqTransformer, got {type(model).__name__}")

    def refuse(why=""):
        raise ValueError(f"task {task!r} cannot run on {_describe(model)}{why}")

    if task in _SENTENCE_TASKS:
        if isinstance(model, EncoderModel):
            if model.tokenizer is None and tokenizer is None:
                raise ValueError(f"task {task!r}: {_describe(model)} has no tokenizer (tokenizer.json or vocab.txt); "
                                 "pass tokenizer=...")
            model = SentenceEncoder(model, tokenizer or model.tokenizer, ["mean"], False,
                                    int(model._core.max_positions or 512))
        if not isinstance(model, SentenceEncoder):
            refuse(" (a sentence encoder, i.e. an encoder model, is needed)")
        return _PIPELINES[task](model, model.tokenizer, batch_size, **kwargs)
    if isinstance(model, SentenceEncoder):
        model = model.model
    if isinstance(model, TrainedModel):
        if type(model.model).__name__ not in _OWN.get(task, ()):
            ok = [t for t, names in _OWN.items() if type(model.model).__name__ in names]
            refuse(f" (it does {', '.join(ok)})")
        if task in ("text-classification", "text-generation"):
            if tokenizer is not None:
                model.tokenizer = tokenizer
            if model.tokenizer is None:
                raise ValueError(f"task {task!r}: {_describe(model)} has no tokenizer (tokenizer.json next to the "
                                 "model); pass tokenizer=...")
            if id2label is not None:
                model.id2label = {int(k): v for k, v in dict(id2label).items()}
        return _PIPELINES[task](model, None, batch_size, **kwargs)
    # a Hugging Face model
    if task == "feature-extraction":
        if not isinstance(model, (EncoderModel, CausalLM)):
            refuse(" (feature-extraction needs an encoder or a decoder)")
    elif model.head not in _HEADS[task]:
        refuse(f" (its head is {model.head!r}; {task} needs {' or '.join(_HEADS[task])})")
    if task == "image-classification":
        if not isinstance(model, VisionModel):
            refuse()
        return _PIPELINES[task](model, None, batch_size, **kwargs)
    tok = tokenizer or model.tokenizer
    if tok is None:
        raise ValueError(f"task {task!r}: {_describe(model)} has no tokenizer (tokenizer.json, vocab.txt or "
                         "vocab.json + merges.txt); pass tokenizer=...")
    if id2label is not None and task in ("text-classification", "token-classification"):
        kwargs["id2label"] = {int(k): v for k, v in dict(id2label).items()}
    return _PIPELINES[task](model, tok, batch_size, **kwargs)
