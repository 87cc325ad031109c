"""DataParallel on a from_pretrained model (gradients in C++ buffers), run by test_finetune_distributed.py as
``mpiexec -n 2 python -m mpi4py dp_pretrained.py MODEL_DIR check|mismatch``.

check: every rank builds its head and adapters from another seed; DataParallel gives every rank rank 0's trainable
parameters and leaves the frozen ones alone; finish_gradients makes each trainable gradient the sum of the ranks'
own (several buckets); unfreezing a parameter later rebuilds the layout. mismatch: rank 1 trains one more parameter,
and every rank refuses with the same error."""
from __future__ import annotations

import sys

import numpy as np
from mpi4py import MPI

from cpuformer.distributed import DataParallel
from cpuformer.models import from_pretrained
from cpuformer.nn import lora

path, mode = sys.argv[1], sys.argv[2]
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
model = from_pretrained(path, trainable=True, task="text-classification", num_labels=3, init_seed=rank,
                        verbose=False)
lora.add_lora(model, r=2, alpha=4, seed=10 + rank)
rng = np.random.default_rng(100 + rank)
for _, p in lora.lora_parameters(model):  # (B starts at zero, which would leave A without gradient)
    p.data[...] = rng.standard_normal(p.shape).astype(np.float32) * 0.3
if mode == "mismatch" and rank == 1:
    dict(model.named_parameters())["pooler.dense.bias"].requires_grad = True
try:
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if p.grad is None}
    before = {n: p.data.copy() for n, p in model.named_parameters() if p.grad is not None}
    dp = DataParallel(model, bucket_mb=0.0002, threads=1)
except ValueError as exc:
    print(f"rank {rank}: {exc}", flush=True)
    sys.exit(0)
assert dp.external and not dp.overlap

trainable = {n: p.data.copy() for n, p in model.named_parameters() if p.grad is not None}
root = comm.bcast(trainable, root=0)
assert set(trainable) == set(root) and all(np.array_equal(trainable[n], root[n]) for n in root)
if rank == 1:  # its own values were replaced (all but the head's bias, zero on every rank)
    assert {n for n in before if not np.array_equal(before[n], trainable[n])} == set(before) - {"classifier.bias"}
assert all(np.array_equal(p.data, frozen[n]) for n, p in model.named_parameters() if n in frozen)
assert len(frozen) > 10 and len(trainable) == 2 + 4 * 2  # the head and two layers' query / value adapters


def backward_and_check(seed):
    model.zero_grad()
    model.train()
    model.train_dropout = False
    r = np.random.default_rng([seed, rank])
    out = model(r.integers(5, 100, (3, 7)), np.ones((3, 7), np.int64))
    model.backward(r.standard_normal(out.shape).astype(np.float32))
    own = {n: p.grad.astype(np.float64) for n, p in model.named_parameters() if p.grad is not None}
    ranks = comm.allgather(own)
    dp.finish_gradients()
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        want = sum(d[n] for d in ranks)
        assert np.abs(p.grad - want).max() <= 1e-6 * np.abs(want).max() + 1e-12, n
        assert np.abs(want - own[n]).max() > 0, n  # the ranks' gradients differ: the sum is not a copy
    return own


backward_and_check(1)
assert len(dp._layout[1]) > 3  # several buckets
dict(model.named_parameters())["pooler.dense.weight"].requires_grad = True  # on every rank
assert "pooler.dense.weight" in backward_and_check(2)
print(f"rank {rank}: ok, {len(dp._layout[1])} buckets", flush=True)
