"""Command line: ``python -m cpuformer <command>`` (also the ``cpuformer`` console script).

Commands: ``info`` (the build and a kernel self-check), ``demo`` (a character-level language model on the Python
standard library's own source: no download, a fixed number of steps, about two minutes on 2 cores), ``lm``
(character-level language model on a text corpus), ``classify`` (sentence classification from TSV files),
``translate`` (sequence-to-sequence on line-aligned parallel files). Every training command takes ``--steps`` (a
fixed number of optimizer steps: the same result on any machine) or ``--minutes`` (a wall-clock budget),
``--output-dir`` (default ``runs/<job>-<date>-<time>``: the final model with its tokenizer and ``job.json``,
checkpoints, history) and ``--resume``. Ctrl-C saves a checkpoint and the model, and exits with status 130. A
mistake in the arguments or the input files is one line on stderr and exit status 2.

Started by an MPI launcher with several ranks (``mpiexec -n 2 python -m mpi4py -m cpuformer lm ...``), the
training commands run data-parallel (:mod:`cpuformer.distributed`): ``--batch-size`` is per rank, only rank 0
prints and writes files.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import sysconfig
import time
from typing import List, Optional

import numpy as np

import cpuformer
from . import nn
from .data import (CharTokenizer, LanguageModelDataset, Seq2SeqDataset, SequenceClassificationDataset, WordTokenizer,
                   read_parallel, read_tsv)
from .models import GPT, Seq2SeqTransformer, TransformerClassifier
from .train import AdamW, CrossEntropyLoss, EarlyStopping, Trainer, bleu, classification_metrics
from .train.job import SubwordTokenizer, save_job, save_tokenizer
from .train.optim import Schedule

__all__ = ["main", "build_parser"]

# optimizer steps of `python -m cpuformer demo`: about two minutes on 2 cores of the development machine
DEMO_STEPS = 1500
DEFAULT_MINUTES = 15
PROGRESS_SECONDS = 5.0  # a progress line at least this often


class UsageError(Exception):
    """A mistake in the command line or the input files: one line on stderr, exit status 2."""


class _Interrupted(Exception):
    """Ctrl-C during training, after the checkpoint and the model were saved: the message, exit status 130."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every option's help (unless the help says it); descriptions keep their paragraphs."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or action.nargs == 0 and not action.option_strings:
            return text
        if action.default is None:
            return text + " (default: none)"
        return super()._get_help_string(action)


def _describe(*paragraphs: str) -> str:
    """Paragraphs filled to 100 columns, for a command's --help."""
    import textwrap
    return "\n\n".join(textwrap.fill(" ".join(p.split()), 100) for p in paragraphs)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(minimum: int = 1):
    """An argparse type: a whole number >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "count"
    return parse


def _number(low: float, high: float = math.inf, low_open: bool = True, high_open: bool = True):
    """An argparse type: a finite number in the interval."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and \
            (value < high if high_open else value <= high)
        if not ok:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def _read_input(path: str, option: str) -> str:
    """The text of an input file, or a one-line UsageError: missing, a folder, unreadable, empty, not UTF-8 (with
    the line number)."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory, not a file")
    if not os.path.exists(path):
        raise UsageError(f"{option} {path}: no such file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot read it ({exc.strerror})") from None
    if not data.strip():
        raise UsageError(f"{option} {path}: the file is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UsageError(f"{option} {path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column "
                         f"{column}); convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _common(p: argparse.ArgumentParser, lr: float, batch: int, steps_help: str, minutes_help: str) -> None:
    g = p.add_argument_group("training length and schedule")
    g.add_argument("--steps", "--max-steps", dest="steps", type=_count(), default=None,
                   help=f"train for this many optimizer steps: the result does not depend on the machine's speed "
                        f"({steps_help})")
    g.add_argument("--minutes", type=_number(0), default=None,
                   help=f"wall-clock training budget instead ({minutes_help}); with --steps too, whichever ends "
                        "first")
    g.add_argument("--epochs", type=_count(), default=1000,
                   help="upper bound on passes over the training data (steps or minutes usually end first)")
    g.add_argument("--batch-size", type=_count(), default=batch, help="sentences or text windows per step (per rank)")
    g.add_argument("--lr", type=_number(0), default=lr, help="peak learning rate (AdamW, cosine decay to lr/20)")
    g.add_argument("--warmup", type=_count(0), default=200,
                   help="linear warm-up steps, at most 5%% of the run's steps")
    g.add_argument("--eval-every", type=_count(), default=500, help="evaluate on the validation set every N steps "
                   "(and at each epoch's end)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial weights, data order and dropout")
    g.add_argument("--threads", type=_count(), default=None, help="compute threads (default: all cores)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default=None,
                   help="the run's folder: final model.safetensors, tokenizer, job.json, checkpoint-N/, "
                        "history.jsonl, history.csv (default: runs/<job>-<YYYYmmdd-HHMMSS>)")
    g.add_argument("--save-every", type=_count(), default=None,
                   help="also save a checkpoint every N steps (one is always saved at the end and on Ctrl-C)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --output-dir (default: the newest runs/<job>-*)")
    g.add_argument("--quiet", action="store_true", help="no progress lines")


_DIST = {"on": False}  # set by main() when launched by MPI with several ranks


def _is_main() -> bool:
    if not _DIST["on"]:
        return True
    from mpi4py import MPI
    return MPI.COMM_WORLD.Get_rank() == 0


def _bcast(value):
    if not _DIST["on"]:
        return value
    from mpi4py import MPI
    return MPI.COMM_WORLD.bcast(value, root=0)


def _setup(args) -> None:
    if args.threads:
        cpuformer.set_num_threads(args.threads)
    nn.init.manual_seed(args.seed)


def _output_dir(args) -> str:
    """Resolve --output-dir: given, the newest earlier run of this job (--resume), or a new dated folder."""
    job = args.command
    if args.output_dir:
        if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
            raise UsageError(f"--output-dir {args.output_dir}: is a file, not a folder")
        if args.resume and not os.path.isdir(args.output_dir):
            raise UsageError(f"--resume: {args.output_dir} does not exist (no run to continue)")
        return args.output_dir
    if args.resume:
        runs = sorted(d for d in glob.glob(os.path.join("runs", f"{job}-*")) if os.path.isdir(d))
        if not runs:
            raise UsageError(f"--resume: no earlier run under runs/{job}-*; pass --output-dir")
        args.output_dir = runs[-1]
        return args.output_dir
    base = os.path.join("runs", f"{job}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    args.output_dir = _bcast(path)
    return args.output_dir


def _budget(args, default_steps: Optional[int] = None) -> None:
    """--steps / --minutes: the job's default when neither is given."""
    if args.steps is None and args.minutes is None:
        if default_steps:
            args.steps = default_steps
        else:
            args.minutes = DEFAULT_MINUTES


