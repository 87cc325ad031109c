"""Data-parallel training over MPI (``pip install "cpuformer[mpi]"``: mpi4py and an MPI wheel).

Launch one process per rank with ``python -m mpi4py`` (so an exception in one rank aborts the whole job instead
of leaving the others waiting in a collective)::

    mpiexec -n 2 python -m mpi4py -m cpuformer lm --text corpus.txt ...          # one machine
    mpiexec -hosts a,b -n 2 -ppn 1 python -m mpi4py -m cpuformer lm ...          # two machines (MPICH)

or from Python: ``Trainer(model, ..., distributed=DataParallel(model))``.

What :class:`DataParallel` does:

* rank 0's parameters are broadcast at start, so every rank begins from the same weights;
* each global batch (``ranks x batch_size`` samples, one shuffled order from the shared seed) is split into
  contiguous shards, rank r taking the r-th (``numpy.array_split``: sizes differ by at most one; the last, short
  batch of an epoch is split the same way, and a rank may get none);
* every rank scales its loss gradient by its counted targets over the **global** count, and the gradients are
  summed across ranks (``Iallreduce`` with ``MPI.IN_PLACE``), so N ranks make exactly the update one process makes
  with the whole global batch, up to float rounding: the reported loss, the gradient norm and clipping are global;
* gradients live in one flat float32 buffer cut into buckets (``bucket_mb``); while backward runs, a bucket's
  all-reduce starts as soon as the layers holding its parameters have finished (as PyTorch DDP does);
* a model whose gradients live outside Python (:func:`cpuformer.models.from_pretrained`'s, a ``SentenceEncoder``:
  views of C++ buffers) is reduced by copy: after backward the gradients of the parameters that have one (frozen
  weights have none and are skipped) are packed into buckets, summed, and copied back. Only those trainable
  parameters are broadcast at start (new heads and LoRA adapters included); frozen ones come from the same files
  on every rank, and every rank must have the same parameters (checked at start);
* threads per rank = cores on the node / ranks on the node (``Split_type(COMM_TYPE_SHARED)``), capped by the
  cores the rank may run on (Open MPI binds each rank to one core by default; MPICH does not bind); ``threads=``
  or the ``CPUFORMER_THREADS_PER_RANK`` environment variable overrides it;
* only rank 0 prints and writes checkpoints; every rank reads them to resume.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Optional

import numpy as np

try:
    from mpi4py import MPI
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('cpuformer.distributed needs mpi4py and an MPI library: pip install "cpuformer[mpi]"') from exc

from . import _core
from .nn import init
from .nn.module import ModuleList, Parameter

__all__ = ["DataParallel", "threads_per_rank", "launched_with_mpi"]


def launched_with_mpi() -> bool:
    """Whether this process was started by an MPI launcher with more than one rank."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE"):
        if os.environ.get(var, "1").isdigit() and int(os.environ.get(var, "1")) > 1:
            return True
    return False


