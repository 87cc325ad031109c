"""``python -m cpuformer finetune MODEL_DIR --task classify|token-classify|qa|lm|translate|embed --train FILE``:
fine-tune a Hugging Face model directory on CPU (no PyTorch), fully or with LoRA (``--lora R``), then save the
fine-tuned model (LoRA merged) with its tokenizer and config in the output folder, loadable by ``from_pretrained``,
the pipelines, the C++ runtime and transformers.

Tasks and files (UTF-8):
  classify        --train / --val: text<TAB>label lines (labels 0, 1, ... or names), as the classify job; an
                  encoder checkpoint without a classification head gets a new one
  token-classify  --train / --val: JSON lines {"tokens": [words], "tags": [tag names]}, one tag per word; the labels
                  are the training file's tags (sorted); only each word's first sub-token is labelled (as
                  transformers' run_ner); an encoder without a token-classification head gets a new one
  qa              --train / --val: JSON lines in SQuAD form {"question", "context", "answers": {"text": [...],
                  "answer_start": [character offsets]}}; a context longer than --max-len is cut into windows
                  overlapping by --doc-stride tokens, and a window without the (first) answer, or an example without
                  answers, points at the CLS token (as transformers' run_qa); validation: exact match and F1
  lm              --train / --val: a text file; causal-LM loss on windows of --max-len tokens
  translate       --train-src / --train-tgt (and --val-src / --val-tgt): line-aligned parallel files; seq2seq loss
  embed           --train / --val: anchor<TAB>positive lines; MultipleNegativesRankingLoss (in-batch negatives) on a
                  sentence encoder (mean pooling)

The run's length, schedule, checkpoints (exact resume with --resume), progress and Ctrl-C are the other training
jobs' (:mod:`cpuformer.cli`). Checkpoints hold only what training changes (the adapters and head with --lora).
Started by mpiexec with several ranks (mpiexec -n 2 python -m mpi4py -m cpuformer finetune ...) it runs
data-parallel as the other jobs do: --batch-size is per rank, the trainable parameters' gradients are averaged,
rank 0 prints and writes; embed's in-batch negatives are each rank's own batch.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import string
from bisect import bisect_right
from collections import Counter
from typing import List

import numpy as np

from . import cli
from .cli import UsageError, _common, _count, _number
from .models import SentenceEncoder, from_pretrained
from .models.pretrained import _tokenizer_of
from .nn import lora as lora_mod
from .train import AdamW, EarlyStopping, Trainer, shift_tokens_right, task_loss
from .io import atomic_write_bytes
from .pipelines import _pad_rows, _TokInfo, pair_template

__all__ = ["add_parser", "cmd_finetune"]

_TASKS = ("classify", "token-classify", "qa", "lm", "translate", "embed")
# --task -> (the head it trains, from_pretrained's task for an encoder without it, transformers' class suffix)
_HEADS = {"classify": ("sequence-classification", "text-classification", "ForSequenceClassification"),
          "token-classify": ("token-classification", "token-classification", "ForTokenClassification"),
          "qa": ("question-answering", "question-answering", "ForQuestionAnswering"),
          "lm": ("causal-lm", None, None), "translate": ("seq2seq-lm", None, None)}


def _task_list(paragraph: str, width: int = 100) -> str:
    """The docstring's task list for --help: each task's text filled to ``width`` under a hanging indent."""
    import textwrap
    head, *lines = paragraph.splitlines()
    entries: List[List[str]] = []
    for line in lines:
        if line.startswith("  ") and not line.startswith("   "):  # a new task
            name, text = line.strip().split(None, 1)
            entries.append([name, text])
        else:
            entries[-1][1] += " " + line.strip()
    pad = 2 + max(len(name) for name, _ in entries) + 2
    return head + "\n" + "\n".join(textwrap.fill(text, width, initial_indent=f"  {name}".ljust(pad),
                                                 subsequent_indent=" " * pad, break_on_hyphens=False)
                                 for name, text in entries)


def add_parser(sub) -> None:
    intro, tasks, rest = __doc__.split("\n\n")[:3]
    p = sub.add_parser("finetune", formatter_class=cli._Formatter,
                       help="fine-tune a Hugging Face model directory (classify, token-classify, qa, lm, translate, "
                            "embed; full or LoRA; data-parallel under mpiexec)",
                       description="\n\n".join((cli._describe(intro.replace("``", "")), _task_list(tasks),
                                                 cli._describe(rest.replace(":mod:", "").replace("`", "")))))
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model directory (config.json, "
                   "model.safetensors, tokenizer)")
    g = p.add_argument_group("task and input")
    g.add_argument("--task", choices=_TASKS, required=True, help="what to fine-tune for")
    g.add_argument("--train", help="training file (classify: text<TAB>label; token-classify, qa: JSON lines; lm: text; "
                   "embed: anchor<TAB>positive)")
    g.add_argument("--val", help="validation file, same format")
    for split, what in (("train", "training"), ("val", "validation")):
        g.add_argument(f"--{split}-src", help=f"translate: {what} source sentences, one per line")
        g.add_argument(f"--{split}-tgt", help=f"translate: {what} target sentences, line-aligned")
    g.add_argument("--max-len", type=_count(2), default=128, help="tokens per text (longer ones are cut; qa: per "
                   "window, question included, questions cut to half of it)")
    g.add_argument("--doc-stride", type=_count(0), default=None,
                   help="qa: context tokens that consecutive windows of a long context share (default: --max-len / "
                        "4, at most 128)")
    _common(p, lr=5e-5, batch=16, steps_help="default: train for --minutes",
            minutes_help=f"{cli.DEFAULT_MINUTES} when neither --steps nor --minutes is given")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--lora", type=_count(), default=None, metavar="R",
                   help="train LoRA adapters of rank R (and a new head) instead of every weight")
    g.add_argument("--lora-alpha", type=_number(0), default=None, help="LoRA alpha (default: 2 R)")
    g.add_argument("--lora-dropout", type=_number(0, 1, low_open=False), default=0.0, metavar="P",
                   help="dropout on the LoRA adapters' input while training, as PEFT's lora_dropout (default: 0)")
    g.add_argument("--lora-targets", default=None,
                   help="comma-separated module names (PEFT's rule), or a regular expression if it contains any "
                        "of ^$*+?()[]|\\ (default: PEFT's for the model type)")
    g.add_argument("--recompute", action="store_true",
                   help="gradient checkpointing: recompute each block's activations in backward (less memory)")
    g.add_argument("--no-dropout", action="store_true", help="train without dropout (the config's and --lora-dropout)")
    g.add_argument("--patience", type=_count(), default=None,
                   help="stop after this many evaluations without a lower validation loss (keeps the best; needs "
                        "--val)")


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


def _json_lines(path: str, option: str):
    """(where, object) for each non-blank line of a JSON-lines file, ``where`` naming the file and line."""
    out = []
    # split on newlines only: a JSON string may hold characters that str.splitlines() also breaks at (U+2028)
    for i, line in enumerate(cli._read_input(path, option).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{option} {path}:{i}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{where}: not a JSON object ({getattr(exc, 'msg', exc)}); expected one JSON object "
                             "per line") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        out.append((where, obj))
    return out


def _need(where: str, obj: dict, keys, form: str) -> None:
    for key in keys:
        if key not in obj:
            raise UsageError(f'{where}: no "{key}" (expected {form})')


def _plain(tokenizer):
    """A copy of the tokenizer without the padding and truncation its file may set."""
    tok = copy.copy(tokenizer)
    tok.no_padding()
    tok.no_truncation()
    return tok


def _pad_id(model) -> int:
    pad = _TokInfo(model.tokenizer, model.directory).pad_id
    return int(pad if pad is not None else max(model._core.pad_token_id, 0))


def _padded_data(model, rows, types, labels, label_pad):
    """Pre-tokenized rows padded per batch; ``labels``: one int per row, or one (start, end) pair, or a list per
    token (padded with ``label_pad``)."""
    pad = _pad_id(model)

    def make(idx):
        ids, mask = _pad_rows([rows[i] for i in idx], pad)
        tt, _ = _pad_rows([types[i] for i in idx], 0)
        if label_pad is None:
            return (ids, mask, tt), labels[idx]
        lab, _ = _pad_rows([labels[i] for i in idx], label_pad)
        return (ids, mask, tt), lab
    return _Batches(len(rows), make)


# -- token classification

_TAGGED = '{"tokens": [words], "tags": [tag names]}'


def _tagged(path: str, option: str):
    """(words, tags, where) per line."""
    out = []
    for where, obj in _json_lines(path, option):
        _need(where, obj, ("tokens", "tags"), _TAGGED)
        words, tags = obj["tokens"], obj["tags"]
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise UsageError(f'{where}: "tokens" must be a non-empty list of non-empty strings')
        if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
            raise UsageError(f'{where}: "tags" must be a list of tag names (strings)')
        if len(words) != len(tags):
            raise UsageError(f"{where}: {len(words)} tokens but {len(tags)} tags (one tag per token)")
        out.append((words, [t.strip() for t in tags], where))
    return out


def _token_classify_data(model, rows, index, max_len):
    """The words joined by spaces (what the token-classification pipeline reads), tokenized; a word's label goes
    to its first sub-token, every other token is ignored (-100)."""
    tok = _plain(model.tokenizer)
    tok.enable_truncation(max_len)
    texts, starts = [], []
    for words, _, _ in rows:
        pos, st = 0, []
        for w in words:
            st.append(pos)
            pos += len(w) + 1
        texts.append(" ".join(words))
        starts.append(st)
    encs = tok.encode_batch(texts)
    ids, types, labels = [], [], []
    for (words, tags, _), text, st, e in zip(rows, texts, starts, encs):
        lab, last = [-100] * len(e.ids), None
        for t, ((a, b), special) in enumerate(zip(e.offsets, e.special_tokens_mask)):
            while a < b and text[a].isspace():  # (byte-level BPE offsets may include the space before a word)
                a += 1
            if special or a >= b:
                continue
            w = bisect_right(st, a) - 1
            if w != last:
                lab[t], last = index[tags[w]], w
        ids.append(e.ids)
        types.append(e.type_ids)
        labels.append(lab)
    return _padded_data(model, ids, types, labels, -100)


# -- extractive question answering

_SQUAD = '{"question": ..., "context": ..., "answers": {"text": [...], "answer_start": [...]}}'


class _QAExample:
    __slots__ = ("question", "context", "texts", "starts", "where")

    def __init__(self, question, context, texts, starts, where):
        self.question, self.context, self.texts, self.starts, self.where = question, context, texts, starts, where


def _qa_examples(path: str, option: str) -> List[_QAExample]:
    out = []
    for where, obj in _json_lines(path, option):
        _need(where, obj, ("question", "context", "answers"), _SQUAD)
        for key in ("question", "context"):
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise UsageError(f'{where}: "{key}" must be a non-empty string')
        context, answers = obj["context"], obj["answers"]
        if not isinstance(answers, dict) or not isinstance(answers.get("text"), list) or \
                not isinstance(answers.get("answer_start"), list):
            raise UsageError(f'{where}: "answers" must be {{"text": [...], "answer_start": [...]}} (empty lists: '
                             "no answer)")
        texts, starts = answers["text"], answers["answer_start"]
        if len(texts) != len(starts):
            raise UsageError(f"{where}: {len(texts)} answers.text but {len(starts)} answers.answer_start")
        for k, (text, start) in enumerate(zip(texts, starts)):
            if not isinstance(text, str) or not text:
                raise UsageError(f"{where}: answers.text[{k}] must be a non-empty string")
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise UsageError(f"{where}: answers.answer_start[{k}] must be a character offset (0, 1, ...), got "
                                 f"{start!r}")
            if start + len(text) > len(context):
                raise UsageError(f"{where}: answers.answer_start[{k}] {start} puts the answer ({len(text)} "
                                 f"characters) beyond the context ({len(context)} characters)")
            if context[start:start + len(text)] != text:
                raise UsageError(f"{where}: answers.text[{k}] {text[:40]!r} is not at answer_start {start} of the "
                                 f"context (found {context[start:start + len(text)][:40]!r}; offsets count "
                                 "characters from 0)")
        out.append(_QAExample(obj["question"], context, texts, starts, where))
    return out


def _qa_layout(tokenizer, max_len: int, stride: int):
    """The pair template, once --doc-stride is checked against the fewest context tokens a window has (questions
    are cut to max_len // 2)."""
    template = pair_template(_plain(tokenizer))
    (pre, _), _, (mid, _), _, (suf, _) = template
    least = max_len - max_len // 2 - len(pre) - len(mid) - len(suf)
    if least < 1 or stride >= least:
        raise UsageError(f"--doc-stride {stride}: must be smaller than the context tokens of a window ({least} at "
                         f"--max-len {max_len} with questions up to {max_len // 2} tokens); raise --max-len or "
                         "lower --doc-stride")
    return template


def _answer_tokens(offsets, lo: int, hi: int, span, ctx0: int):
    """The (start, end) token positions of a character span in the window of context tokens [lo, hi) starting at
    position ctx0, by transformers' run_qa rule: the last token starting at or before the span's start, the first
    ending at or after its end; the CLS token (position 0) when the span is not wholly inside the window."""
    if span is None or offsets[lo][0] > span[0] or offsets[hi - 1][1] < span[1]:
        return 0, 0
    s, e = lo, hi - 1
    while s + 1 < hi and offsets[s + 1][0] <= span[0]:
        s += 1
    while e - 1 >= lo and offsets[e - 1][1] >= span[1]:
        e -= 1
    return ctx0 + s - lo, ctx0 + e - lo


def _qa_data(model, examples: List[_QAExample], max_len: int, stride: int):
    """One sample per window of each example's context (as the question-answering pipeline cuts them)."""
    tok = _plain(model.tokenizer)
    (pre, pre_t), q_type, (mid, mid_t), c_type, (suf, suf_t) = _qa_layout(model.tokenizer, max_len, stride)
    qs = tok.encode_batch([x.question for x in examples], add_special_tokens=False)
    cs = tok.encode_batch([x.context for x in examples], add_special_tokens=False)
    rows, types, labels, windows, offsets = [], [], [], [], []
    for n, (x, q, c) in enumerate(zip(examples, qs, cs)):
        q_ids, c_ids, offs = q.ids[:max_len // 2], c.ids, c.offsets
        if not c_ids:
            raise UsageError(f"{x.where}: the context has no tokens")
        budget = max_len - len(pre) - len(q_ids) - len(mid) - len(suf)
        span = (x.starts[0], x.starts[0] + len(x.texts[0])) if x.texts else None
        ctx0 = len(pre) + len(q_ids) + len(mid)
        lo = 0
        while True:
            hi = min(lo + budget, len(c_ids))
            rows.append(list(pre) + q_ids + list(mid) + c_ids[lo:hi] + list(suf))
            types.append(list(pre_t) + [q_type] * len(q_ids) + list(mid_t) + [c_type] * (hi - lo) + list(suf_t))
            labels.append(_answer_tokens(offs, lo, hi, span, ctx0))
            windows.append((n, ctx0, lo, hi))
            if hi >= len(c_ids):
                break
            lo += budget - stride
        offsets.append(offs)
    data = _padded_data(model, rows, types, np.array(labels, np.int64).reshape(-1, 2), None)
    data.examples, data.windows, data.offsets = examples, windows, offsets
    return data


def _normalize_answer(text: str) -> str:
    """SQuAD's: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _f1(pred: str, gold: str) -> float:
    p, g = _normalize_answer(pred).split(), _normalize_answer(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    if not p or not g:
        return float(p == g)
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def _qa_scores(model, data, batch_size: int = 32, max_answer_len: int = 30) -> dict:
    """SQuAD exact match and F1 (in %) over the examples with answers: each example's answer is its best span
    (start <= end < start + max_answer_len context tokens, score start + end logit) over all its windows."""
    best = [(-math.inf, "")] * len(data.examples)
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(data), batch_size):
            idx = np.arange(b, min(b + batch_size, len(data)))
            inputs, _ = data[idx]
            start_logits, end_logits = model(*inputs)
            for r, f in enumerate(idx):
                n, ctx0, lo, hi = data.windows[f]
                s, e = start_logits[r, ctx0:ctx0 + hi - lo], end_logits[r, ctx0:ctx0 + hi - lo]
                k = np.arange(hi - lo)
                allowed = (k[None, :] >= k[:, None]) & (k[None, :] < k[:, None] + max_answer_len)
                score = np.where(allowed, s[:, None] + e[None, :], -np.inf)
                i, j = divmod(int(score.argmax()), hi - lo)
                if score[i, j] > best[n][0]:
                    offs = data.offsets[n]
                    best[n] = (float(score[i, j]), data.examples[n].context[offs[lo + i][0]:offs[lo + j][1]])
    finally:
        model.train(was_training)
    answered = [(x, pred) for x, (_, pred) in zip(data.examples, best) if x.texts]
    if not answered:
        return {"exact_match": float("nan"), "f1": float("nan"), "examples": 0}
    em = [max(float(_normalize_answer(pred) == _normalize_answer(g)) for g in x.texts) for x, pred in answered]
    f1 = [max(_f1(pred, g) for g in x.texts) for x, pred in answered]
    return {"exact_match": 100 * float(np.mean(em)), "f1": 100 * float(np.mean(f1)), "examples": len(answered)}


# ------------------------------------------------------------------------------------------------- the job

def _load(args, num_labels=None):
    model = _load_model(args, num_labels)
    # (learned positions: a longer window would fail at the first batch that fills it)
    limit = (model.model if isinstance(model, SentenceEncoder) else model)._core.max_positions
    if limit and args.max_len > limit:
        if cli._is_main():
            print(f"--max-len {args.max_len} is more than the model's {limit} positions: using {limit}", flush=True)
        args.max_len = limit
    return model


def _load_model(args, num_labels=None):
    if not os.path.isdir(args.model_dir):
        raise UsageError(f"MODEL_DIR {args.model_dir}: not a directory")
    if args.task == "embed":
        return SentenceEncoder.from_pretrained(args.model_dir, trainable=True)
    want, new_task, suffix = _HEADS[args.task]
    task = None
    if new_task:  # an encoder task: a base checkpoint gets a new head, one with the head keeps it
        with open(os.path.join(args.model_dir, "config.json"), encoding="utf-8") as f:
            arch = (json.load(f).get("architectures") or [""])[0]
        if arch.endswith("Model") or not arch:
            task = new_task
        elif not arch.endswith(suffix):
            raise UsageError(f"--task {args.task}: {args.model_dir} is a {arch}, not an encoder (a *Model or "
                             f"*{suffix} checkpoint)")
    model = from_pretrained(args.model_dir, trainable=True, task=task, num_labels=num_labels if task else None,
                            init_seed=args.seed, verbose=cli._is_main())
    if model.head != want:
        raise UsageError(f"--task {args.task}: {args.model_dir} has a {model.head} head ({model.architecture}), "
                         f"not {want}")
    if model.tokenizer is None:
        raise UsageError(f"{args.model_dir}: no tokenizer (tokenizer.json or vocab files)")
    if num_labels is not None and model._core.num_labels != num_labels:
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
    files = {k: (f"--{k}", p) for k, p in (("train", args.train), ("val", args.val)) if p}
    if args.doc_stride is not None and args.task != "qa":
        raise UsageError("--doc-stride is for --task qa")
    if args.task == "classify":
        rows, label_names = cli._read_labelled(files)
        model = _load(args, num_labels=len(label_names))
        data = {k: _classify_data(model, v, args.max_len) for k, v in rows.items()}
    elif args.task == "token-classify":
        rows = {k: _tagged(p, option) for k, (option, p) in files.items()}
        label_names = sorted({t for _, tags, _ in rows["train"] for t in tags})
        index = {name: i for i, name in enumerate(label_names)}
        for k, (option, p) in files.items():
            unseen = sorted({t for _, tags, _ in rows[k] for t in tags if t not in index})
            if unseen:
                raise UsageError(f"{option} {p}: tag(s) {', '.join(map(repr, unseen[:5]))} do not occur in --train")
        model = _load(args, num_labels=len(label_names))
        data = {k: _token_classify_data(model, v, index, args.max_len) for k, v in rows.items()}
    elif args.task == "qa":
        examples = {k: _qa_examples(p, option) for k, (option, p) in files.items()}
        tokenizer = _tokenizer_of(args.model_dir) if os.path.isdir(args.model_dir) else None
        if args.doc_stride is not None and tokenizer is not None:  # a mistake in the arguments: before the load
            _qa_layout(tokenizer, args.max_len, args.doc_stride)
        model = _load(args)
        if args.doc_stride is None:  # (after _load: --max-len may have been cut to the model's positions)
            args.doc_stride = min(128, args.max_len // 4)
        data = {k: _qa_data(model, v, args.max_len, args.doc_stride) for k, v in examples.items()}
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
                                        dropout=args.lora_dropout, target_modules=targets, seed=args.seed)
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
    metrics = ["accuracy"] if args.task in ("classify", "token-classify") else []
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
               "lora": args.lora, "lora_alpha": args.lora_alpha or (2 * args.lora if args.lora else None),
               "lora_dropout": args.lora_dropout if args.lora else None}
        atomic_write_bytes(os.path.join(args.output_dir, "finetune.json"), [json.dumps(job, indent=2).encode()])

    cli._run(trainer, args, data["train"], data.get("val"), save)
    if "val" in data and args.task in ("token-classify", "qa"):
        result = trainer.evaluate(data["val"], batch_size=args.batch_size)  # (every rank: it sums over them)
        line = f"validation: loss {result['loss']:.4f}"
        if args.task == "token-classify":
            line += f", token accuracy {result['accuracy']:.4f} (each word's first sub-token)"
        elif cli._is_main():
            qa = _qa_scores(model, data["val"], args.batch_size)
            line += (f", exact match {qa['exact_match']:.2f}, F1 {qa['f1']:.2f} ({qa['examples']:,} questions with "
                     "answers)")
        print(line)
    print(f"output: {args.output_dir}")
    return 0
