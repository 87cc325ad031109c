"""``python -m cpuformer finetune MODEL_DIR --task classify|lm|translate|embed --train FILE ...``: fine-tune a
Hugging Face model directory on CPU (no PyTorch), fully or with LoRA (``--lora R``), then save the fine-tuned model
(LoRA merged) with its tokenizer and config in the output folder, loadable by ``from_pretrained``, the C++ runtime
and transformers.

Tasks and files (UTF-8):
  classify   --train / --val: text<TAB>label lines (labels 0, 1, ... or names), as the classify job; an encoder
             checkpoint without a classification head gets a new one
  lm         --train / --val: a text file; causal-LM loss on windows of --max-len tokens
  translate  --train-src / --train-tgt (and --val-src / --val-tgt): line-aligned parallel files; seq2seq loss
  embed      --train / --val: anchor<TAB>positive lines; MultipleNegativesRankingLoss (in-batch negatives) on a
             sentence encoder (mean pooling)

The run's length, schedule, checkpoints (exact resume with --resume), progress and Ctrl-C are the other training
jobs' (:mod:`cpuformer.cli`). Checkpoints hold only what training changes (the adapters and head with --lora).
"""
from __future__ import annotations

import json
import os
from typing import List

import numpy as np

from . import cli
from .cli import UsageError, _common, _count, _number
from .models import SentenceEncoder, from_pretrained
from .nn import lora as lora_mod
from .train import AdamW, EarlyStopping, Trainer, shift_tokens_right, task_loss
from .io import atomic_write_bytes

__all__ = ["add_parser", "cmd_finetune"]

_TASKS = ("classify", "lm", "translate", "embed")


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", formatter_class=cli._Formatter,
                       help="fine-tune a Hugging Face model directory (classify, lm, translate, embed; full or LoRA)",
                       description=cli._describe(__doc__.split("\n\n", 1)[0].replace("``", ""),
                                                 *__doc__.split("\n\n")[1:3]))
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model directory (config.json, "
                   "model.safetensors, tokenizer)")
    g = p.add_argument_group("task and input")
    g.add_argument("--task", choices=_TASKS, required=True, help="what to fine-tune for")
    g.add_argument("--train", help="training file (classify: text<TAB>label; lm: text; embed: anchor<TAB>positive)")
    g.add_argument("--val", help="validation file, same format")
    for split, what in (("train", "training"), ("val", "validation")):
        g.add_argument(f"--{split}-src", help=f"translate: {what} source sentences, one per line")
        g.add_argument(f"--{split}-tgt", help=f"translate: {what} target sentences, line-aligned")
    g.add_argument("--max-len", type=_count(2), default=128, help="tokens per text (longer ones are cut)")
    _common(p, lr=5e-5, batch=16, steps_help="default: train for --minutes",
            minutes_help=f"{cli.DEFAULT_MINUTES} when neither --steps nor --minutes is given")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--lora", type=_count(), default=None, metavar="R",
                   help="train LoRA adapters of rank R (and a new head) instead of every weight")
    g.add_argument("--lora-alpha", type=_number(0), default=None, help="LoRA alpha (default: 2 R)")
    g.add_argument("--lora-targets", default=None,
                   help="comma-separated module names (PEFT's rule), or a regular expression if it contains any "
                        "of ^$*+?()[]|\\ (default: PEFT's for the model type)")
    g.add_argument("--recompute", action="store_true",
                   help="gradient checkpointing: recompute each block's activations in backward (less memory)")
    g.add_argument("--no-dropout", action="store_true", help="train without the config's dropout")
    g.add_argument("--patience", type=_count(), default=None,
                   help="classify/embed: stop after this many evaluations without improvement (keeps the best)")


# ------------------------------------------------------------------------------------------------- datasets

class _Batches:
    """Samples tokenized per batch: ``data[idx] -> (inputs, targets)`` for the Trainer."""

    def __init__(self, n: int, make) -> None:
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx):
        return self.make(np.asarray(idx, np.int64))


