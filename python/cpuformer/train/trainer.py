"""Trainer: fit / evaluate / predict for any cpuformer model, with exact resume from atomic checkpoints.

A model is anything with ``forward(*inputs) -> outputs``, ``backward(grad_outputs)``, ``named_parameters()``,
``zero_grad()``, ``train()`` / ``eval()``. A dataset is indexed with an array of sample indices and returns
``(inputs_tuple, targets)`` (see :mod:`cpuformer.data`).

Exact resume: a checkpoint (``output_dir/checkpoint-{step}/``: ``model.safetensors``, ``optimizer.safetensors``,
``trainer_state.json``) holds the weights, the optimizer moments and step, the position in the data order (each
epoch's order is a pure function of ``(seed, epoch)``), the generator state behind dropout masks, the history and
the early-stopping state; the learning-rate schedule is a function of the step. With the same thread count,
resuming reproduces the uninterrupted run's losses exactly.

Nothing lost: a checkpoint folder is written under a temporary name (``checkpoint-{step}.tmp-{pid}-{random}``),
completed by ``checkpoint_complete.json`` (written last: every file's size) and only then renamed into place. A
checkpoint being replaced (the final save of a run that ended on a save step) is renamed aside first and deleted
after the new one is in place; rotation deletes old checkpoints only after the new one is in place, oldest first.
:func:`latest_checkpoint` ignores incomplete folders (a checkpoint from before the marker counts as complete when it
holds all three files). On the next start (a Trainer with ``output_dir``, or ``fit(resume_from="latest")``) what a
killed run left is tidied: a complete temporary checkpoint whose ``checkpoint-{step}`` is missing or incomplete is
renamed into place, other temporary folders and files of dead processes are removed.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from .. import ops
from ..data.sequences import IGNORE_INDEX, ArrayDataset, batch_indices
from ..io import _fsync_dir, atomic_write_bytes, load_safetensors, save_safetensors
from ..nn import init
from .losses import CrossEntropyLoss
from .metrics import accuracy, perplexity, precision_recall_f1
from .optim import AdamW, Schedule, constant

__all__ = ["Trainer", "Callback", "EarlyStopping", "latest_checkpoint", "History"]

logger = logging.getLogger("cpuformer")
logger.addHandler(logging.NullHandler())

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_CKPT_FILES = ("model.safetensors", "optimizer.safetensors", "trainer_state.json")
_MARKER = "checkpoint_complete.json"
# temporary names in output_dir: checkpoint-N.tmp-{pid}-{hex} (a checkpoint being written), checkpoint-N.tmp-del-...
# (one being deleted), .tmp-{pid}-{hex} (a file being written by atomic_write_bytes); older versions wrote
# checkpoint-N.tmp-{pid} and mkstemp's .tmp-XXXXXXXX
_TMP_RE = re.compile(r"^(?P<base>checkpoint-\d+)?\.tmp-(?P<trash>del-)?(?P<rest>.*)$")
_TMP_PID_RE = re.compile(r"^(\d+)(?:-[0-9a-f]+)?$")


def _checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a complete checkpoint, or None when it is. Complete: ``checkpoint_complete.json`` is
    there and every file it lists has its size, or (a checkpoint written before the marker) all three files are
    there."""
    if not os.path.isdir(path):
        return "not a folder"
    marker = os.path.join(path, _MARKER)
    if not os.path.lexists(marker):
        missing = [name for name in _CKPT_FILES if not os.path.isfile(os.path.join(path, name))]
        return f"{', '.join(missing)} missing (an interrupted save?)" if missing else None
    try:
        with open(marker, "rb") as f:
            files = json.loads(f.read().decode("utf-8"))["files"]
        if not isinstance(files, dict) or not all(
                isinstance(n, str) and os.path.basename(n) == n and n not in ("", ".", "..")
                and isinstance(v, int) for n, v in files.items()):
            raise TypeError("bad file list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{_MARKER} is damaged ({exc})"
    for name in sorted(set(_CKPT_FILES) | set(files)):
        try:
            size = os.path.getsize(os.path.join(path, name))
        except OSError:
            return f"{name} missing"
        if name in files and size != files[name]:
            return f"{name} has {size} bytes, {files[name]} were written"
    return None


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete ``checkpoint-N`` folder in ``output_dir``, or None. Incomplete ones (a save killed
    midway, a damaged folder) are skipped."""
    if not output_dir or not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT_RE.match(name)
        if m:
            found.append((int(m.group(1)), name))
    for _, name in sorted(found, reverse=True):
        if _checkpoint_problem(os.path.join(output_dir, name)) is None:
            return os.path.join(output_dir, name)
    return None


def _pid_alive(pid: int) -> bool:
    """Whether another live process has this id (our own id counts as dead: that file is from an earlier life)."""
    if pid == os.getpid() or os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _remove(path: str) -> None:
    """Delete a file or folder (a folder is first renamed to a ``.tmp-del-`` name, so it disappears at once and a
    kill midway leaves only a temporary folder)."""
    if os.path.isdir(path) and not os.path.islink(path):
        name = os.path.basename(path)
        if not _TMP_RE.match(name):  # (a temporary folder is deleted where it is)
            trash = os.path.join(os.path.dirname(path), f"{name}.tmp-del-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                os.rename(path, trash)
                path = trash
            except OSError:
                pass
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _tidy_output_dir(output_dir: str) -> None:
    """Finish what killed runs left in ``output_dir``: a complete temporary checkpoint whose ``checkpoint-N`` is
    missing or incomplete is renamed into place (a kill between the two renames of a replacement); every other
    temporary folder or file of a process that is no longer running is removed."""
    if not output_dir or not os.path.isdir(output_dir):
        return
    changed = False
    for name in sorted(os.listdir(output_dir)):
        m = _TMP_RE.match(name)
        if not m:
            continue
        path = os.path.join(output_dir, name)
        base = m.group("base")
        if base and not m.group("trash") and _checkpoint_problem(path) is None:
            target = os.path.join(output_dir, base)
            if _checkpoint_problem(target) is not None:
                try:
                    if os.path.lexists(target):
                        _remove(target)
                    os.rename(path, target)
                except OSError as exc:
                    logger.warning("could not put the complete checkpoint %s in place: %s", path, exc)
                else:
                    logger.warning("%s: completed from %s, which an interrupted save left", target, name)
                    changed = True
                continue
        pid = _TMP_PID_RE.match(m.group("rest"))
        if pid and _pid_alive(int(pid.group(1))):
            continue  # another process is writing it right now
        _remove(path)
        changed = True
    if changed:
        _fsync_dir(output_dir)


class Callback:
    """Hooks called by the Trainer; ``logs`` is the record just added to the history."""

    def on_train_begin(self, trainer: "Trainer") -> None:
        pass

    def on_step_end(self, trainer: "Trainer", logs: dict) -> None:
        pass

    def on_evaluate(self, trainer: "Trainer", logs: dict) -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer", logs: dict) -> None:
        pass

    def on_train_end(self, trainer: "Trainer") -> None:
        pass


class EarlyStopping(Callback):
    """Stop when ``monitor`` (e.g. ``"val_loss"``, ``"val_accuracy"``) has not improved by ``min_delta`` for
    ``patience`` evaluations. With ``restore_best`` the weights of the best evaluation are put back when training
    ends (Keras's restore_best_weights)."""

    def __init__(self, monitor: str = "val_loss", patience: int = 3, mode: str = "min", min_delta: float = 0.0,
                 restore_best: bool = False):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, int(patience), mode, float(min_delta)
        self.restore_best = bool(restore_best)
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.bad = 0
        self._best_weights = None

    def on_evaluate(self, trainer, logs):
        if self.monitor not in logs:
            raise KeyError(f"EarlyStopping: {self.monitor!r} is not among the evaluation results {sorted(logs)}")
        value = logs[self.monitor]
        better = self.best is None or (value < self.best - self.min_delta if self.mode == "min"
                                       else value > self.best + self.min_delta)
        if better:
            self.best, self.bad, self.best_step = value, 0, trainer.step
            if self.restore_best:
                self._best_weights = {n: p.data.copy() for n, p in trainer.model.named_parameters()}
        else:
            self.bad += 1
            if self.bad >= self.patience:
                trainer.should_stop = True

    def on_train_end(self, trainer):
        if self.restore_best and self._best_weights is not None:
            trainer.model.load_state_dict(self._best_weights)

    def state(self) -> dict:
        return {"best": self.best, "bad": self.bad, "best_step": self.best_step}

    def load_state(self, state: dict) -> None:
        self.best, self.bad, self.best_step = state.get("best"), int(state.get("bad", 0)), state.get("best_step")


class History(list):
    """The records of a run (dicts), also written as JSON lines to ``output_dir/history.jsonl``."""

    def values(self, key: str) -> List[float]:
        return [r[key] for r in self if key in r]


def _clock(seconds: float) -> str:
    """1:05 or 1:02:05."""
    seconds = int(max(0, round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class _Progress:
    """tqdm when installed, wanted and writing to a terminal; plain lines otherwise (files, CI logs), one every
    ``log_every`` steps and at least one every ``log_seconds`` seconds, with step/total, elapsed time and ETA;
    nothing in quiet mode."""

    def __init__(self, total: int, initial: int, quiet: bool, log_every: Optional[int], use_tqdm: bool,
                 log_seconds: Optional[float] = None):
        self.quiet, self.log_every, self.log_seconds, self.bar = quiet, log_every, log_seconds, None
        self.last_print = None
        if not quiet and use_tqdm and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, leave=True)
            except ImportError:
                pass

    def update(self, step: int, logs: dict, total: Optional[int] = None, estimated: bool = False,
               elapsed: Optional[float] = None, eta: Optional[float] = None) -> None:
        if self.quiet:
            return
        text = f"loss {logs['loss']:.4f}  lr {logs['lr']:.2e}  {logs['tokens_per_s']:.0f} tok/s"
        if self.bar is not None:
            if total and self.bar.total != total:
                self.bar.total = total
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
            return
        now = time.perf_counter()
        due = (self.last_print is None or (self.log_every and step % self.log_every == 0)
               or (self.log_seconds is not None and now - self.last_print >= self.log_seconds)
               or (total is not None and not estimated and step >= total))
        if not due:
            return
        self.last_print = now
        where = f"step {step}/{'~' if estimated else ''}{total}" if total else f"step {step}"
        when = ""
        if elapsed is not None:
            when = f"  elapsed {_clock(elapsed)}" + (f"  ETA {_clock(eta)}" if eta is not None else "")
        print(f"{where}  epoch {logs['epoch']}  {text}{when}", flush=True)

    def write(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_dataset(obj) -> bool:
    """A dataset (indexed with an array of sample indices), as opposed to arrays or a tuple of arrays."""
    return (hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not isinstance(obj, (np.ndarray, list, tuple))
            and not hasattr(obj, "__array__"))


def _as_arrays(obj) -> bool:
    return isinstance(obj, np.ndarray) or hasattr(obj, "__array__") or (
        isinstance(obj, (list, tuple)) and len(obj) > 0 and all(isinstance(a, np.ndarray) or hasattr(a, "__array__")
                                                                 for a in obj))


class _Subset:
    """Samples ``ids`` of a dataset (for ``validation_split``)."""

    def __init__(self, data, ids: np.ndarray) -> None:
        self.data, self.ids = data, np.asarray(ids, np.int64)
        lengths = getattr(data, "lengths", None)
        self.lengths = None if lengths is None else np.asarray(lengths)[self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx):
        return self.data[self.ids[np.asarray(idx)]]


def _to_dataset(x, y, what: str):
    """A dataset from Keras-style arguments: a dataset (``y`` None), arrays ``x`` (one array or a list/tuple of
    input arrays) with targets ``y``, or ``(x, y)``."""
    if x is None:
        return None
    if y is None and _is_dataset(x):
        return x
    if y is None:
        if isinstance(x, tuple) and len(x) == 2:
            x, y = x
        else:
            raise ValueError(f"{what}: arrays need targets: pass (x, y), or x and y")
    if isinstance(x, list) and not all(isinstance(a, np.ndarray) for a in x):
        x = np.asarray(x)
    return ArrayDataset(x, y)


def _tensorboard_writer(logdir: str):
    """A SummaryWriter from tensorboardX or torch.utils.tensorboard when one is installed, else None (optional:
    the CSV and JSON-lines logs are always written)."""
    try:
        if importlib.util.find_spec("tensorboardX") is not None:
            from tensorboardX import SummaryWriter
            return SummaryWriter(logdir)
        if importlib.util.find_spec("tensorboard") is not None and importlib.util.find_spec("torch") is not None:
            from torch.utils.tensorboard import SummaryWriter
            return SummaryWriter(logdir)
    except Exception as exc:  # a broken optional install must not stop training
        logger.warning("TensorBoard logging disabled: %s", exc)
    return None


class Trainer:
    """Keras-style training loop over cpuformer models.

    Arguments: ``model``; ``loss`` (default :class:`CrossEntropyLoss`); ``optimizer`` (default ``AdamW(model,
    lr)``); ``schedule`` (a :class:`Schedule`, default constant ``lr``); ``max_grad_norm`` (clip by global norm);
    ``grad_accum_steps``; ``metrics`` (names among accuracy, precision, recall, f1, perplexity);
    ``output_dir`` with ``save_every`` steps (and at the end) keeping ``save_total_limit`` checkpoints;
    ``eval_every`` steps (and at each epoch end); ``callbacks`` (e.g. :class:`EarlyStopping`); ``seed`` for the data
    order; ``on_nonfinite`` "raise" (default: a non-finite loss or gradient stops training with an error naming the
    step and parameter) or "skip" (the step is skipped and counted); ``progress`` (tqdm when installed), ``quiet``;
    ``distributed``: a :class:`cpuformer.distributed.DataParallel` for data-parallel training over MPI, where
    ``batch_size`` is per rank, losses, metrics and clipping are global, and only rank 0 prints and saves.
    Progress lines come every ``log_every`` steps and at least every ``log_seconds`` seconds (step/total, elapsed,
    ETA). With ``output_dir`` every record also goes to ``history.jsonl`` and ``history.csv``, and to TensorBoard
    event files under ``output_dir/tensorboard`` when ``tensorboardX`` or ``tensorboard`` is installed.

    Ctrl-C (SIGINT) during :meth:`fit` stops at the end of the current step; the checkpoint is saved (with
    ``output_dir``), callbacks end as usual (early stopping restores the best weights) and ``KeyboardInterrupt``
    is raised; ``interrupted`` is then True. A second Ctrl-C interrupts at once.
    """

    def __init__(self, model, loss=None, optimizer=None, *, lr: float = 1e-3, schedule: Optional[Schedule] = None,
                 max_grad_norm: Optional[float] = None, grad_accum_steps: int = 1, metrics: Sequence[str] = (),
                 output_dir: Optional[str] = None, save_every: Optional[int] = None,
                 save_total_limit: Optional[int] = 2, eval_every: Optional[int] = None, log_every: Optional[int] = 20,
                 seed: int = 0, callbacks: Iterable[Callback] = (), on_nonfinite: str = "raise",
                 progress: bool = True, quiet: bool = False, distributed=None,
                 log_seconds: Optional[float] = None) -> None:
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        unknown = set(metrics) - {"accuracy", "precision", "recall", "f1", "perplexity"}
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}")
        self.model = model
        self.loss = loss or CrossEntropyLoss()
        self.optimizer = optimizer or AdamW(model, lr=lr)
        self.schedule = schedule or constant(self.optimizer.lr)
        self.max_grad_norm = max_grad_norm
        self.grad_accum_steps = int(grad_accum_steps)
        self.metrics = tuple(metrics)
        self.output_dir, self.save_every, self.save_total_limit = output_dir, save_every, save_total_limit
        self.eval_every, self.seed = eval_every, int(seed)
        self.log_every = max(0, int(log_every or 0))
        self.log_seconds = log_seconds
        self.callbacks = list(callbacks)
        self.dist = distributed
        self.is_main = distributed is None or distributed.is_main
        self.on_nonfinite, self.progress = on_nonfinite, progress
        self.quiet = quiet or not self.is_main
        self.step = 0            # optimizer steps taken
        self.epoch = 0
        self.batch_in_epoch = 0  # next batch of the current epoch
        self.skipped_steps = 0
        self.should_stop = False
        self.history = History()
        self.last_loss = float("nan")
        self.elapsed_before = 0.0  # training seconds of earlier runs (restored from a checkpoint)
        self._fit_start: Optional[float] = None
        self._fit_step0 = 0
        self.max_time: Optional[float] = None
        self.total_steps: Optional[int] = None
        self.interrupted = False
        self._csv_columns: Optional[List[str]] = None
        self._tb = None
        if output_dir and self.is_main:
            self._tidy()

    def _tidy(self) -> None:
        try:
            _tidy_output_dir(self.output_dir)
        except OSError as exc:  # never fatal: what is left is ignored by latest_checkpoint
            logger.warning("could not tidy %s: %s", self.output_dir, exc)

    # -- the loop -------------------------------------------------------------------------------------------------
    def fit(self, train=None, val=None, epochs: int = 1, max_steps: Optional[int] = None, batch_size: int = 32,
            bucket: bool = False, resume_from: Optional[str] = None, eval_batch_size: Optional[int] = None, *,
            x=None, y=None, validation_data=None, validation_split: float = 0.0, shuffle: bool = True,
            max_time: Optional[float] = None) -> History:
        """Train for ``epochs`` (or until ``max_steps`` optimizer steps, or ``max_time`` seconds of training);
        ``resume_from`` a checkpoint folder, or ``"latest"`` for the newest in ``output_dir``. Returns the history
        (also in ``output_dir/history.jsonl`` and ``history.csv``).

        The data: a dataset (``train``, with ``val`` or ``validation_data`` another), or, as Keras, numpy arrays:
        ``fit(x, y)`` or ``fit((x, y))`` (``x`` one array or a list of input arrays),
        ``validation_data=(x_val, y_val)``, ``validation_split`` (the last fraction of the samples, before
        shuffling, as Keras), ``shuffle`` (each epoch's order; False keeps the samples in order)."""
        if train is None:
            train = x
        if train is None:
            raise ValueError("fit: no training data (pass a dataset, or arrays x and y)")
        if _as_arrays(train) and not _is_dataset(train) and y is None and val is not None and _as_arrays(val) \
                and not isinstance(val, tuple):
            y, val = val, None  # fit(x, y): Keras's positional order
        train = _to_dataset(train, y, "fit")
        if validation_data is not None:
            if val is not None:
                raise ValueError("fit: pass val or validation_data, not both")
            val = validation_data
        val = _to_dataset(val, None, "validation_data") if val is not None else None
        if validation_split:
            if not 0 < validation_split < 1:
                raise ValueError(f"fit: validation_split must be in (0, 1), got {validation_split}")
            if val is not None:
                raise ValueError("fit: pass validation_split or validation data, not both")
            n_val = int(len(train) * validation_split)  # Keras: the last fraction, before any shuffling
            if n_val < 1 or n_val >= len(train):
                raise ValueError(f"fit: validation_split {validation_split} of {len(train)} samples leaves no "
                                 "training or no validation samples")
            cut = len(train) - n_val
            train, val = _Subset(train, np.arange(cut)), _Subset(train, np.arange(cut, len(train)))
        if len(train) == 0:
            raise ValueError("fit: the training set is empty")
        if batch_size is None or int(batch_size) < 1:
            raise ValueError(f"fit: batch_size must be >= 1, got {batch_size}")
        if resume_from == "latest":
            if self.output_dir and self.is_main:
                self._tidy()  # a checkpoint a kill left between its two renames is put in place first
            resume_from = latest_checkpoint(self.output_dir) if self.output_dir else None
            if self.dist:  # rank 0's view of the folder decides; every rank must be able to read it
                resume_from = self.dist.bcast_object(resume_from)
            if resume_from is None and self.is_main and not self.quiet:
                print(f"no checkpoint in {self.output_dir}: starting from scratch", flush=True)
        if resume_from:
            self.load_checkpoint(resume_from)
            if self.is_main and not self.quiet:
                print(f"resumed from {os.path.basename(os.path.normpath(resume_from))} (step {self.step}, epoch "
                      f"{self.epoch})", flush=True)
        ranks = self.dist.size if self.dist else 1
        global_batch = batch_size * ranks  # each global batch is sharded over the ranks
        n_batches = -(-len(train) // global_batch)
        steps_per_epoch = max(1, n_batches // self.grad_accum_steps)
        total = min(epochs * steps_per_epoch, max_steps) if max_steps else epochs * steps_per_epoch
        self.total_steps, self.max_time = total, max_time
        self._fit_start, self._fit_step0 = time.perf_counter(), self.step
        bar = _Progress(total, self.step, self.quiet, self.log_every, self.progress, self.log_seconds)
        self.should_stop = False
        self.interrupted = False
        lengths = getattr(train, "lengths", None)
        if self.output_dir and self.is_main and self._tb is None:
            self._tb = _tensorboard_writer(os.path.join(self.output_dir, "tensorboard"))
        for cb in self.callbacks:
            cb.on_train_begin(self)
        restore = self._catch_sigint()
        try:
            while self.epoch < epochs and not self.should_stop and (not max_steps or self.step < max_steps):
                rng = np.random.default_rng([self.seed, self.epoch]) if shuffle else None
                batches = batch_indices(len(train), global_batch, rng, lengths=lengths, bucket=bucket)
                while self.batch_in_epoch + self.grad_accum_steps <= len(batches):
                    if self.should_stop or (max_steps and self.step >= max_steps):
                        break
                    group = batches[self.batch_in_epoch:self.batch_in_epoch + self.grad_accum_steps]
                    logs = self._train_step(train, group)
                    self.batch_in_epoch += self.grad_accum_steps
                    if logs is None:
                        continue
                    self._record(logs)
                    est_total, estimated = self.estimated_total_steps()
                    elapsed = self.elapsed()
                    bar.update(self.step, logs, est_total, estimated, elapsed, self._eta(est_total))
                    for cb in self.callbacks:
                        cb.on_step_end(self, logs)
                    if max_time is not None and elapsed >= max_time:
                        self.should_stop = True
                    if self.dist:  # a wall-clock budget may trip on one rank first: stop together
                        self.should_stop = bool(self.dist.allreduce([self.should_stop])[0])
                    if val is not None and self.eval_every and self.step % self.eval_every == 0:
                        self._evaluate_and_record(val, eval_batch_size or batch_size, bar)
                    if self.output_dir and self.save_every and self.step % self.save_every == 0:
                        self.save_checkpoint()
                else:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    epoch_logs = {"epoch_end": self.epoch, "step": self.step}
                    if val is not None and (not self.eval_every or self.step % self.eval_every):
                        epoch_logs.update(self._evaluate_and_record(val, eval_batch_size or batch_size, bar))
                    for cb in self.callbacks:
                        cb.on_epoch_end(self, epoch_logs)
            if self.output_dir:
                self.save_checkpoint()  # the state training reached, so a resume continues from it
        finally:
            bar.close()
            restore()
            self.elapsed_before = self.elapsed()
            self._fit_start = None
            if self._tb is not None:
                self._tb.flush()
        for cb in self.callbacks:
            cb.on_train_end(self)
        if self.dist:
            self.dist.barrier()
        if self.interrupted:
            raise KeyboardInterrupt(f"training interrupted at step {self.step}")
        return self.history

    def _catch_sigint(self):
        """Make a first Ctrl-C stop training at the end of the current step (the main thread only, and only while
        Python's default handler is installed); returns the function that puts the handler back."""
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return lambda: None

        def handler(signum, frame):
            if self.interrupted:  # a second Ctrl-C: at once
                raise KeyboardInterrupt
            self.interrupted = True
            self.should_stop = True

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, signal.default_int_handler)

    def elapsed(self) -> float:
        """Seconds of training so far, earlier runs (before a resume) included."""
        running = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        return self.elapsed_before + running

    def estimated_total_steps(self):
        """(total steps, estimated?): the steps ``fit`` will take; with ``max_time``, estimated from the pace so
        far (the smaller of the two)."""
        total = self.total_steps
        if self.max_time is None or self._fit_start is None:
            return total, False
        done = self.step - self._fit_step0
        run = time.perf_counter() - self._fit_start
        if done < 1 or run <= 0:
            return total, True
        by_time = self.step + int(max(0.0, self.max_time - self.elapsed()) * done / run)
        return (by_time, True) if total is None or by_time < total else (total, False)

    def progress_fraction(self, step: Optional[int] = None) -> float:
        """How far training is, in [0, 1]: by steps, or by time with ``max_time`` (whichever is further)."""
        step = self.step if step is None else step
        frac = step / self.total_steps if self.total_steps else 0.0
        if self.max_time:
            frac = max(frac, self.elapsed() / self.max_time)
        return min(1.0, frac)

    def _eta(self, total: Optional[int]) -> Optional[float]:
        done = self.step - self._fit_step0
        if self._fit_start is None or done < 1 or not total:
            return None
        eta = (total - self.step) * (time.perf_counter() - self._fit_start) / done
        if self.max_time is not None:
            eta = min(eta, max(0.0, self.max_time - self.elapsed()))
        return max(0.0, eta)

    def _train_step(self, train, group: List[np.ndarray]) -> Optional[dict]:
        t0 = time.perf_counter()
        self.model.train()
        dist = self.dist
        ignore = getattr(self.loss, "ignore_index", IGNORE_INDEX)
        if dist:
            group = [dist.shard(idx) for idx in group]
        batches = [train[idx] for idx in group if len(idx)]  # a rank may get no samples of a short last batch
        # counted targets across the accumulated batches (and ranks), for an exact mean over the global batch
        count_of = getattr(self.loss, "count", None) or (lambda t: int((np.asarray(t) != ignore).sum()))
        counts = [int(count_of(targets)) for _, targets in batches]
        tokens = sum(int(np.asarray(inputs[0]).size) for inputs, _ in batches)
        grand = max(1, sum(counts) if not dist else int(dist.allreduce([sum(counts)])[0]))
        total_loss, total_count, bad_loss = 0.0, 0, None
        for k, ((inputs, targets), count) in enumerate(zip(batches, counts)):
            outputs = self.model(*inputs)
            try:
                loss, grad, n = self.loss(outputs, targets, grad_scale=count / grand)
            except ValueError as exc:
                if "not finite" not in str(exc):
                    raise
                bad_loss = f"step {self.step + 1}: the loss is not finite ({exc})"
                break
            if dist and k == len(batches) - 1:
                dist.begin_backward()  # buckets start their all-reduce as backward finishes their layers
            self.model.backward(grad)
            total_loss += loss * n
            total_count += n
        if dist:  # every rank makes the same collective calls, whatever happened locally
            dist.finish_gradients()
            total_loss, total_count, tokens, bad = dist.allreduce([total_loss, total_count, tokens,
                                                                   bad_loss is not None])
            total_count, tokens = int(total_count), int(tokens)
            if bad:
                return self._nonfinite(bad_loss or f"step {self.step + 1}: the loss is not finite on another rank")
        elif bad_loss is not None:
            return self._nonfinite(bad_loss)
        # global gradient norm (float64; after the all-reduce every rank holds the global gradient), non-finite
        # check, clipping folded into the optimizer's pass
        sq = 0.0
        named = list(self.model.named_parameters())
        named = [(name, p) for name, p in named if p.grad is not None]  # frozen pretrained weights have none
        for name, p in named:
            sq += ops.sum_squares(p.grad)
        norm = math.sqrt(sq)
        if not math.isfinite(norm):
            bad = next((n for n, p in named if not np.isfinite(p.grad).all()), "?")
            return self._nonfinite(f"step {self.step + 1}: non-finite gradient in parameter {bad!r}")
        clip = 1.0
        if self.max_grad_norm is not None and norm > self.max_grad_norm:
            clip = self.max_grad_norm / (norm + 1e-6)
        lr = self.schedule(self.step)
        if self.dist and getattr(self.schedule, "uses_time", False):  # a clock-driven schedule: one value for all
            lr = float(self.dist.allreduce([lr])[0]) / self.dist.size
        self.optimizer.step(lr=lr, grad_scale=clip)
        self.model.zero_grad()
        self.step += 1
        self.last_loss = total_loss / max(1, total_count)
        dt = time.perf_counter() - t0
        return {"step": self.step, "epoch": self.epoch, "loss": self.last_loss, "lr": lr, "grad_norm": norm,
                "tokens_per_s": tokens / dt if dt > 0 else 0.0, "step_time": dt}

    def _nonfinite(self, message: str) -> None:
        self.model.zero_grad()
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message + " (pass on_nonfinite='skip' to skip such steps)")
        self.skipped_steps += 1
        logger.warning("%s: step skipped", message)
        return None

    def _record(self, logs: dict) -> None:
        self.history.append(logs)
        if self.output_dir and self.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "history.jsonl"), "a") as f:
                f.write(json.dumps(logs) + "\n")
            self._csv_append(logs)
            if self._tb is not None:
                step = int(logs.get("step", self.step))
                for key, value in logs.items():
                    if key not in ("step", "epoch", "epoch_end") and isinstance(value, (int, float)):
                        self._tb.add_scalar(key, float(value), step)

    def _csv_append(self, logs: dict) -> None:
        """One row of ``history.csv`` (a column per key ever seen; a record with a new key rewrites the file with
        the wider header, which happens once or twice a run)."""
        path = os.path.join(self.output_dir, "history.csv")
        if self._csv_columns is None or not os.path.exists(path):
            self._csv_columns = None
        if self._csv_columns is not None and all(k in self._csv_columns for k in logs):
            buf = io.StringIO()
            csv.DictWriter(buf, self._csv_columns, lineterminator="\n").writerow(logs)
            with open(path, "a", newline="") as f:
                f.write(buf.getvalue())
        else:
            self._write_csv(path)

    def _write_csv(self, path: str) -> None:
        columns: List[str] = []
        for record in self.history:
            columns += [k for k in record if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_bytes(path, [buf.getvalue().encode()])
        self._csv_columns = columns

    def _evaluate_and_record(self, val, batch_size, bar) -> dict:
        results = {f"val_{k}": v for k, v in self.evaluate(val, batch_size=batch_size).items()}
        logs = {"step": self.step, "epoch": self.epoch, **results}
        self._record(logs)
        bar.write("eval  step {}  ".format(self.step) + "  ".join(f"{k} {v:.4f}" for k, v in results.items()))
        for cb in self.callbacks:
            cb.on_evaluate(self, logs)
        return results

    # -- evaluation -----------------------------------------------------------------------------------------------
    def evaluate(self, data, batch_size: int = 64) -> Dict[str, float]:
        """Mean loss over all counted targets and the requested metrics, in eval mode (no dropout)."""
        was_training = getattr(self.model, "training", False)
        self.model.eval()
        ignore = getattr(self.loss, "ignore_index", IGNORE_INDEX)
        total, count = 0.0, 0
        preds, golds = [], []
        wants_preds = any(m in self.metrics for m in ("accuracy", "precision", "recall", "f1"))
        samples = np.arange(len(data))
        if self.dist:  # each rank evaluates its contiguous share; the totals are summed below
            samples = self.dist.shard(samples)
        try:
            for pos in batch_indices(len(samples), batch_size):
                inputs, targets = data[samples[pos]]
                outputs = self.model(*inputs)
                targets = np.asarray(targets)
                if wants_preds:
                    keep = targets != ignore
                    preds.append(np.asarray(outputs).argmax(-1)[keep])
                    golds.append(targets[keep])
                loss, _, n = self.loss(outputs, targets, need_grad=False)
                total += loss * n
                count += n
        finally:
            self.model.train(was_training)
        p = np.concatenate(preds).astype(np.int64) if preds else np.zeros(0, np.int64)
        g = np.concatenate(golds).astype(np.int64) if golds else np.zeros(0, np.int64)
        if self.dist:
            total, count = self.dist.allreduce([total, count])
            if wants_preds:
                p, g = self.dist.gather_arrays(p), self.dist.gather_arrays(g)
        results = {"loss": total / max(1, count)}
        if wants_preds and len(g):
            if "accuracy" in self.metrics:
                results["accuracy"] = accuracy(p, g)
            prf = precision_recall_f1(p, g)
            results.update({k: v for k, v in prf.items() if k in self.metrics})
        if "perplexity" in self.metrics:
            results["perplexity"] = perplexity(results["loss"])
        return results

    def predict(self, data, batch_size: int = 64) -> np.ndarray:
        """Model outputs for every sample of ``data`` (a dataset), in order, in eval mode."""
        was_training = getattr(self.model, "training", False)
        self.model.eval()
        try:
            outs = [np.asarray(self.model(*data[idx][0])) for idx in batch_indices(len(data), batch_size)]
        finally:
            self.model.train(was_training)
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def save_checkpoint(self, path: Optional[str] = None) -> str:
        """Write ``checkpoint-{step}`` (or ``path``) atomically: the files and, last, ``checkpoint_complete.json`` go
        to a temporary folder renamed into place when complete. A checkpoint already at ``path`` is renamed aside
        and deleted only once the new one is in place; then the oldest checkpoints beyond ``save_total_limit`` go."""
        if path is None:
            if not self.output_dir:
                raise ValueError("save_checkpoint: no output_dir and no path")
            path = os.path.join(self.output_dir, f"checkpoint-{self.step}")
        generators = self.dist.gather_states(init.get_state()) if self.dist else [init.get_state()]
        if not self.is_main:  # rank 0 writes; the others wait until the checkpoint is complete
            self.dist.barrier()
            return path
        path = path.rstrip(os.sep) or path
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        while True:
            tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.mkdir(tmp)  # ordinary folder permissions (0o777 less the umask), unlike mkdtemp's 0o700
                break
            except FileExistsError:
                continue
        try:
            config = getattr(self.model, "config", None)
            meta = {"format": "cpuformer-checkpoint", "version": "1"}
            if config is not None:
                meta["config"] = json.dumps(config)
                meta["model_class"] = type(self.model).__name__
            # what the model says a checkpoint needs (a pretrained model: only what training changes), else its
            # parameters
            weights = self.model.checkpoint_state_dict() if hasattr(self.model, "checkpoint_state_dict") else \
                {n: p.data for n, p in self.model.named_parameters()}
            save_safetensors(os.path.join(tmp, "model.safetensors"), weights, meta)
            save_safetensors(os.path.join(tmp, "optimizer.safetensors"), self.optimizer.state_arrays(),
                             {"step_count": str(self.optimizer.step_count), "class": type(self.optimizer).__name__})
            state = {"format": "cpuformer-trainer-state", "version": 1, "step": self.step, "epoch": self.epoch,
                     "batch_in_epoch": self.batch_in_epoch, "seed": self.seed, "skipped_steps": self.skipped_steps,
                     "init_generator": init.get_state(), "init_generator_ranks": generators,
                     "elapsed_seconds": self.elapsed(),
                     "history": list(self.history),
                     "callbacks": [cb.state() if hasattr(cb, "state") else None for cb in self.callbacks],
                     "schedule": repr(self.schedule)}
            atomic_write_bytes(os.path.join(tmp, "trainer_state.json"), [json.dumps(state).encode()])
            sizes = {name: os.path.getsize(os.path.join(tmp, name)) for name in _CKPT_FILES}
            atomic_write_bytes(os.path.join(tmp, _MARKER),  # last: the checkpoint is complete from here on
                               [json.dumps({"format": "cpuformer-checkpoint-complete", "step": self.step,
                                            "files": sizes}).encode()])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        aside = None
        if os.path.lexists(path):  # never delete the old one before the new one is in place
            aside = f"{path}.tmp-del-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(path, aside)
        try:
            os.rename(tmp, path)  # the checkpoint appears complete or not at all
        except FileNotFoundError:
            if _checkpoint_problem(path) is not None:  # (unless a tidying Trainer just put it in place for us)
                raise
        _fsync_dir(parent)
        if aside:
            _remove(aside)
        if self.output_dir and self.save_total_limit and parent == os.path.abspath(self.output_dir):
            self._rotate(path)
        if self.dist:
            self.dist.barrier()
        return path

    def _rotate(self, saved: str) -> None:
        """Keep the checkpoint just saved and the newest ``save_total_limit - 1`` other complete ones; delete the
        rest oldest first, with incomplete ones older than the one just saved."""
        saved_name = os.path.basename(saved)
        m = _CKPT_RE.match(saved_name)
        saved_step = int(m.group(1)) if m else None
        complete, incomplete = [], []
        for name in os.listdir(self.output_dir):
            m = _CKPT_RE.match(name)
            if not m or name == saved_name:
                continue
            ok = _checkpoint_problem(os.path.join(self.output_dir, name)) is None
            (complete if ok else incomplete).append((int(m.group(1)), name))
        complete.sort(reverse=True)
        doomed = complete[max(0, self.save_total_limit - 1):]
        if saved_step is not None:
            doomed += [(step, name) for step, name in incomplete if step < saved_step]
        for _, name in sorted(doomed):
            _remove(os.path.join(self.output_dir, name))

    def load_checkpoint(self, path: str) -> None:
        """Restore everything :meth:`save_checkpoint` wrote, to continue exactly where it left off. A missing folder
        raises FileNotFoundError; an incomplete or damaged checkpoint a ValueError naming the folder, before anything
        is changed."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such checkpoint folder")
        problem = _checkpoint_problem(path)
        if problem is not None:
            raise ValueError(f"{path} is not a complete checkpoint: {problem}")
        state_path = os.path.join(path, "trainer_state.json")
        try:
            with open(state_path, "rb") as f:
                state = json.loads(f.read().decode("utf-8"))
            if not isinstance(state, dict) or state.get("format") != "cpuformer-trainer-state":
                raise ValueError("not a cpuformer trainer state")
            step, epoch, batch_in_epoch, seed = (int(state["step"]), int(state["epoch"]),
                                                 int(state["batch_in_epoch"]), int(state["seed"]))
            history = state["history"]
            ranks = state.get("init_generator_ranks") or [state["init_generator"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is a damaged checkpoint: trainer_state.json: {exc}") from None
        try:
            weights, _ = load_safetensors(os.path.join(path, "model.safetensors"))
            arrays, meta = load_safetensors(os.path.join(path, "optimizer.safetensors"))
        except OSError as exc:  # (removed while we read it)
            raise ValueError(f"{path} is not a complete checkpoint: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"{path} is a damaged checkpoint: {exc}") from None
        self.model.load_state_dict(weights)
        self.optimizer.load_state_arrays(arrays, int(meta.get("step_count", step)))
        self.step, self.epoch, self.batch_in_epoch = step, epoch, batch_in_epoch
        self.seed, self.skipped_steps = seed, state.get("skipped_steps", 0)
        rank = self.dist.rank if self.dist else 0
        if rank < len(ranks):
            init.set_state(ranks[rank])
        else:  # resumed with more ranks than saved: a fresh, distinct dropout stream for the new ranks
            init.set_state(np.random.default_rng([self.seed, rank, self.step]).bit_generator.state)
        self.history = History(history)
        for cb, cb_state in zip(self.callbacks, state.get("callbacks", [])):
            if cb_state is not None and hasattr(cb, "load_state"):
                cb.load_state(cb_state)
        self.elapsed_before = float(state.get("elapsed_seconds", 0.0) or 0.0)
        if self._fit_start is not None:
            self._fit_start = time.perf_counter()
        if self.output_dir and self.is_main:  # the history files restart from the checkpoint's records
            atomic_write_bytes(os.path.join(self.output_dir, "history.jsonl"),
                               [(json.dumps(r) + "\n").encode() for r in self.history])
            self._write_csv(os.path.join(self.output_dir, "history.csv"))