def threads_per_rank(local_comm=None, override: Optional[int] = None) -> int:
    """Cores on this node divided by the ranks on it, at most the cores this rank may run on."""
    if override is None and os.environ.get("CPUFORMER_THREADS_PER_RANK"):
        override = int(os.environ["CPUFORMER_THREADS_PER_RANK"])
    if override is not None:
        if override < 1:
            raise ValueError(f"threads per rank must be >= 1, got {override}")
        return int(override)
    local_comm = local_comm or MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    cores = os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))  # 1 when Open MPI bound this rank to a core
    except AttributeError:  # pragma: no cover - not Linux
        allowed = cores
    return max(1, min(cores // local_comm.Get_size(), allowed))


class _Bucket:
    __slots__ = ("start", "stop", "params", "pending", "request")

    def __init__(self, start: int, stop: int, params: List[int]) -> None:
        self.start, self.stop, self.params = start, stop, params
        self.pending = 0
        self.request = None


class DataParallel:
    """Synchronous data parallelism for ``model`` over ``comm`` (default ``MPI.COMM_WORLD``); see the module doc.

    ``overlap`` starts each bucket's all-reduce during backward (off: one all-reduce per bucket after backward);
    ``bucket_mb`` sizes the buckets; ``threads`` overrides the threads per rank. Pass it to
    ``Trainer(..., distributed=...)``. Construct it on every rank after building the model and before training.
    """

    def __init__(self, model, comm=None, *, overlap: bool = True, bucket_mb: float = 4.0,
                 threads: Optional[int] = None, seed: int = 0) -> None:
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.local_comm = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.threads = threads_per_rank(self.local_comm, threads)
        _core.set_num_threads(self.threads)
        self.model = model
        self.comm_wait_s = 0.0     # time spent waiting for all-reduces after backward (not hidden by compute)
        self.early_starts = 0      # buckets whose all-reduce started while backward was still running
        self._armed = False
        self._next = 0             # the next bucket to start: buckets start in index order on every rank
        self._named = list(model.named_parameters())
        self._bucket_limit = max(1, int(bucket_mb * 2**20 / 4))
        # Gradients that the model owns elsewhere (C++ buffers) cannot be re-pointed into a flat buffer: copy them.
        self.external = not all(isinstance(p, Parameter) for _, p in self._named)
        self.overlap = bool(overlap) and not self.external  # (backward is one C++ call: nothing to overlap with)
        if self.external:
            self._check_same_parameters()
            self._layout = None
        else:
            self._flatten()
        self.broadcast_parameters()
        # Dropout masks differ between ranks (each rank's samples are different samples).
        init.set_state(np.random.default_rng([int(seed), self.rank, 0x5EED]).bit_generator.state)
        if not self.external:
            self._wrap_units()

    # -- setup ----------------------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _flatten(self) -> None:
        """Gradients become views into one flat buffer, laid out in reverse parameter order (roughly the order in
        which backward finishes them), cut into contiguous buckets."""
        order = list(range(len(self._named)))[::-1]
        total = sum(self._named[i][1].grad.size for i in order)
        self.flat = np.zeros(total, np.float32)
        limit = self._bucket_limit
        self.buckets: List[_Bucket] = []
        self._bucket_of: Dict[int, int] = {}
        offset, start, members = 0, 0, []
        for n, i in enumerate(order):
            p = self._named[i][1]
            view = self.flat[offset:offset + p.grad.size].reshape(p.grad.shape)
            view[...] = p.grad
            p.grad = view
            offset += p.grad.size
            members.append(i)
            self._bucket_of[i] = len(self.buckets)
            if offset - start >= limit or n == len(order) - 1:
                self.buckets.append(_Bucket(start, offset, members))
                start, members = offset, []

    def _wrap_units(self) -> None:
        """Each direct child of the model (the children of a child container such as ``blocks``) is a unit whose
        backward, when it returns, has finished its parameters' gradients for this step."""
        units = []
        for child in self.model._modules.values():
            grand = list(child._modules.values())
            if isinstance(child, ModuleList) and grand:  # a container: its layers are the units
                units.extend(grand)
            else:
                units.append(child)
        index = {id(p): i for i, (_, p) in enumerate(self._named)}
        self._units_of_param = {i: 0 for i in range(len(self._named))}
        for unit in units:
            members = sorted({index[id(p)] for p in unit.parameters()})
            for i in members:
                self._units_of_param[i] += 1
            original = unit.backward

            def backward(*args, _original=original, _members=members, **kwargs):
                result = _original(*args, **kwargs)
                if self._armed:
                    self._units_done(_members)
                return result

            object.__setattr__(unit, "backward", backward)

    def _check_same_parameters(self) -> None:
        """Every rank must hold the same parameters (names, shapes, which are trainable): the packed all-reduce
        relies on it, and a rank that loaded another model would otherwise train garbage or hang."""
        mine = [(n, tuple(p.data.shape), p.grad is not None) for n, p in self.model.named_parameters()]
        ranks = self.comm.allgather(mine)
        odd = [r for r, theirs in enumerate(ranks) if theirs != ranks[0]]
        if odd:
            raise ValueError(f"DataParallel: rank {odd[0]} has other parameters than rank 0 (names, shapes or "
                             "which require gradients differ): every rank must build the same model")

    def broadcast_parameters(self, root: int = 0) -> None:
        """Every rank takes ``root``'s weights (with external gradients: the trainable ones)."""
        for _, p in (self.model.named_parameters() if self.external else self._named):
            if self.external and p.grad is None:
                continue  # frozen: loaded from the same files on every rank
            self.comm.Bcast(p.data, root=root)

    # -- per step -------------------------------------------------------------------------------------------------
    def shard(self, indices: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of a global batch of sample indices."""
        return np.array_split(np.asarray(indices), self.size)[self.rank]

    def allreduce(self, values) -> np.ndarray:
        """Sum of a small float64 vector over ranks (losses, counts)."""
        buf = np.ascontiguousarray(values, dtype=np.float64).copy()
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return buf

    def gather_arrays(self, array: np.ndarray) -> np.ndarray:
        """Concatenation of every rank's 1-D array, in rank order, on every rank."""
        array = np.ascontiguousarray(array)
        counts = np.array(self.comm.allgather(int(array.size)))
        out = np.empty(int(counts.sum()), array.dtype)
        mpi_type = MPI._typedict[array.dtype.char]
        self.comm.Allgatherv(array, [out, counts, np.concatenate([[0], np.cumsum(counts)[:-1]]), mpi_type])
        return out

    def begin_backward(self) -> None:
        """Call before the last backward of a step (with gradient accumulation, the earlier ones stay local)."""
        if not self.overlap:
            return
        self._armed = True
        self._next = 0
        self._remaining = dict(self._units_of_param)
        for bucket in self.buckets:
            bucket.pending = len(bucket.params)
            bucket.request = None

    def _units_done(self, members: List[int]) -> None:
        for i in members:
            self._remaining[i] -= 1
            if self._remaining[i] == 0:
                bucket = self.buckets[self._bucket_of[i]]
                bucket.pending -= 1
        # Start ready buckets strictly in index order, so every rank posts its collectives in the same order (MPI
        # requires it) even when backward finishes them in another order, or a rank had no samples to run.
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self._start(self.buckets[self._next])
            self._next += 1
            self.early_starts += 1
        # MPI progresses a non-blocking collective only inside MPI calls (no progress thread here: both cores are
        # computing), so poke the ones in flight at each layer boundary of backward.
        active = [b.request for b in self.buckets[:self._next] if b.request is not None]
        if active:
            MPI.Request.Testall(active)

    def _start(self, bucket: _Bucket) -> None:
        bucket.request = self.comm.Iallreduce(MPI.IN_PLACE, self.flat[bucket.start:bucket.stop], op=MPI.SUM)

    def _external_layout(self):
        """The trainable parameters' gradient views and their buckets (``(start, stop, [(offset, view)])`` in the
        packed buffer); rebuilt when the set of parameters with a gradient changes."""
        grads = [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
        key = [(n, g.shape) for n, g in grads]
        if self._layout is None or self._layout[0] != key:
            total = sum(g.size for _, g in grads)
            self.flat = np.zeros(total, np.float32)
            buckets, offset, start, members = [], 0, 0, []
            for k, (_, g) in enumerate(grads):
                members.append(offset)
                offset += g.size
                if offset - start >= self._bucket_limit or k == len(grads) - 1:
                    buckets.append((start, offset, members))
                    start, members = offset, []
            self._layout = (key, buckets)
        views = [g for _, g in grads]
        out, k = [], 0
        for start, stop, offsets in self._layout[1]:
            out.append((start, stop, [(o, views[k + j]) for j, o in enumerate(offsets)]))
            k += len(offsets)
        return out

    def _finish_external(self) -> None:
        """Copy-in / all-reduce / copy-out: each bucket's all-reduce starts once it is packed."""
        t0 = time.perf_counter()
        buckets = self._external_layout()
        requests = []
        for start, stop, members in buckets:
            for offset, g in members:
                self.flat[offset:offset + g.size] = g.reshape(-1)
            requests.append(self.comm.Iallreduce(MPI.IN_PLACE, self.flat[start:stop], op=MPI.SUM))
        MPI.Request.Waitall(requests)
        for _, _, members in buckets:
            for offset, g in members:
                g[...] = self.flat[offset:offset + g.size].reshape(g.shape)
        self.comm_wait_s += time.perf_counter() - t0

    def finish_gradients(self) -> None:
        """Sum the gradients over ranks (waiting for the buckets started during backward, starting the rest)."""
        if self.external:
            return self._finish_external()
        t0 = time.perf_counter()
        self._armed = False
        self._next = len(self.buckets)
        requests = []
        for bucket in self.buckets:
            if bucket.request is None:
                self._start(bucket)
            requests.append(bucket.request)
            bucket.request = None
        MPI.Request.Waitall(requests)
        self.comm_wait_s += time.perf_counter() - t0

    def barrier(self) -> None:
        self.comm.Barrier()

    def gather_states(self, state) -> list:
        """Every rank's small JSON-able ``state`` (on every rank)."""
        return self.comm.allgather(state)

    def bcast_object(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)
