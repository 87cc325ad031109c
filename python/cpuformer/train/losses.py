"""Loss functions returning the loss and its gradient with respect to the model output."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .. import ops

__all__ = ["CrossEntropyLoss", "CausalLMLoss", "QuestionAnsweringLoss", "MSELoss", "MultipleNegativesRankingLoss",
           "shift_tokens_right", "task_loss"]


class CrossEntropyLoss:
    """Mean cross-entropy over non-ignored targets (``torch.nn.CrossEntropyLoss`` semantics), fused forward and
    backward. ``loss(outputs, targets, grad_scale)`` -> ``(loss, d loss / d outputs * grad_scale, n_counted)``;
    outputs (N, C) or (B, T, C) with targets (N,) or (B, T). The gradient overwrites ``outputs`` (no extra
    vocabulary-sized buffer) when they are a float32 array."""

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.ignore_index, self.label_smoothing = int(ignore_index), float(label_smoothing)

    def __call__(self, outputs, targets, grad_scale: float = 1.0, need_grad: bool = True) -> Tuple[float, np.ndarray, int]:
        logits = np.asarray(outputs)
        targets = np.asarray(targets)
        if logits.shape[:-1] != targets.shape:
            raise ValueError(f"CrossEntropyLoss: outputs {logits.shape} do not match targets {targets.shape}")
        flat = logits.reshape(-1, logits.shape[-1])
        flat_t = targets.reshape(-1)
        n = int((flat_t != self.ignore_index).sum())
        if not need_grad:
            return ops.cross_entropy(flat, flat_t, self.ignore_index, self.label_smoothing), None, n
        inplace = logits.dtype == np.float32 and logits.flags.c_contiguous and logits.flags.writeable
        loss, grad = ops.cross_entropy_with_grad(flat, flat_t, self.ignore_index, self.label_smoothing,
                                                 grad_scale=grad_scale, inplace=inplace)
        return loss, grad.reshape(logits.shape), n


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning losses (issue 17), as transformers' heads and sentence-transformers compute them. Each returns
# (loss, d loss / d outputs * grad_scale, n_counted) and has count(targets), the n the Trainer weights batches by.

class CausalLMLoss:
    """transformers' causal-LM loss: logits (B, T, V) at position t predict labels[:, t + 1] (the shift is done
    here: pass labels = input_ids, with -100 where no loss is wanted, e.g. padding). Mean over counted tokens."""

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = int(ignore_index)

    def _shifted(self, targets) -> np.ndarray:
        t = np.asarray(targets, np.int64)
        if t.ndim != 2:
            raise ValueError(f"CausalLMLoss: labels must be (batch, length), got shape {t.shape}")
        out = np.full_like(t, self.ignore_index)
        out[:, :-1] = t[:, 1:]
        return out

    def count(self, targets) -> int:
        return int((self._shifted(targets) != self.ignore_index).sum())

    def __call__(self, outputs, targets, grad_scale: float = 1.0, need_grad: bool = True):
        # the last position's target is ignored: its gradient is zero, the same as slicing logits[:, :-1]
        return CrossEntropyLoss(self.ignore_index)(outputs, self._shifted(targets), grad_scale, need_grad)


class QuestionAnsweringLoss:
    """transformers' extractive-QA loss: outputs (start_logits, end_logits), each (B, T) (or one (B, T, 2)
    array), targets (B, 2) start / end token positions; positions are clamped to [0, T] and T is ignored; the loss
    is the mean of the start and end cross-entropies."""

    ignore_index = -100

    def count(self, targets) -> int:
        return int(np.asarray(targets).shape[0])

    def __call__(self, outputs, targets, grad_scale: float = 1.0, need_grad: bool = True):
        if isinstance(outputs, (tuple, list)):
            start, end = (np.asarray(o, np.float32) for o in outputs)
        else:
            o = np.asarray(outputs, np.float32)
            start, end = o[..., 0], o[..., 1]
        t = np.asarray(targets, np.int64).reshape(-1, 2)
        T = start.shape[1]
        pos = np.clip(t, 0, T)
        losses, grads = [], []
        for logits, p in ((start, pos[:, 0]), (end, pos[:, 1])):
            logits = np.ascontiguousarray(logits, np.float32)
            if need_grad:
                loss, g = ops.cross_entropy_with_grad(logits, p, ignore_index=T, grad_scale=0.5 * grad_scale)
                grads.append(g)
            else:
                loss = ops.cross_entropy(logits, p, ignore_index=T)
            losses.append(loss)
        return 0.5 * (losses[0] + losses[1]), (tuple(grads) if need_grad else None), t.shape[0]


class MSELoss:
    """Mean squared error (transformers' regression head, num_labels == 1): outputs (B, 1) or (B,), targets (B,)."""

    ignore_index = None

    def count(self, targets) -> int:
        return int(np.asarray(targets).size)

    def __call__(self, outputs, targets, grad_scale: float = 1.0, need_grad: bool = True):
        o = np.asarray(outputs, np.float32)
        t = np.asarray(targets, np.float32).reshape(-1)
        diff = o.reshape(-1).astype(np.float64) - t
        if diff.size != t.size:
            raise ValueError(f"MSELoss: outputs {o.shape} do not match targets {t.shape}")
        loss = float(np.mean(diff * diff))
        if not np.isfinite(loss):
            raise ValueError(f"MSELoss: the loss is not finite ({loss})")
        grad = (2.0 * grad_scale / t.size * diff).astype(np.float32).reshape(o.shape) if need_grad else None
        return loss, grad, t.size


def _normalize(x: np.ndarray):
    norm = np.maximum(np.sqrt((x.astype(np.float64) ** 2).sum(1, keepdims=True)), 1e-12).astype(np.float32)
    return x / norm, norm


class MultipleNegativesRankingLoss:
    """sentence-transformers' MultipleNegativesRankingLoss (default: query-to-document, one softmax): outputs are
    the embeddings (2B, D) of B anchors then their B positives; the loss is the cross-entropy of
    ``scale * cos_sim(anchors, positives)`` (B, B) with the matching positive as the class, every other positive
    of the batch a negative. Targets: anything of length B (they are not read)."""

    ignore_index = None

    def __init__(self, scale: float = 20.0) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)

    def count(self, targets) -> int:
        return int(np.asarray(targets).shape[0])

    def __call__(self, outputs, targets, grad_scale: float = 1.0, need_grad: bool = True):
        e = np.ascontiguousarray(outputs, np.float32)
        if e.ndim != 2 or e.shape[0] % 2:
            raise ValueError(f"MultipleNegativesRankingLoss: expected (2B, D) embeddings, got shape {e.shape}")
        B = e.shape[0] // 2
        an, a_norm = _normalize(e[:B])
        pn, p_norm = _normalize(e[B:])
        scores = ops.matmul(an, pn, transpose_b=True, alpha=self.scale)
        labels = np.arange(B, dtype=np.int64)
        if not need_grad:
            return ops.cross_entropy(scores, labels), None, B
        loss, ds = ops.cross_entropy_with_grad(scores, labels, grad_scale=grad_scale, inplace=True)
        d_an = ops.matmul(ds, pn, alpha=self.scale)
        d_pn = ops.matmul(ds, an, transpose_a=True, alpha=self.scale)
        grad = np.empty_like(e)
        for y, dy, norm, rows in ((an, d_an, a_norm, slice(0, B)), (pn, d_pn, p_norm, slice(B, 2 * B))):
            grad[rows] = (dy - y * (y * dy).sum(1, keepdims=True)) / norm  # through x / |x|
        return loss, grad, B


