"""Weight initialisation and the generator behind it (and behind dropout seeds).

``manual_seed(s)`` makes model construction and dropout masks reproducible, like ``torch.manual_seed``.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np

_generator = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Reset the generator used for initial weights and dropout seeds."""
    global _generator
    _generator = np.random.default_rng(int(seed))


def get_state() -> dict:
    """The generator state (for checkpoints)."""
    return _generator.bit_generator.state


def set_state(state: dict) -> None:
    _generator.bit_generator.state = state


def next_seed() -> int:
    """A fresh 63-bit seed for a dropout mask."""
    return int(_generator.integers(0, 2**63 - 1))


def uniform(shape: Tuple[int, ...], bound: float) -> np.ndarray:
    return _generator.uniform(-bound, bound, size=shape).astype(np.float32)


def normal(shape: Tuple[int, ...], std: float) -> np.ndarray:
    return (_generator.standard_normal(size=shape) * std).astype(np.float32)


def xavier_uniform(shape: Tuple[int, int], gain: float = 1.0) -> np.ndarray:
    """Glorot uniform for a (fan_out, fan_in) weight, as torch.nn.init.xavier_uniform_."""
    fan_out, fan_in = shape
    return uniform(shape, gain * math.sqrt(6.0 / (fan_in + fan_out)))
