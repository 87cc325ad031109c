"""What a training job leaves in its output folder, and how to load it back.

``output_dir/`` holds ``model.safetensors`` (``cpuformer.save``: the final weights, the best ones when early
stopping restored them), the tokenizer(s) and ``job.json``, which says what is what::

    {"format": "cpuformer-job", "version": 1, "job": "classify", "model": "model.safetensors",
     "model_class": "TransformerClassifier", "tokenizer": {"kind": "word", "file": "tokenizer.json"},
     "labels": ["negative", "positive"], "max_len": 64, "steps": 1200, "cpuformer_version": "..."}

``lm`` and ``demo`` have ``tokenizer`` (kind ``char`` or ``bpe``) and ``block_size``; ``classify`` has
``tokenizer`` (kind ``word``), ``labels`` (the name of each class id) and ``max_len``; ``translate`` has
``source_tokenizer`` and ``target_tokenizer`` (kind ``bpe`` or ``word``), ``max_len`` and ``beam``. A ``char`` or
``word`` tokenizer file is :class:`cpuformer.data.Tokenizer` JSON, a ``bpe`` one a Hugging Face ``tokenizer.json``
(ids 0-3: ``<pad> <unk> <bos> <eos>``). Beside them: ``checkpoint-N/`` (for ``--resume``), ``history.jsonl``,
``history.csv``.

:func:`load_job` returns the model (in eval mode) and tokenizers with one interface (``encode(text) -> ids``,
``decode(ids) -> text``, ``pad_id``/``unk_id``/``bos_id``/``eos_id``, ``vocab_size``).
"""
from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace
from typing import List, Optional

from ..io import atomic_write_bytes

__all__ = ["SubwordTokenizer", "save_job", "load_job", "JOB_FILE", "MODEL_FILE"]

JOB_FILE = "job.json"
MODEL_FILE = "model.safetensors"


class SubwordTokenizer:
    """A cased byte-level BPE (:class:`cpuformer.Tokenizer`) with the word tokenizer's interface: ids 0-3 are
    ``<pad> <unk> <bos> <eos>``; ``decode`` gives cased, detokenized text. :meth:`train` learns one from sentences
    (``cpuformer.train_bpe``)."""

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    def __init__(self, json_text: str) -> None:
        import cpuformer
        self.json = json_text
        self._tok = cpuformer.Tokenizer.from_str(json_text)
        self.vocab_size = self._tok.get_vocab_size()

    @classmethod
    def train(cls, sentences: List[str], vocab_size: int, min_freq: int) -> "SubwordTokenizer":
        import cpuformer
        return cls(cpuformer.train_bpe(texts=sentences, vocab_size=vocab_size, min_frequency=min_freq,
                                       special_tokens=("<pad>", "<unk>", "<bos>", "<eos>")))

    @classmethod
    def load(cls, path: str) -> "SubwordTokenizer":
        with open(path, encoding="utf-8") as f:
            return cls(f.read())

    def save(self, path: str) -> None:
        atomic_write_bytes(path, [self.json.encode("utf-8")])

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _kind(tok) -> str:
    return "bpe" if isinstance(tok, SubwordTokenizer) else tok.kind


def save_tokenizer(output_dir: str, tok, file: str) -> dict:
    """Write ``tok`` as ``output_dir/file``; returns its ``job.json`` entry."""
    os.makedirs(output_dir, exist_ok=True)
    tok.save(os.path.join(output_dir, file))
    return {"kind": _kind(tok), "file": file}


def save_job(output_dir: str, job: str, model, steps: int, **fields) -> str:
    """Write the final model (``model.safetensors``) and ``job.json`` (``fields``: the tokenizer entries from
    :func:`save_tokenizer`, labels, lengths); returns the model file's path."""
    from ..serialization import save
    import cpuformer
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, MODEL_FILE)
    save(model, path)
    meta = {"format": "cpuformer-job", "version": 1, "job": job, "model": MODEL_FILE,
            "model_class": type(model).__name__, **fields, "steps": int(steps),
            "cpuformer_version": cpuformer.__version__, "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_bytes(os.path.join(output_dir, JOB_FILE), [json.dumps(meta, indent=1, ensure_ascii=False).encode()])
    return path


def _load_tokenizer(output_dir: str, entry: Optional[dict]):
    if not entry:
        return None
    path = os.path.join(output_dir, entry["file"])
    if entry["kind"] == "bpe":
        return SubwordTokenizer.load(path)
    from ..data import load_tokenizer
    return load_tokenizer(path)


def load_job(output_dir: str) -> SimpleNamespace:
    """The model and tokenizers a training job saved in ``output_dir``: a namespace with ``model``, ``meta`` (the
    ``job.json`` dict), ``job``, ``tokenizer`` (lm, classify), ``source_tokenizer`` / ``target_tokenizer``
    (translate) and ``labels`` (classify)."""
    from ..serialization import load
    path = os.path.join(output_dir, JOB_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{output_dir}: no {JOB_FILE} (not the output folder of a cpuformer training "
                                "job, or the job has not finished yet)") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not a job file ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != "cpuformer-job":
        raise ValueError(f"{path}: not a cpuformer job file")
    return SimpleNamespace(model=load(os.path.join(output_dir, meta.get("model", MODEL_FILE))), meta=meta,
                           job=meta.get("job"), tokenizer=_load_tokenizer(output_dir, meta.get("tokenizer")),
                           source_tokenizer=_load_tokenizer(output_dir, meta.get("source_tokenizer")),
                           target_tokenizer=_load_tokenizer(output_dir, meta.get("target_tokenizer")),
                           labels=meta.get("labels"))