def shift_tokens_right(labels, pad_token_id: int, decoder_start_token_id: int) -> np.ndarray:
    """decoder_input_ids from seq2seq labels, as transformers: the start token, then labels[:, :-1], with -100
    replaced by the pad id."""
    t = np.asarray(labels, np.int64)
    out = np.empty_like(t)
    out[:, 0] = decoder_start_token_id
    out[:, 1:] = t[:, :-1]
    out[out == -100] = pad_token_id
    return out


def task_loss(model):
    """The loss transformers computes for this model's head: cross-entropy (sequence / token classification, masked
    LM, seq2seq), MSE (one-label regression), the QA loss, the shifted causal-LM loss, or MNRL for a
    SentenceEncoder."""
    head = getattr(model, "head", None)
    if head is None and hasattr(model, "pooling"):
        return MultipleNegativesRankingLoss()
    if head == "sequence-classification" and model._core.num_labels == 1:
        return MSELoss()
    if head == "question-answering":
        return QuestionAnsweringLoss()
    if head == "causal-lm":
        return CausalLMLoss()
    if head in ("sequence-classification", "token-classification", "masked-lm", "seq2seq-lm",
                "image-classification"):
        return CrossEntropyLoss()
    raise ValueError(f"no task loss for a {head!r} head (a *Model checkpoint: give it a task=, or use a "
                     "SentenceEncoder with MultipleNegativesRankingLoss)")