def _tok(tokenizer, texts: List[str], max_len: int, pairs=None):
    return tokenizer(list(texts), pairs, padding=True, truncation=True, max_length=max_len, return_tensors="np")


def _classify_data(model, rows, max_len):
    texts = [r[0] for r in rows]
    labels = np.array([r[1] for r in rows], np.int64)

    def make(idx):
        enc = _tok(model.tokenizer, [texts[i] for i in idx], max_len)
        return (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]), labels[idx]
    data = _Batches(len(rows), make)
    data.labels = labels
    return data


def _lm_data(model, text: str, max_len: int, option: str):
    ids = np.asarray(model.tokenizer.encode(text).ids, np.int64)
    n = len(ids) // max_len
    if n < 1:
        raise UsageError(f"{option}: {len(ids)} tokens, fewer than --max-len {max_len}")
    windows = ids[:n * max_len].reshape(n, max_len)
    return _Batches(n, lambda idx: ((windows[idx],), windows[idx]))


def _translate_data(model, src: List[str], tgt: List[str], max_len: int):
    core = model._core
    pad = core.pad_token_id if core.pad_token_id >= 0 else 0
    start = core.decoder_start_token_id if core.decoder_start_token_id >= 0 else pad

    def make(idx):
        enc = _tok(model.tokenizer, [src[i] for i in idx], max_len)
        lab = _tok(model.tokenizer, [tgt[i] for i in idx], max_len)
        labels = np.where(lab["attention_mask"] == 1, lab["input_ids"], -100)
        return (enc["input_ids"], enc["attention_mask"], shift_tokens_right(labels, pad, start)), labels
    return _Batches(len(src), make)


def _embed_data(encoder, pairs, max_len):
    def make(idx):
        texts = [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]
        enc = _tok(encoder.tokenizer, texts, max_len)
        return (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]), np.zeros(len(idx), np.int64)
    return _Batches(len(pairs), make)


def _pairs(path: str, option: str):
    text = cli._read_input(path, option)
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise UsageError(f"{option} {path}:{i}: expected anchor<TAB>positive")
        out.append((parts[0].strip(), parts[1].strip()))
    return out


def _lines(path: str, option: str) -> List[str]:
    return [line.strip() for line in cli._read_input(path, option).splitlines()]


# ------------------------------------------------------------------------------------------------- the job

def _load(args, num_labels=None):
    if not os.path.isdir(args.model_dir):
        raise UsageError(f"MODEL_DIR {args.model_dir}: not a directory")
    if args.task == "embed":
        return SentenceEncoder.from_pretrained(args.model_dir, trainable=True)
    task = None
    if args.task == "classify":
        with open(os.path.join(args.model_dir, "config.json"), encoding="utf-8") as f:
            arch = (json.load(f).get("architectures") or [""])[0]
        if arch.endswith("Model") or not arch:
            task = "text-classification"
        elif not arch.endswith("ForSequenceClassification"):
            raise UsageError(f"--task classify: {args.model_dir} is a {arch}, not an encoder")
    model = from_pretrained(args.model_dir, trainable=True, task=task, num_labels=num_labels if task else None,
                            init_seed=args.seed, verbose=cli._is_main())
    want = {"classify": "sequence-classification", "lm": "causal-lm", "translate": "seq2seq-lm"}[args.task]
    if model.head != want:
        raise UsageError(f"--task {args.task}: {args.model_dir} has a {model.head} head ({model.architecture}), "
                         f"not {want}")
    if model.tokenizer is None:
        raise UsageError(f"{args.model_dir}: no tokenizer (tokenizer.json or vocab files)")
    if args.task == "classify" and model._core.num_labels != num_labels:
        raise UsageError(f"{args.model_dir} has {model._core.num_labels} labels, the files {num_labels}")
    return model


