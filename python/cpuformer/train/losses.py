"""Loss functions returning the loss and its gradient with respect to the model output."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .. import ops

__all__ = ["CrossEntropyLoss"]


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
