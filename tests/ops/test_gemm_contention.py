"""Multi-threaded products give the same bits when the cores are contended: a thread preempted in the middle of a
GEMM must not let another read or overwrite what it has not finished (a GEMM that skipped a barrier once gave
wrong rows only under load). A busy process competes for the cores while wide (N >= M), tall and square products
and a whole GPT forward run with 2 threads, against their results computed undisturbed."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import cpuformer
from cpuformer import _core, ops

from testutil import SIMD_PATHS

SHAPES = [(96, 768, 2304), (128, 1536, 384), (512, 512, 2048), (2048, 256, 256), (200, 300, 1000),
          (512, 768, 9000)]  # N past one column block (4080): blocks of different widths


@pytest.fixture
def busy():
    """Two busy processes for the duration of the test (the machine's cores contended)."""
    code = "import time\nt = time.time()\nwhile time.time() - t < 60: sum(i * i for i in range(5000))"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    yield
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize("path", SIMD_PATHS)
def test_short_last_k_block_under_contention(busy, path):
    """Columns split between threads (N < M but too few rows for a row split) and a last K block shorter than the
    others: a thread packing that block may not overwrite the slivers another still reads from two blocks back
    (it did, on every path: 2 products in 40 came out wrong under load)."""
    rng = np.random.default_rng(1)
    old = cpuformer.get_num_threads()
    cpuformer.set_num_threads(2)
    _core.set_simd_path(path)
    try:
        cases = []
        for M, K, N in [(130, 1000, 70), (100, 1300, 90), (120, 600, 40)]:
            a = rng.standard_normal((M, K)).astype(np.float32)
            w = rng.standard_normal((N, K)).astype(np.float32)
            cases.append((a, w, ops.matmul(a, w, transpose_b=True)))
        for _ in range(40):
            for a, w, want in cases:
                np.testing.assert_array_equal(ops.matmul(a, w, transpose_b=True), want)
    finally:
        _core.set_simd_path("auto")
        cpuformer.set_num_threads(old)


def test_products_unchanged_under_contention(busy):
    rng = np.random.default_rng(0)
    old = cpuformer.get_num_threads()
    cpuformer.set_num_threads(2)
    try:
        cases = []
        for M, K, N in SHAPES:
            a = rng.standard_normal((M, K)).astype(np.float32)
            w = rng.standard_normal((N, K)).astype(np.float32)
            cases.append((a, w, ops.matmul(a, w, transpose_b=True)))
        for _ in range(25):
            for a, w, want in cases:
                np.testing.assert_array_equal(ops.matmul(a, w, transpose_b=True), want)
    finally:
        cpuformer.set_num_threads(old)


def test_gpt_forward_unchanged_under_contention(busy):
    from cpuformer.models import GPT
    cpuformer.nn.init.manual_seed(0)
    model = GPT(9000, 128, n_layer=2, n_head=6, n_embd=384).eval()  # a head wider than one column block
    ids = np.random.default_rng(1).integers(0, 9000, (4, 96))
    want = model(ids)
    for _ in range(8):
        model.generate(ids[:1, :8], 4, greedy=True)
        np.testing.assert_array_equal(model(ids), want)
