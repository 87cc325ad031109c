"""Padding, datasets and batching.

A dataset is indexed with an array of sample indices and returns ``(inputs, targets)``: ``inputs`` a tuple of
arrays passed to the model, ``targets`` an array for the loss. Variable-length datasets pad each batch to its own
longest sequence (less work than padding everything to a global maximum); targets at padding positions are
``IGNORE_INDEX``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["pad_sequences", "IGNORE_INDEX", "ArrayDataset", "SequenceClassificationDataset", "LanguageModelDataset",
           "Seq2SeqDataset", "batch_indices"]

IGNORE_INDEX = -100


def pad_sequences(sequences: Sequence[Sequence[int]], maxlen: Optional[int] = None, padding: str = "pre",
                  truncating: str = "pre", value: int = 0, dtype=np.int64) -> np.ndarray:
    """Keras's ``pad_sequences``: a (len(sequences), maxlen) array; ``padding``/``truncating`` ``"pre"`` or
    ``"post"`` say on which side values are added or dropped (Keras defaults: both "pre")."""
    if padding not in ("pre", "post") or truncating not in ("pre", "post"):
        raise ValueError(f"padding and truncating must be 'pre' or 'post', got {padding!r}, {truncating!r}")
    seqs = [list(s) for s in sequences]
    if maxlen is None:
        maxlen = max((len(s) for s in seqs), default=0)
    if maxlen < 0:
        raise ValueError(f"maxlen must be >= 0, got {maxlen}")
    out = np.full((len(seqs), maxlen), value, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s) > maxlen:
            s = s[-maxlen:] if truncating == "pre" else s[:maxlen]
        if not s:
            continue
        if padding == "post":
            out[i, :len(s)] = s
        else:
            out[i, maxlen - len(s):] = s
    return out


def batch_indices(n: int, batch_size: int, rng: Optional[np.random.Generator] = None,
                  lengths: Optional[np.ndarray] = None, bucket: bool = False, drop_last: bool = False) -> List[np.ndarray]:
    """Split ``range(n)`` into batches: shuffled with ``rng`` (in order without); with ``bucket`` and ``lengths``,
    samples of similar length are batched together (sorted within chunks of 50 batches, batches shuffled), which
    cuts padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = rng.permutation(n) if rng is not None else np.arange(n)
    if bucket and lengths is not None:
        chunk = batch_size * 50
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in np.array_split(order, max(1, -(-n // chunk)))]) if n else order
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if bucket and rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class ArrayDataset:
    """Fixed-size arrays: ``inputs`` (an array or a tuple of arrays, first axis = samples) and ``targets``."""

    def __init__(self, inputs, targets) -> None:
        self.inputs = tuple(np.asarray(a) for a in (inputs if isinstance(inputs, (tuple, list)) else (inputs,)))
        self.targets = np.asarray(targets)
        if any(len(a) != len(self.targets) for a in self.inputs):
            raise ValueError("ArrayDataset: inputs and targets must have the same number of samples")
        self.lengths = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, idx) -> Tuple[tuple, np.ndarray]:
        return tuple(a[idx] for a in self.inputs), self.targets[idx]


class SequenceClassificationDataset:
    """Token-id sequences with integer labels; each batch is padded (at the end) to its longest sequence, at
    most ``max_len`` tokens (longer ones are truncated)."""

    def __init__(self, sequences: Sequence[Sequence[int]], labels: Sequence[int], pad_id: int = 0,
                 max_len: Optional[int] = None) -> None:
        if len(sequences) != len(labels):
            raise ValueError(f"{len(sequences)} sequences but {len(labels)} labels")
        self.sequences = [list(s)[:max_len] if max_len else list(s) for s in sequences]
        if any(len(s) == 0 for s in self.sequences):
            raise ValueError("SequenceClassificationDataset: empty sequence (encode at least one token)")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.pad_id = pad_id
        self.lengths = np.array([len(s) for s in self.sequences])

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, idx) -> Tuple[tuple, np.ndarray]:
        idx = np.atleast_1d(idx)
        ids = pad_sequences([self.sequences[i] for i in idx], padding="post", value=self.pad_id)
        return (ids,), self.labels[idx]


class LanguageModelDataset:
    """A token stream cut into non-overlapping windows of ``block_size``: inputs ``tokens[s:s+T]``, targets
    ``tokens[s+1:s+T+1]``."""

    def __init__(self, tokens: Sequence[int], block_size: int) -> None:
        self.tokens = np.asarray(tokens, dtype=np.int64)
        if block_size < 1 or len(self.tokens) < block_size + 1:
            raise ValueError(f"LanguageModelDataset: need at least block_size + 1 = {block_size + 1} tokens, "
                             f"got {len(self.tokens)}")
        self.block_size = int(block_size)
        self.lengths = None

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, idx) -> Tuple[tuple, np.ndarray]:
        starts = np.atleast_1d(idx) * self.block_size
        offsets = starts[:, None] + np.arange(self.block_size + 1)[None, :]
        window = self.tokens[offsets]
        return (window[:, :-1],), window[:, 1:]


class Seq2SeqDataset:
    """Parallel id sequences. A batch is ``((src, tgt_in), tgt_out)``: ``tgt_in = [BOS] + target`` and
    ``tgt_out = target + [EOS]``, padded with ``pad_id`` (sources, decoder inputs) and ``IGNORE_INDEX`` (loss
    targets)."""

    def __init__(self, sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int, bos_id: int,
                 eos_id: int, max_len: Optional[int] = None) -> None:
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
        cut = (lambda s: list(s)[:max_len]) if max_len else list
        self.sources = [cut(s) or [eos_id] for s in sources]
        self.targets = [cut(t) for t in targets]
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.lengths = np.array([len(s) + len(t) for s, t in zip(self.sources, self.targets)])

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, idx) -> Tuple[tuple, np.ndarray]:
        idx = np.atleast_1d(idx)
        src = pad_sequences([self.sources[i] for i in idx], padding="post", value=self.pad_id)
        tgt_in = pad_sequences([[self.bos_id] + self.targets[i] for i in idx], padding="post", value=self.pad_id)
        tgt_out = pad_sequences([self.targets[i] + [self.eos_id] for i in idx], padding="post", value=IGNORE_INDEX)
        return (src, tgt_in), tgt_out
