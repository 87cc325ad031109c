"""Optimizers (AdamW, SGD with momentum) and learning-rate schedules."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from .. import ops
from ..nn.module import Parameter

__all__ = ["AdamW", "SGD", "Schedule", "constant", "warmup_cosine", "warmup_linear", "inverse_sqrt"]


def _named(params) -> List[Tuple[str, Parameter]]:
    """(name, parameter) pairs to optimize: parameters with ``requires_grad`` False (frozen pretrained weights,
    which have no gradient) are left out, so they get no optimizer state."""
    if hasattr(params, "named_parameters"):
        items = list(params.named_parameters())
    else:
        items = list(params)
        if not (items and isinstance(items[0], tuple)):
            items = [(str(i), p) for i, p in enumerate(items)]
    return [(n, p) for n, p in items if getattr(p, "requires_grad", True)]


class _Optimizer:
    def __init__(self, params, lr: float) -> None:
        self.params: List[Tuple[str, Parameter]] = _named(params)
        if not self.params:
            raise ValueError("optimizer got no parameters (none requires a gradient: for a pretrained model call "
                             "model.requires_grad_(True), add LoRA adapters or a task head first)")
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive number, got {lr}")
        self.lr = float(lr)
        self.step_count = 0

    def state_arrays(self) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def load_state_arrays(self, arrays: Dict[str, np.ndarray], step_count: int) -> None:
        own = self.state_arrays()
        missing = [k for k in own if k not in arrays]
        if missing:
            raise KeyError(f"optimizer state is missing {missing[:5]}")
        for k, arr in own.items():
            if arrays[k].shape != arr.shape:
                raise ValueError(f"optimizer state {k} has shape {arrays[k].shape}, expected {arr.shape}")
            arr[...] = arrays[k]
        self.step_count = int(step_count)


class AdamW(_Optimizer):
    """AdamW as ``torch.optim.AdamW`` (decoupled weight decay), one fused C++ pass per parameter. By default weight
    decay applies only to parameters with 2 or more dimensions (not biases, norms' gains, or the CLS vector)."""

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, decay_filter=None) -> None:
        super().__init__(params, lr)
        self.betas, self.eps, self.weight_decay = (float(betas[0]), float(betas[1])), float(eps), float(weight_decay)
        decay_filter = decay_filter or (lambda name, p: p.data.ndim >= 2)
        self.decay = {name: bool(decay_filter(name, p)) for name, p in self.params}
        self.exp_avg = {name: np.zeros_like(p.data) for name, p in self.params}
        self.exp_avg_sq = {name: np.zeros_like(p.data) for name, p in self.params}

    def step(self, lr: Optional[float] = None, grad_scale: float = 1.0) -> None:
        self.step_count += 1
        lr = self.lr if lr is None else lr
        for name, p in self.params:
            ops.adamw_step(p.data, p.grad, self.exp_avg[name], self.exp_avg_sq[name], lr=lr, step=self.step_count,
                           beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
                           weight_decay=self.weight_decay if self.decay[name] else 0.0, grad_scale=grad_scale)

    def state_arrays(self) -> Dict[str, np.ndarray]:
        out = {f"exp_avg.{k}": v for k, v in self.exp_avg.items()}
        out.update({f"exp_avg_sq.{k}": v for k, v in self.exp_avg_sq.items()})
        return out


class SGD(_Optimizer):
    """SGD with (optionally Nesterov) momentum and L2 weight decay, as ``torch.optim.SGD``."""

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        super().__init__(params, lr)
        self.momentum, self.weight_decay, self.nesterov = float(momentum), float(weight_decay), bool(nesterov)
        self.buf = {name: np.zeros_like(p.data) for name, p in self.params}

    def step(self, lr: Optional[float] = None, grad_scale: float = 1.0) -> None:
        self.step_count += 1
        lr = self.lr if lr is None else lr
        for name, p in self.params:
            g = p.grad * np.float32(grad_scale)
            if self.weight_decay:
                g += np.float32(self.weight_decay) * p.data
            if self.momentum:
                b = self.buf[name]
                if self.step_count == 1:
                    b[...] = g
                else:
                    b *= np.float32(self.momentum)
                    b += g
                g = g + np.float32(self.momentum) * b if self.nesterov else b
            p.data -= np.float32(lr) * g

    def state_arrays(self) -> Dict[str, np.ndarray]:
        return {f"momentum_buffer.{k}": v for k, v in self.buf.items()}


class Schedule:
    """Learning rate as a function of the optimizer step (0-based): ``schedule(step) -> lr``."""

    def __init__(self, fn, description: str) -> None:
        self.fn, self.description = fn, description

    def __call__(self, step: int) -> float:
        return float(self.fn(step))

    def __repr__(self) -> str:
        return self.description


def constant(lr: float) -> Schedule:
    return Schedule(lambda s: lr, f"constant(lr={lr})")


def _warmup(lr: float, warmup_steps: int, step: int) -> float:
    return lr * (step + 1) / warmup_steps


def warmup_cosine(lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> Schedule:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``."""
    def fn(s):
        if s < warmup_steps:
            return _warmup(lr, warmup_steps, s)
        t = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))
    return Schedule(fn, f"warmup_cosine(lr={lr}, warmup={warmup_steps}, total={total_steps}, min_lr={min_lr})")


def warmup_linear(lr: float, warmup_steps: int, total_steps: int) -> Schedule:
    """Linear warm-up, then linear decay to 0 at ``total_steps``."""
    def fn(s):
        if s < warmup_steps:
            return _warmup(lr, warmup_steps, s)
        return lr * max(0.0, (total_steps - s) / max(1, total_steps - warmup_steps))
    return Schedule(fn, f"warmup_linear(lr={lr}, warmup={warmup_steps}, total={total_steps})")


def inverse_sqrt(d_model: int, warmup_steps: int = 4000, factor: float = 1.0) -> Schedule:
    """The paper's schedule: ``factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)`` (step from 1)."""
    def fn(s):
        s = s + 1
        return factor * d_model ** -0.5 * min(s ** -0.5, s * warmup_steps ** -1.5)
    return Schedule(fn, f"inverse_sqrt(d_model={d_model}, warmup={warmup_steps}, factor={factor})")
