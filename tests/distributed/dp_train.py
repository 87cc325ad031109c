"""A small GPT trained with the Trainer, optionally data-parallel over MPI (run by test_distributed.py).

One process:  python dp_train.py --out r.npz --batch 8
Two ranks:    mpiexec -n 2 python -m mpi4py dp_train.py --out r.npz --batch 4
Rank 0 writes the per-step losses and the final weights to --out (.npz).
"""
from __future__ import annotations

import argparse
import os

import numpy as np

import cpuformer
from cpuformer.data import LanguageModelDataset
from cpuformer.models import GPT
from cpuformer.train import SGD, AdamW, Callback, Trainer

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--batch", type=int, required=True, help="per rank")
p.add_argument("--steps", type=int, default=6)
p.add_argument("--windows", type=int, default=187, help="training samples (16-token windows)")
p.add_argument("--output-dir", default=None)
p.add_argument("--save-every", type=int, default=None)
p.add_argument("--resume", action="store_true")
p.add_argument("--fail-rank", type=int, default=-1)
p.add_argument("--fail-step", type=int, default=2)
p.add_argument("--no-overlap", action="store_true")
p.add_argument("--bucket-mb", type=float, default=0.05)
p.add_argument("--threads", type=int, default=None)
p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
args = p.parse_args()

distributed = None
try:
    from cpuformer.distributed import DataParallel, launched_with_mpi
    mpi = launched_with_mpi()
except ImportError:
    mpi = False

cpuformer.nn.init.manual_seed(0)
rng = np.random.default_rng(1)
corpus = rng.integers(0, 40, size=args.windows * 16 + 1)
train = LanguageModelDataset(corpus, 16)
model = GPT(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
if mpi:
    distributed = DataParallel(model, overlap=not args.no_overlap, bucket_mb=args.bucket_mb, threads=args.threads)
elif args.threads:
    cpuformer.set_num_threads(args.threads)
rank = distributed.rank if distributed else 0


class FailOnRank(Callback):
    def on_step_end(self, trainer, logs):
        if rank == args.fail_rank and trainer.step == args.fail_step:
            raise RuntimeError(f"rank {rank} fails on purpose at step {trainer.step}")


optimizer = AdamW(model, lr=3e-3) if args.optimizer == "adamw" else SGD(model, lr=0.3, momentum=0.9)
trainer = Trainer(model, optimizer=optimizer, max_grad_norm=0.5, quiet=True, progress=False,
                  output_dir=args.output_dir, save_every=args.save_every, seed=3, callbacks=[FailOnRank()],
                  distributed=distributed)
trainer.fit(train, epochs=100, max_steps=args.steps, batch_size=args.batch,
            resume_from="latest" if args.resume else None)
if rank == 0:
    losses = np.array(trainer.history.values("loss"))
    np.savez(args.out, losses=losses, **{k: v for k, v in model.state_dict().items()})
    print(f"rank 0 of {distributed.size if distributed else 1}: {trainer.step} steps, threads "
          f"{cpuformer.get_num_threads()}, last loss {losses[-1]:.6f}", flush=True)