def _schedule(args, box: list) -> Schedule:
    """Linear warm-up over min(--warmup, 5% of the run's steps), then cosine decay to lr/20. With --steps the
    schedule is a function of the step (exact resume); with --minutes the cosine follows the elapsed fraction of
    the budget and the run's length in steps is estimated from the pace so far."""
    lr, min_lr = args.lr, args.lr / 20

    def fn(step: int) -> float:
        trainer = box[0]
        total, _ = trainer.estimated_total_steps()
        warm = min(args.warmup, max(1, (total or 0) // 20))
        if step < warm:
            return lr * (step + 1) / warm
        if trainer.max_time is None:
            frac = (step - warm) / max(1, (total or step) - warm)
        else:
            frac = trainer.progress_fraction(step)
        frac = min(1.0, max(0.0, frac))
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))

    how = "the step" if args.minutes is None else "the elapsed time"
    sched = Schedule(fn, f"warmup_cosine(lr={lr}, warmup=min({args.warmup}, 5% of the steps), min_lr={min_lr}, "
                         f"by {how})")
    sched.uses_time = args.minutes is not None
    return sched


def _data_parallel(model, args):
    """The job's DataParallel when MPI started several ranks (else None); build the model completely first."""
    if not _DIST["on"]:
        return None
    from .distributed import DataParallel
    dp = DataParallel(model, threads=args.threads, seed=args.seed)
    threads = dp.comm.gather(cpuformer.get_num_threads(), root=0)  # (as DataParallel set them)
    if dp.is_main:
        print(f"data-parallel: {dp.size} ranks, threads per rank {threads}", flush=True)
    return dp


def _trainer(model, args, metrics, callbacks=()) -> Trainer:
    distributed = _data_parallel(model, args)
    box: list = []
    trainer = Trainer(model, CrossEntropyLoss(label_smoothing=getattr(args, "label_smoothing", 0.0)),
                      AdamW(model, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01),
                      schedule=_schedule(args, box), max_grad_norm=1.0, metrics=metrics,
                      output_dir=args.output_dir, save_every=args.save_every, eval_every=args.eval_every,
                      seed=args.seed, callbacks=list(callbacks), quiet=args.quiet, log_every=None,
                      log_seconds=PROGRESS_SECONDS, distributed=distributed)
    box.append(trainer)
    return trainer


def _fit(trainer: Trainer, args, train, val, **kw) -> None:
    """trainer.fit with the job's length; Ctrl-C leaves the checkpoint (saved by fit) and raises _Interrupted
    once the caller's ``save`` has written the model."""
    how = f"{args.steps:,} steps" if args.steps else ""
    if args.minutes:
        how += (" or " if how else "") + f"{args.minutes:g} minutes"
    if _is_main():
        print(f"training for {how}; output in {args.output_dir}", flush=True)
    trainer.fit(train, val, epochs=args.epochs, max_steps=args.steps, batch_size=args.batch_size,
                max_time=args.minutes * 60 if args.minutes else None,
                resume_from="latest" if args.resume else None, **kw)