def cmd_finetune(args) -> int:
    cli._budget(args)
    if args.task == "translate":
        if not (args.train_src and args.train_tgt):
            raise UsageError("--task translate needs --train-src and --train-tgt")
    elif not args.train:
        raise UsageError(f"--task {args.task} needs --train")
    cli._output_dir(args)
    cli._setup(args)
    label_names = None
    if args.task == "classify":
        paths = {k: (f"--{k}", p) for k, p in (("train", args.train), ("val", args.val)) if p}
        rows, label_names = cli._read_labelled(paths)
        model = _load(args, num_labels=len(label_names))
        data = {k: _classify_data(model, v, args.max_len) for k, v in rows.items()}
    elif args.task == "lm":
        model = _load(args)
        data = {"train": _lm_data(model, cli._read_input(args.train, "--train"), args.max_len, "--train")}
        if args.val:
            data["val"] = _lm_data(model, cli._read_input(args.val, "--val"), args.max_len, "--val")
    elif args.task == "translate":
        model = _load(args)
        data = {}
        for split in ("train", "val"):
            s, t = getattr(args, f"{split}_src"), getattr(args, f"{split}_tgt")
            if s and t:
                src, tgt = _lines(s, f"--{split}-src"), _lines(t, f"--{split}-tgt")
                if len(src) != len(tgt):
                    raise UsageError(f"--{split}-src has {len(src)} lines, --{split}-tgt {len(tgt)}")
                data[split] = _translate_data(model, src, tgt, args.max_len)
    else:
        model = _load(args)
        data = {k: _embed_data(model, _pairs(p, f"--{k}"), args.max_len)
                for k, p in (("train", args.train), ("val", args.val)) if p}
    core_model = model.model if isinstance(model, SentenceEncoder) else model
    if args.lora:
        targets = args.lora_targets
        if targets is not None and not any(c in targets for c in "^$*+?()[]|\\"):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        try:
            modules = lora_mod.add_lora(core_model, r=args.lora, alpha=args.lora_alpha or 2 * args.lora,
                                        target_modules=targets, seed=args.seed)
        except ValueError as exc:
            raise UsageError(f"--lora: {exc}") from None
        if not modules:
            raise UsageError(f"--lora-targets {args.lora_targets}: matches no Linear of the model")
    else:
        core_model.requires_grad_(True)
    core_model.gradient_checkpointing = bool(args.recompute)
    core_model.train_dropout = not args.no_dropout
    trainable = core_model.num_parameters(trainable_only=True)
    print(f"finetune {args.task}: {model.__class__.__name__} {core_model.architecture or core_model.model_type}, "
          f"{len(data['train']):,} training samples, {trainable:,} of {core_model.num_parameters():,} parameters "
          f"trained{f' (LoRA r={args.lora})' if args.lora else ''}", flush=True)
    metrics = ["accuracy"] if args.task == "classify" else []
    callbacks = []
    if args.patience and "val" in data:
        callbacks.append(EarlyStopping("val_loss", patience=args.patience, mode="min", restore_best=True))
    # after the adapters and requires_grad: it broadcasts and all-reduces the trainable parameters
    distributed = cli._data_parallel(model, args)
    box: list = []
    trainer = Trainer(model, task_loss(model), AdamW(model, lr=args.lr, weight_decay=0.01),
                      schedule=cli._schedule(args, box), max_grad_norm=1.0, metrics=metrics,
                      output_dir=args.output_dir, save_every=args.save_every, eval_every=args.eval_every,
                      seed=args.seed, callbacks=callbacks, quiet=args.quiet, log_every=None,
                      log_seconds=cli.PROGRESS_SECONDS, distributed=distributed)
    box.append(trainer)

    def save():
        core_model.save_pretrained(args.output_dir, **({"labels": label_names} if label_names else {}))
        if args.lora:
            lora_mod.save_lora(core_model, os.path.join(args.output_dir, "lora"))
        job = {"job": "finetune", "task": args.task, "base": os.path.abspath(args.model_dir), "step": trainer.step,
               "lora": args.lora, "lora_alpha": args.lora_alpha or (2 * args.lora if args.lora else None)}
        atomic_write_bytes(os.path.join(args.output_dir, "finetune.json"), [json.dumps(job, indent=2).encode()])

    cli._run(trainer, args, data["train"], data.get("val"), save)
    print(f"output: {args.output_dir}")
    return 0
