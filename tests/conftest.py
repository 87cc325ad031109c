"""Shared fixtures: SIMD path and thread count switching, random data, tolerances."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import cpuformer
from cpuformer import _core

from testutil import SIMD_PATHS  # helpers for the test modules live in tests/testutil.py


@pytest.fixture(params=SIMD_PATHS)
def simd(request):
    """Run the test once per SIMD path this machine and build have."""
    _core.set_simd_path(request.param)
    yield request.param
    _core.set_simd_path("auto")


@pytest.fixture(params=[1, 2])
def threads(request):
    """Run the test with 1 and with 2 threads."""
    before = cpuformer.get_num_threads()
    cpuformer.set_num_threads(request.param)
    yield request.param
    cpuformer.set_num_threads(before)


@pytest.fixture
def rng(request):
    # A different but reproducible stream per test.
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))