def _run(trainer: Trainer, args, train, val, save, **kw) -> None:
    """Train, then ``save()`` the model (also on Ctrl-C, after early stopping restored the best weights)."""
    try:
        _fit(trainer, args, train, val, **kw)
    except KeyboardInterrupt:
        if not trainer.interrupted:
            raise
        if _is_main():
            save()
        raise _Interrupted(f"interrupted at step {trainer.step}: checkpoint-{trainer.step} and the model saved in "
                           f"{args.output_dir} (continue with --resume --output-dir {args.output_dir})") from None
    if _is_main():
        save()
        print(f"saved the model and its tokenizer in {args.output_dir}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# language model

def _prompt_ids(tok, prompt: str, subword: bool) -> List[int]:
    """The prompt's ids; characters the vocabulary lacks are dropped with a note on stderr."""
    if subword:
        return tok.encode(prompt) or [tok.unk_id]
    unknown = sorted({c for c in prompt if c not in tok.stoi})
    if unknown and _is_main() and prompt != "\n":  # (the default prompt: no note)
        print(f"cpuformer: note: dropped {len(unknown)} prompt character(s) not in the training text: "
              f"{''.join(unknown)!r}", file=sys.stderr, flush=True)
    ids = [tok.stoi[c] for c in prompt if c in tok.stoi]
    return ids or [tok.stoi.get("\n", len(tok.itos) - 1)]


def _train_lm(args, train_text: str, val_text: str, prompt: str) -> dict:
    _setup(args)
    subword = getattr(args, "tokenizer", "char") == "bpe"
    if subword:  # cased byte-level BPE trained on the training text; losses also reported per character
        tok = SubwordTokenizer.train(train_text.splitlines(keepends=True), args.vocab_size, 2)
    else:
        tok = CharTokenizer.from_corpus([train_text])
    prompt_ids = _prompt_ids(tok, prompt, subword)
    train_ids, val_ids = tok.encode(train_text), tok.encode(val_text)
    for name, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) < 2:
            raise UsageError(f"the {name} text is too short ({len(ids)} tokens)")
    train = LanguageModelDataset(train_ids, args.block_size)
    val = LanguageModelDataset(val_ids, args.block_size)
    arch = getattr(args, "arch", "gpt")
    llama = dict(norm="rms_norm", positional="rotary", activation="silu", gated=True, bias=False,
                 tie_weights=False, n_kv_head=max(1, args.heads // 4), d_ff=_swiglu_width(args.embd),
                 layer_norm_eps=1e-6) if arch == "llama" else {}
    if args.embd % args.heads:
        raise UsageError(f"--embd {args.embd} must be a multiple of --heads {args.heads}")
    model = GPT(tok.vocab_size, args.block_size, args.layers, args.heads, args.embd, dropout=args.dropout, **llama)
    unit = "token" if subword else "char"
    print(f"{'subword (byte-level BPE)' if subword else 'character'} LM: {tok.vocab_size} symbols, "
          f"{len(train_ids):,} training {unit}s, {'Llama-style ' if llama else ''}GPT {args.layers}x{args.embd} "
          f"({model.num_parameters():,} "
          f"parameters), {cpuformer.get_num_threads()} threads")
    trainer = _trainer(model, args, ["perplexity"])
    files = {}
    if _is_main():  # the tokenizer first: a run stopped early still leaves a usable folder
        files["tokenizer"] = save_tokenizer(args.output_dir, tok, "tokenizer.json")
    start = time.time()

    def save():
        save_job(args.output_dir, args.command, model, trainer.step, block_size=args.block_size, **files)

    _run(trainer, args, train, val, save)
    result = trainer.evaluate(val, batch_size=args.batch_size)
    per_char = ""
    if subword:  # the same total loss spread over the characters, comparable with a character model
        per_char = f"; {result['loss'] * len(val_ids) / max(len(val_text), 1):.4f} nats/char"
    print(f"\ntrained {trainer.step} steps in {(time.time() - start) / 60:.1f} min; validation loss "
          f"{result['loss']:.4f} nats/{unit} (perplexity {result['perplexity']:.2f}){per_char}")
    for i, temperature in enumerate((0.8, 1.0)):
        ids = model.generate(np.array([prompt_ids]), args.sample_chars, do_sample=True, temperature=temperature,
                             top_k=40, seed=args.seed + i)
        print(f"\n--- sample (temperature {temperature}) ---\n{tok.decode(ids[0])}")
    if _is_main():
        print(f"\noutput: {args.output_dir}", flush=True)
    return result


def _swiglu_width(d_model: int) -> int:
    """Llama's feed-forward width for d_model: 2/3 of 4 d (the gated form's three matrices cost what two of 4 d
    would), rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


def _lm_arguments(p, block, layers, heads, embd, dropout, steps_help, minutes_help):
    _common(p, lr=2e-3, batch=32, steps_help=steps_help, minutes_help=minutes_help)
    g = p.add_argument_group("model")
    g.add_argument("--block-size", type=_count(), default=block, help="context length in tokens")
    g.add_argument("--layers", type=_count(), default=layers, help="Transformer blocks")
    g.add_argument("--heads", type=_count(), default=heads, help="attention heads (must divide --embd)")
    g.add_argument("--embd", type=_count(), default=embd, help="model width")
    g.add_argument("--dropout", type=_number(0, 1, low_open=False), default=dropout, help="dropout rate")
    g.add_argument("--tokenizer", choices=["char", "bpe"], default="char",
                   help="characters, or cased byte-level BPE subwords trained on the training text")
    g.add_argument("--vocab-size", type=_count(8), default=4000, help="BPE vocabulary size (with --tokenizer bpe)")
    g.add_argument("--arch", choices=["gpt", "llama"], default="gpt",
                   help="gpt: GPT-2 blocks (LayerNorm, learned positions, GELU); llama: RMSNorm, rotary positions, "
                        "SwiGLU, grouped-query attention (heads/4 key-value heads), no biases, untied head")
    p.add_argument("--sample-chars", type=_count(0), default=300,
                   help="length of the two samples printed at the end, in tokens")


def cmd_lm(args) -> int:
    train_text = _read_input(args.train, "--train")
    if args.val:
        val_text = _read_input(args.val, "--val")
    else:  # the last 10% of the training text
        cut = int(len(train_text) * 0.9)
        train_text, val_text = train_text[:cut], train_text[cut:]
        print(f"validation: the last 10% of --train ({len(val_text):,} characters), as --val was not given")
    _budget(args)
    _output_dir(args)
    _train_lm(args, train_text, val_text, args.prompt)
    return 0


def cmd_demo(args) -> int:
    """A language model on Python's own standard library source (every installation carries it)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    text = ""
    for f in files[: args.files]:
        if os.path.getsize(f) < 200_000:
            with open(f, encoding="utf-8", errors="replace") as fh:
                text += fh.read()
    if not text:
        raise UsageError(f"no Python source found in {sysconfig.get_paths()['stdlib']}")
    cut = int(len(text) * 0.95)
    print(f"demo: {len(files[: args.files])} standard-library modules from {sysconfig.get_paths()['stdlib']}")
    _budget(args, DEMO_STEPS)
    _output_dir(args)
    _train_lm(args, text[:cut], text[cut:], "def ")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# classification

_LABEL_HEADERS = {"label", "labels", "class", "category", "target", "sentiment"}


def _read_labelled(paths: dict) -> tuple:
    """{split: rows (text, label id)} and the label names. Labels are integers 0..K-1, or names (any text: sorted,
    then numbered; a first line whose label is "label" is a header)."""
    for option, path in paths.values():
        _read_input(path, option)  # folder, empty, not UTF-8: one clear line
    try:
        rows = {k: read_tsv(path, columns=2, label_column=1) for k, (option, path) in paths.items()}
        if any(min(r[1] for r in v) < 0 for v in rows.values() if v):
            raise UsageError("labels must be 0, 1, 2, ... (or names)")
        n = max(max((r[1] for r in v), default=0) for v in rows.values()) + 1
        return rows, [str(i) for i in range(n)]
    except ValueError as exc:
        if "is not an integer" not in str(exc):
            raise
    rows = {}
    for k, (option, path) in paths.items():
        v = read_tsv(path, columns=2, header=False)
        if v and v[0][1].strip().lower() in _LABEL_HEADERS:
            v = v[1:]
        rows[k] = [(text, label.strip()) for text, label in v]
    names = sorted({label for _, label in rows["train"]})
    index = {name: i for i, name in enumerate(names)}
    for k, v in rows.items():
        unseen = sorted({label for _, label in v if label not in index})
        if unseen:
            raise UsageError(f"{paths[k][0]} {paths[k][1]}: label(s) {', '.join(map(repr, unseen[:5]))} do not "
                             "occur in --train")
        rows[k] = [(text, index[label]) for text, label in v]
    return rows, names


def cmd_classify(args) -> int:
    if args.model is not None:
        return _inference(args)
    if not args.train:
        raise UsageError("--train is required to train (or give a MODEL folder and texts to classify)")
    _budget(args)
    _output_dir(args)
    _setup(args)
    paths = {name: (f"--{name}", path) for name, path in (("train", args.train), ("val", args.val),
                                                          ("test", args.test)) if path}
    rows, label_names = _read_labelled(paths)
    if not rows["train"]:
        raise UsageError(f"--train {args.train}: no labelled lines")
    if args.labels:
        names = [n.strip() for n in args.labels.split(",")]
        if len(names) < len(label_names):
            raise UsageError(f"--labels names {len(names)} classes but the files have {len(label_names)}")
        label_names = names
    if "val" not in rows and len(rows["train"]) >= 2:  # hold out a seeded random share, so early stopping runs
        order = np.random.default_rng(args.seed).permutation(len(rows["train"]))
        n_val = max(1, int(round(len(order) * args.val_fraction)))
        rows["val"] = [rows["train"][i] for i in sorted(order[:n_val])]
        rows["train"] = [rows["train"][i] for i in sorted(order[n_val:])]
        print(f"validation: {n_val:,} sentences ({args.val_fraction:.0%}) of --train held out, as --val was not given")
    tok = WordTokenizer.from_corpus([r[0] for r in rows["train"]], min_freq=args.min_freq, max_size=args.vocab_size)
    data = {k: SequenceClassificationDataset([tok.encode(r[0]) or [tok.unk_id] for r in v], [r[1] for r in v],
                                             pad_id=tok.pad_id, max_len=args.max_len) for k, v in rows.items()}
    num_classes = len(label_names)
    if args.d_model % args.heads:
        raise UsageError(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    model = TransformerClassifier(tok.vocab_size, num_classes, args.d_model, args.heads, args.layers, args.d_ff,
                                  args.dropout, max_len=args.max_len, pooling=args.pooling, pad_id=tok.pad_id)
    print(f"classification: {len(data['train']):,} training sentences, vocabulary {tok.vocab_size:,}, "
          f"{num_classes} classes ({', '.join(label_names[:10])}{', ...' if num_classes > 10 else ''}), model "
          f"{model.num_parameters():,} parameters")
    # a small model's validation accuracy peaks and then drifts as it overfits: keep the best weights
    best = EarlyStopping("val_accuracy", patience=args.patience, mode="max", restore_best=True) \
        if "val" in data else None
    trainer = _trainer(model, args, ["accuracy", "f1"], [best] if best else [])
    files = {}
    if _is_main():
        files["tokenizer"] = save_tokenizer(args.output_dir, tok, "tokenizer.json")

    def save():
        save_job(args.output_dir, "classify", model, trainer.step, labels=label_names, max_len=args.max_len,
                 **files)

    _run(trainer, args, data["train"], data.get("val"), save, bucket=True)
    if best is not None and best.best_step is not None:
        print(f"kept the weights of step {best.best_step} (best validation accuracy {best.best:.4f})")
    for split in ("val", "test"):
        if split in data:
            logits = trainer.predict(data[split], batch_size=256)
            m = classification_metrics(logits.argmax(-1), data[split].labels)
            print(f"{split}: accuracy {m['accuracy']:.4f}  macro F1 {m['f1']:.4f}  "
                  f"(precision {m['precision']:.4f}, recall {m['recall']:.4f})")
    print(f"output: {args.output_dir}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# translation

def cmd_translate(args) -> int:
    if args.model is not None:
        return _inference(args)
    if not (args.train_src and args.train_tgt):
        raise UsageError("--train-src and --train-tgt are required to train (or give a MODEL folder and texts to "
                         "translate)")
    for split in ("val", "test"):
        if bool(getattr(args, f"{split}_src")) != bool(getattr(args, f"{split}_tgt")):
            raise UsageError(f"--{split}-src and --{split}-tgt go together")
    _budget(args)
    _output_dir(args)
    _setup(args)
    pairs = {}
    for name, src, tgt in (("train", args.train_src, args.train_tgt), ("val", args.val_src, args.val_tgt),
                           ("test", args.test_src, args.test_tgt)):
        if src:
            _read_input(src, f"--{name}-src")
            _read_input(tgt, f"--{name}-tgt")
            pairs[name] = read_parallel(src, tgt)
    if args.tokenizer == "bpe":  # cased byte-level subwords, one vocabulary per language
        src_tok, tgt_tok = (SubwordTokenizer.train([p[side] for p in pairs["train"]], args.vocab_size, args.min_freq)
                            for side in (0, 1))
    else:  # lower-cased words
        src_tok = WordTokenizer.from_corpus([s for s, _ in pairs["train"]], min_freq=args.min_freq)
        tgt_tok = WordTokenizer.from_corpus([t for _, t in pairs["train"]], min_freq=args.min_freq)
    files = {}
    if _is_main():
        files = {f"{name}_tokenizer": save_tokenizer(args.output_dir, tok, f"{name}_tokenizer.json")
                 for name, tok in (("source", src_tok), ("target", tgt_tok))}
    data = {k: Seq2SeqDataset([src_tok.encode(s) for s, _ in v], [tgt_tok.encode(t) for _, t in v],
                              tgt_tok.pad_id, tgt_tok.bos_id, tgt_tok.eos_id, max_len=args.max_len)
            for k, v in pairs.items()}
    model = Seq2SeqTransformer(src_tok.vocab_size, tgt_tok.vocab_size, args.d_model, args.heads, args.layers,
                               args.layers, args.d_ff, args.dropout, max_len=args.max_len + 2, pad_id=tgt_tok.pad_id,
                               bos_id=tgt_tok.bos_id, eos_id=tgt_tok.eos_id)
    print(f"translation: {len(data['train']):,} sentence pairs, vocabularies {src_tok.vocab_size:,} / "
          f"{tgt_tok.vocab_size:,}, model {model.num_parameters():,} parameters")
    if args.d_model % args.heads:
        raise UsageError(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    trainer = _trainer(model, args, [])

    def save():
        save_job(args.output_dir, "translate", model, trainer.step, max_len=args.max_len, beam=args.beam, **files)

    _run(trainer, args, data["train"], data.get("val"), save, bucket=True)
    if "val" in data:
        print(f"validation loss {trainer.evaluate(data['val'], batch_size=128)['loss']:.4f}")
    test_pairs = pairs.get("test") or pairs.get("val")
    if test_pairs:
        hyps: List[str] = []
        src_ids = [src_tok.encode(s)[: args.max_len] or [src_tok.unk_id] for s, _ in test_pairs]
        order = np.argsort([len(s) for s in src_ids], kind="stable")
        out = [None] * len(src_ids)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            batch = np.full((len(idx), max(len(src_ids[j]) for j in idx)), src_tok.pad_id, np.int64)
            for r, j in enumerate(idx):
                batch[r, :len(src_ids[j])] = src_ids[j]
            for j, ids in zip(idx, model.translate(batch, max_len=args.max_len, beam_size=args.beam)):
                out[j] = tgt_tok.decode(ids)
        hyps = out
        if args.tokenizer == "bpe":
            score, how = bleu(hyps, [t for _, t in test_pairs]), "cased, detokenized, sacreBLEU 13a"
        else:
            score, how = bleu(hyps, [t.lower() for _, t in test_pairs]), "lower-cased words, 13a"
        print(f"test BLEU {score:.2f} ({len(hyps)} sentences, beam {args.beam}, {how})")
        for (s, t), h in list(zip(test_pairs, hyps))[:5]:
            print(f"  src: {s}\n  ref: {t}\n  out: {h}")
    print(f"output: {args.output_dir}")
    return 0


# ---------------------------------------------------------------------------------------------------------------

_OUTPUT = ("Output folder (--output-dir, default runs/<job>-<YYYYmmdd-HHMMSS>): model.safetensors (the final "
           "weights{best}), {tokenizer}, job.json (what the files are{labels}), checkpoint-N/ (for --resume), "
           "history.jsonl and history.csv.")
_LENGTH = ("Length: --steps N (the same result on any machine) or --minutes M (a wall-clock budget){length}. "
           "Progress lines show step/total, elapsed time and ETA. Ctrl-C saves a checkpoint and the model and exits "
           "with status 130; --resume continues.")


def _output_help(best: str = "", tokenizer: str = "tokenizer.json", labels: str = "",
                 length: str = f"; {DEFAULT_MINUTES} minutes when neither is given") -> tuple:
    return _OUTPUT.format(best=best, tokenizer=tokenizer, labels=labels), _LENGTH.format(length=length)


def _optional(name: str):
    """cpuformer.<name> when it is installed (the inference commands and the server land separately)."""
    import importlib
    try:
        return importlib.import_module(f"cpuformer.{name}")
    except ImportError:
        return None


def _inference_arguments(p, name: str, commands) -> None:
    """MODEL and TEXT positionals on a training command that shares its name with an inference command:
    ``cpuformer classify MODEL "text"`` runs inference, ``cpuformer classify --train f.tsv`` trains."""
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="a model folder (a training job's output, or a Hugging Face model): run inference "
                        "instead of training")
    p.add_argument("text", nargs="*", metavar="TEXT", help="texts for MODEL (default: one per line on stdin)")
    g = p.add_argument_group("inference (with MODEL)")
    if commands is not None and hasattr(commands, "add_inference_options"):
        commands.add_inference_options(g, name)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cpuformer", formatter_class=_Formatter, description=_describe(
        "cpuformer: a CPU-only Transformer library. Train a model with demo, lm, classify or translate (each "
        "command's --help describes its input files and options); info prints the build.",
        "A mistake in the arguments or the input files is one line on stderr and exit status 2."))
    parser.add_argument("--version", action="version", version=f"cpuformer {cpuformer.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="print the build and self-check the kernels", formatter_class=_Formatter,
                   description="Print the build (version, compiler, CPU features, threads) and self-check the "
                               "matrix-multiply kernel. No input.")
    commands = _optional("commands")

    p = sub.add_parser("demo", formatter_class=_Formatter,
                       help=f"train a small character LM on the Python standard library ({DEMO_STEPS} steps, about "
                            "2 min on 2 cores)",
                       description=_describe(
                           "Train a small character-level GPT on the Python standard library's own source (no "
                           "download), then print samples. A fixed number of steps, so the result is the same on "
                           "any machine.", *_output_help(tokenizer="tokenizer.json (the characters)",
                                                         length=f"; {DEMO_STEPS} steps when neither is given")))
    _lm_arguments(p, block=64, layers=2, heads=4, embd=128, dropout=0.0,
                  steps_help=f"{DEMO_STEPS} when neither --steps nor --minutes is given",
                  minutes_help="none by default: the demo runs a fixed number of steps")
    p.add_argument("--files", type=_count(), default=60, help="number of standard-library modules to read")
    p.set_defaults(eval_every=100, warmup=50, lr=3e-3, sample_chars=200, prompt="def ")

    p = sub.add_parser("lm", formatter_class=_Formatter, help="character-level (or BPE) language model on a text file",
                       description=_describe(
                           "Train a GPT language model on a UTF-8 text file (any text; characters, or BPE subwords "
                           "with --tokenizer bpe), then print two samples continuing --prompt.", *_output_help()))
    g = p.add_argument_group("input")
    g.add_argument("--train", required=True, help="training text: a UTF-8 text file")
    g.add_argument("--val", help="validation text, a UTF-8 text file (default: the last 10%% of --train)")
    g.add_argument("--prompt", default="\n", help="the samples continue this text (characters the training text "
                   "lacks are dropped)")
    _lm_arguments(p, block=128, layers=4, heads=6, embd=192, dropout=0.1,
                  steps_help="default: train for --minutes", minutes_help=f"{DEFAULT_MINUTES} when neither "
                  "--steps nor --minutes is given")

    p = sub.add_parser("classify", formatter_class=_Formatter,
                       help="sentence classification from text<TAB>label files (or, with MODEL, classify texts)",
                       description=_describe(
                           "Train a Transformer sentence classifier on tab-separated UTF-8 files: one sentence per "
                           "line, then a TAB, then its label: an integer 0, 1, 2, ... or a name (e.g. positive); a "
                           "first line 'sentence<TAB>label' is a header. Without --val a share of --train "
                           "(--val-fraction) is held out, so early stopping on validation accuracy runs and the "
                           "best weights are kept.",
                           "With MODEL (a model folder), classify the TEXTs instead: cpuformer classify MODEL "
                           "'a text' 'another'.",
                           *_output_help(best=": those of the best validation accuracy",
                                         tokenizer="tokenizer.json (the word vocabulary)",
                                         labels="; the label names")))
    _inference_arguments(p, "classify", commands)
    g = p.add_argument_group("input")
    g.add_argument("--train", help="training file: sentence<TAB>label per line (UTF-8)")
    g.add_argument("--val", help="validation file, same format (default: --val-fraction of --train)")
    g.add_argument("--test", help="test file, same format (scored at the end)")
    g.add_argument("--val-fraction", type=_number(0, 1), default=0.1,
                   help="share of --train held out for validation when --val is not given")
    g.add_argument("--labels", help="comma-separated names of the classes 0, 1, 2, ... (integer labels), saved with "
                   "the model (default: the labels as in the files)")
    _common(p, lr=5e-4, batch=64, steps_help="default: train for --minutes",
            minutes_help=f"{DEFAULT_MINUTES} when neither --steps nor --minutes is given")
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=_count(), default=128, help="model width")
    g.add_argument("--heads", type=_count(), default=4, help="attention heads (must divide --d-model)")
    g.add_argument("--layers", type=_count(), default=2, help="encoder layers")
    g.add_argument("--d-ff", type=_count(), default=256, help="feed-forward width")
    g.add_argument("--dropout", type=_number(0, 1, low_open=False), default=0.2, help="dropout rate")
    g.add_argument("--max-len", type=_count(), default=64, help="sentences are cut to this many words")
    g.add_argument("--min-freq", type=_count(), default=2, help="words seen fewer times in --train are unknown")
    g.add_argument("--vocab-size", type=_count(5), default=20000, help="largest word vocabulary")
    g.add_argument("--pooling", choices=["mean", "cls"], default="mean", help="sentence vector from the encoder")
    g.add_argument("--patience", type=_count(), default=6, help="evaluations without improvement before stopping")

    p = sub.add_parser("translate", formatter_class=_Formatter,
                       help="sequence-to-sequence on line-aligned parallel files (or, with MODEL, translate texts)",
                       description=_describe(
                           "Train an encoder-decoder Transformer on line-aligned parallel files: line i of "
                           "--train-src (UTF-8, one sentence per line) translates to line i of --train-tgt; both "
                           "files have the same number of lines. Test BLEU at the end.",
                           "With MODEL (a model folder), translate the TEXTs instead: cpuformer translate MODEL "
                           "'a sentence'.",
                           *_output_help(tokenizer="source_tokenizer.json and target_tokenizer.json")))
    _inference_arguments(p, "translate", commands)
    g = p.add_argument_group("input")
    for split, what in (("train", "training"), ("val", "validation"), ("test", "test")):
        g.add_argument(f"--{split}-src", help=f"{what} source sentences, one per line")
        g.add_argument(f"--{split}-tgt", help=f"{what} target sentences, line-aligned with --{split}-src")
    _common(p, lr=7e-4, batch=64, steps_help="default: train for --minutes",
            minutes_help=f"{DEFAULT_MINUTES} when neither --steps nor --minutes is given")
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=_count(), default=256, help="model width")
    g.add_argument("--heads", type=_count(), default=4, help="attention heads (must divide --d-model)")
    g.add_argument("--layers", type=_count(), default=3, help="encoder layers and decoder layers")
    g.add_argument("--d-ff", type=_count(), default=1024, help="feed-forward width")
    g.add_argument("--dropout", type=_number(0, 1, low_open=False), default=0.1, help="dropout rate")
    g.add_argument("--max-len", type=_count(), default=50, help="sentences are cut to this many tokens")
    g.add_argument("--min-freq", type=_count(), default=2, help="BPE merges / words seen fewer times are not kept")
    g.add_argument("--tokenizer", choices=["bpe", "word"], default="bpe",
                   help="cased byte-level BPE subwords or lower-cased words")
    g.add_argument("--vocab-size", type=_count(8), default=8000, help="BPE vocabulary size per language")
    g.add_argument("--beam", type=_count(), default=4, help="beam size for the test translations")
    g.add_argument("--label-smoothing", type=_number(0, 1, low_open=False), default=0.1,
                   help="label smoothing of the cross-entropy")

    from .finetune import add_parser as _finetune_parser  # (here: cpuformer.finetune imports this module)
    _finetune_parser(sub)

    if commands is not None:  # inference commands (cpuformer.commands)
        for name in ("embed", "generate", "qa"):
            commands.add_inference_parser(sub, name)
    serving = _optional("serving")
    if serving is not None:
        serving.add_parser(sub)
    return parser


def cmd_finetune(args) -> int:
    from .finetune import cmd_finetune as run
    return run(args)


_TRAINING = {"demo": cmd_demo, "lm": cmd_lm, "classify": cmd_classify, "translate": cmd_translate,
             "finetune": cmd_finetune}


def _inference(args) -> int:
    commands = _optional("commands")
    if commands is None:
        raise UsageError(f"running a model ({args.command} MODEL ...) needs cpuformer.commands, which this "
                         "installation lacks; to train, pass --train")
    return commands.run_inference(args)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _optional("commands")
    # An inference command goes to cpuformer.commands whole (its TEXT arguments may come after its options), and so
    # does `classify MODEL ...` / `translate MODEL ...`: a MODEL positional instead of --train means inference.
    if commands is not None and argv and (argv[0] in ("embed", "generate", "qa") or (
            argv[0] in ("classify", "translate") and len(argv) > 1 and not argv[1].startswith("-"))):
        if not any(a in ("-h", "--help") for a in argv[1:]) or argv[0] not in ("classify", "translate"):
            return commands.main_inference(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"cpuformer {args.command}" if args.command else "cpuformer"
    try:
        if args.command in (None, "info"):
            from .__main__ import info
            return info()
        if args.command == "serve":
            return _optional("serving").run(args)
        if args.command not in _TRAINING:
            return _inference(args)
        if getattr(args, "model", None) is None:
            _start_distributed()
        return _TRAINING[args.command](args)
    except _Interrupted as exc:
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except (UsageError, FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError,
            ValueError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return 2


def _start_distributed() -> None:
    """Data-parallel when an MPI launcher started several ranks; the other ranks' stdout goes nowhere."""
    try:
        from .distributed import launched_with_mpi
    except ImportError:
        if any(int(os.environ.get(v, "1") or 1) > 1 for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")):
            raise SystemExit('cpuformer: started by mpiexec, but mpi4py is not installed: pip install "cpuformer[mpi]"')
        return
    if launched_with_mpi():
        _DIST["on"] = True
        if not _is_main():
            sys.stdout = open(os.devnull, "w")


if __name__ == "__main__":
    raise SystemExit(main())
