"""Command line: ``python -m cpuformer <command>`` (also the ``cpuformer`` console script).

Commands: ``info`` (the build and a kernel self-check), ``demo`` (a character-level language model on the Python
standard library's own source: no download, about two minutes on 2 cores), ``lm`` (character-level language model
on a text corpus), ``classify`` (sentence classification from TSV files), ``translate`` (sequence-to-sequence on
line-aligned parallel files). Every training command takes ``--minutes`` (a wall-clock training budget),
``--output-dir`` (checkpoints, history, tokenizer) and ``--resume``.

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
                   read_parallel, read_text, read_tsv)
from .models import GPT, Seq2SeqTransformer, TransformerClassifier
from .train import (AdamW, Callback, CrossEntropyLoss, EarlyStopping, Trainer, bleu, classification_metrics,
                    warmup_cosine)

__all__ = ["main"]


class TimeBudget(Callback):
    """Stop training once ``minutes`` of wall-clock time have passed."""

    def __init__(self, minutes: Optional[float]) -> None:
        self.deadline = time.time() + minutes * 60 if minutes else None

    def on_step_end(self, trainer, logs):
        if self.deadline is not None and time.time() > self.deadline:
            trainer.should_stop = True


def _common(p: argparse.ArgumentParser, minutes: float, lr: float, batch: int) -> None:
    p.add_argument("--minutes", type=float, default=minutes, help="wall-clock training budget (default %(default)s)")
    p.add_argument("--epochs", type=int, default=1000, help="upper bound on epochs (the budget usually stops first)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=200, help="warm-up steps of the cosine schedule")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output-dir", default=None, help="checkpoints, history.jsonl and the tokenizer go here")
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--quiet", action="store_true")


_DIST = {"on": False}  # set by main() when launched by MPI with several ranks


def _is_main() -> bool:
    if not _DIST["on"]:
        return True
    from mpi4py import MPI
    return MPI.COMM_WORLD.Get_rank() == 0


def _setup(args) -> None:
    if args.threads:
        cpuformer.set_num_threads(args.threads)
    nn.init.manual_seed(args.seed)


def _steps_estimate(args, n_train: int) -> int:
    """Schedule length: max_steps, else an estimate of what the time budget allows (refined by the caller)."""
    return args.max_steps or max(1000, args.epochs * math.ceil(n_train / args.batch_size))


def _trainer(model, args, total_steps: int, metrics, callbacks=()) -> Trainer:
    distributed = None
    if _DIST["on"]:
        from .distributed import DataParallel
        distributed = DataParallel(model, threads=args.threads, seed=args.seed)
    return Trainer(model, CrossEntropyLoss(label_smoothing=getattr(args, "label_smoothing", 0.0)),
                   AdamW(model, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01),
                   schedule=warmup_cosine(args.lr, args.warmup, total_steps, min_lr=args.lr / 20),
                   max_grad_norm=1.0, metrics=metrics, output_dir=args.output_dir, save_every=args.save_every,
                   eval_every=args.eval_every, seed=args.seed, callbacks=[TimeBudget(args.minutes), *callbacks],
                   quiet=args.quiet, log_every=50, distributed=distributed)


def _measure_steps(model, dataset, args, probe_steps: int = 3) -> int:
    """How many optimizer steps fit in the time budget, from a few timed steps on a throwaway copy."""
    if not args.minutes or args.max_steps:
        return _steps_estimate(args, len(dataset))
    probe = model.clone()
    t = Trainer(probe, optimizer=AdamW(probe, lr=args.lr), quiet=True, progress=False, seed=args.seed)
    start = time.perf_counter()
    t.fit(dataset, max_steps=probe_steps, batch_size=args.batch_size)
    per_step = (time.perf_counter() - start) / probe_steps
    steps = max(50, int(args.minutes * 60 / per_step))
    if _DIST["on"]:  # one schedule for all ranks: rank 0's estimate
        from mpi4py import MPI
        steps = MPI.COMM_WORLD.bcast(steps, root=0)
    return steps


# ---------------------------------------------------------------------------------------------------------------
# language model

def _train_lm(args, train_text: str, val_text: str, prompt: str) -> dict:
    _setup(args)
    subword = getattr(args, "tokenizer", "char") == "bpe"
    if subword:  # cased byte-level BPE trained on the training text; losses also reported per character
        tok = _SubwordTokenizer(train_text.splitlines(keepends=True), args.vocab_size, 2)
    else:
        tok = CharTokenizer.from_corpus([train_text])
    train_ids, val_ids = tok.encode(train_text), tok.encode(val_text)
    train = LanguageModelDataset(train_ids, args.block_size)
    val = LanguageModelDataset(val_ids, args.block_size)
    arch = getattr(args, "arch", "gpt")
    llama = dict(norm="rms_norm", positional="rotary", activation="silu", gated=True, bias=False,
                 tie_weights=False, n_kv_head=max(1, args.heads // 4), d_ff=_swiglu_width(args.embd),
                 layer_norm_eps=1e-6) if arch == "llama" else {}
    model = GPT(tok.vocab_size, args.block_size, args.layers, args.heads, args.embd, dropout=args.dropout, **llama)
    unit = "token" if subword else "char"
    print(f"{'subword (byte-level BPE)' if subword else 'character'} LM: {tok.vocab_size} symbols, "
          f"{len(train_ids):,} training {unit}s, {'Llama-style ' if llama else ''}GPT {args.layers}x{args.embd} "
          f"({model.num_parameters():,} "
          f"parameters), {cpuformer.get_num_threads()} threads")
    steps = _measure_steps(model, train, args)
    trainer = _trainer(model, args, steps, ["perplexity"])
    if args.output_dir and _is_main():
        os.makedirs(args.output_dir, exist_ok=True)
        if subword:
            cpuformer.io.atomic_write_bytes(os.path.join(args.output_dir, "tokenizer.json"), [tok.json.encode()])
        else:
            tok.save(os.path.join(args.output_dir, "tokenizer.json"))
    start = time.time()
    trainer.fit(train, val, epochs=args.epochs, max_steps=steps, batch_size=args.batch_size,
                resume_from="latest" if args.resume else None)
    result = trainer.evaluate(val, batch_size=args.batch_size)
    per_char = ""
    if subword:  # the same total loss spread over the characters, comparable with a character model
        per_char = f"; {result['loss'] * len(val_ids) / max(len(val_text), 1):.4f} nats/char"
    print(f"\ntrained {trainer.step} steps in {(time.time() - start) / 60:.1f} min; validation loss "
          f"{result['loss']:.4f} nats/{unit} (perplexity {result['perplexity']:.2f}){per_char}")
    for i, temperature in enumerate((0.8, 1.0)):
        ids = model.generate(np.array([tok.encode(prompt)]), args.sample_chars, temperature=temperature, top_k=40,
                             seed=args.seed + i)
        print(f"\n--- sample (temperature {temperature}) ---\n{tok.decode(ids[0])}")
    return result


def _swiglu_width(d_model: int) -> int:
    """Llama's feed-forward width for d_model: 2/3 of 4 d (the gated form's three matrices cost what two of 4 d
    would), rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


def _lm_arguments(p, minutes, block, layers, heads, embd, dropout):
    _common(p, minutes, lr=2e-3, batch=32)
    p.add_argument("--block-size", type=int, default=block)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--embd", type=int, default=embd)
    p.add_argument("--dropout", type=float, default=dropout)
    p.add_argument("--sample-chars", type=int, default=300, help="length of the samples, in tokens")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default="char",
                   help="characters (default) or cased byte-level BPE subwords trained on --train")
    p.add_argument("--vocab-size", type=int, default=4000, help="BPE vocabulary size")
    p.add_argument("--arch", choices=["gpt", "llama"], default="gpt",
                   help="gpt: GPT-2 blocks (LayerNorm, learned positions, GELU); llama: RMSNorm, rotary positions, "
                        "SwiGLU, grouped-query attention (heads/4 key-value heads), no biases, untied head")


def cmd_lm(args) -> int:
    _train_lm(args, read_text(args.train), read_text(args.val), args.prompt)
    return 0


def cmd_demo(args) -> int:
    """A language model on Python's own standard library source (every installation carries it)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    text = "".join(read_text(f) for f in files[: args.files] if os.path.getsize(f) < 200_000)
    cut = int(len(text) * 0.95)
    print(f"demo: {len(files[: args.files])} standard-library modules from {sysconfig.get_paths()['stdlib']}")
    _train_lm(args, text[:cut], text[cut:], "def ")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# classification

def cmd_classify(args) -> int:
    _setup(args)
    rows = {name: read_tsv(path, columns=2, label_column=1, skip_malformed=False)
            for name, path in (("train", args.train), ("val", args.val), ("test", args.test)) if path}
    tok = WordTokenizer.from_corpus([r[0] for r in rows["train"]], min_freq=args.min_freq, max_size=args.vocab_size)
    data = {k: SequenceClassificationDataset([tok.encode(r[0]) or [tok.unk_id] for r in v], [r[1] for r in v],
                                             pad_id=tok.pad_id, max_len=args.max_len) for k, v in rows.items()}
    num_classes = int(max(max(r[1] for r in v) for v in rows.values())) + 1
    model = TransformerClassifier(tok.vocab_size, num_classes, args.d_model, args.heads, args.layers, args.d_ff,
                                  args.dropout, max_len=args.max_len, pooling=args.pooling, pad_id=tok.pad_id)
    print(f"classification: {len(data['train']):,} training sentences, vocabulary {tok.vocab_size:,}, "
          f"{num_classes} classes, model {model.num_parameters():,} parameters")
    steps = _measure_steps(model, data["train"], args)
    # SST-2's validation accuracy peaks and then drifts as a small model overfits the 67k phrases: keep the best.
    best = EarlyStopping("val_accuracy", patience=args.patience, mode="max", restore_best=True) if "val" in data else None
    trainer = _trainer(model, args, steps, ["accuracy", "f1"], [best] if best else [])
    trainer.fit(data["train"], data.get("val"), epochs=args.epochs, max_steps=steps, batch_size=args.batch_size,
                bucket=True, resume_from="latest" if args.resume else None)
    if best is not None and best.best_step is not None:
        print(f"kept the weights of step {best.best_step} (best validation accuracy {best.best:.4f})")
    for split in ("val", "test"):
        if split in data:
            logits = trainer.predict(data[split], batch_size=256)
            m = classification_metrics(logits.argmax(-1), data[split].labels)
            print(f"{split}: accuracy {m['accuracy']:.4f}  macro F1 {m['f1']:.4f}  "
                  f"(precision {m['precision']:.4f}, recall {m['recall']:.4f})")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# translation

class _SubwordTokenizer:
    """A byte-level BPE trained on the job's own training sentences (cpuformer.train_bpe), with the word
    tokenizer's interface: ids 0-3 are <pad> <unk> <bos> <eos>; decode gives cased, detokenized text."""

    def __init__(self, sentences: List[str], vocab_size: int, min_freq: int) -> None:
        self.json = cpuformer.train_bpe(texts=sentences, vocab_size=vocab_size, min_frequency=min_freq,
                                        special_tokens=("<pad>", "<unk>", "<bos>", "<eos>"))
        self._tok = cpuformer.Tokenizer.from_str(self.json)
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = 0, 1, 2, 3
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def cmd_translate(args) -> int:
    _setup(args)
    pairs = {name: read_parallel(src, tgt) for name, src, tgt in
             (("train", args.train_src, args.train_tgt), ("val", args.val_src, args.val_tgt),
              ("test", args.test_src, args.test_tgt)) if src}
    if args.tokenizer == "bpe":  # cased byte-level subwords, one vocabulary per language
        src_tok, tgt_tok = (_SubwordTokenizer([p[side] for p in pairs["train"]], args.vocab_size, args.min_freq)
                            for side in (0, 1))
        if args.output_dir and _is_main():
            os.makedirs(args.output_dir, exist_ok=True)
            for name, tok in (("source", src_tok), ("target", tgt_tok)):
                cpuformer.io.atomic_write_bytes(os.path.join(args.output_dir, f"{name}_tokenizer.json"),
                                                [tok.json.encode("utf-8")])
    else:  # lower-cased words
        src_tok = WordTokenizer.from_corpus([s for s, _ in pairs["train"]], min_freq=args.min_freq)
        tgt_tok = WordTokenizer.from_corpus([t for _, t in pairs["train"]], min_freq=args.min_freq)
    data = {k: Seq2SeqDataset([src_tok.encode(s) for s, _ in v], [tgt_tok.encode(t) for _, t in v],
                              tgt_tok.pad_id, tgt_tok.bos_id, tgt_tok.eos_id, max_len=args.max_len)
            for k, v in pairs.items()}
    model = Seq2SeqTransformer(src_tok.vocab_size, tgt_tok.vocab_size, args.d_model, args.heads, args.layers,
                               args.layers, args.d_ff, args.dropout, max_len=args.max_len + 2, pad_id=tgt_tok.pad_id,
                               bos_id=tgt_tok.bos_id, eos_id=tgt_tok.eos_id)
    print(f"translation: {len(data['train']):,} sentence pairs, vocabularies {src_tok.vocab_size:,} / "
          f"{tgt_tok.vocab_size:,}, model {model.num_parameters():,} parameters")
    steps = _measure_steps(model, data["train"], args)
    trainer = _trainer(model, args, steps, [])
    trainer.fit(data["train"], data.get("val"), epochs=args.epochs, max_steps=steps, batch_size=args.batch_size,
                bucket=True, resume_from="latest" if args.resume else None)
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
    return 0


# ---------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpuformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="print the build and self-check the kernels")

    p = sub.add_parser("demo", help="train a small character LM on the Python standard library (~2 min)")
    _lm_arguments(p, minutes=1.6, block=64, layers=2, heads=4, embd=128, dropout=0.0)
    p.add_argument("--files", type=int, default=60, help="number of standard-library modules to read")
    p.set_defaults(eval_every=100, warmup=50, lr=3e-3, sample_chars=200)

    p = sub.add_parser("lm", help="character-level language model on a text corpus")
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--prompt", default="\n")
    _lm_arguments(p, minutes=15, block=128, layers=4, heads=6, embd=192, dropout=0.1)

    p = sub.add_parser("classify", help="sentence classification from text<TAB>label files")
    p.add_argument("--train", required=True)
    p.add_argument("--val")
    p.add_argument("--test")
    _common(p, minutes=15, lr=5e-4, batch=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--min-freq", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=20000)
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean")
    p.add_argument("--patience", type=int, default=6, help="evaluations without improvement before stopping")

    p = sub.add_parser("translate", help="sequence-to-sequence on line-aligned parallel files")
    for split in ("train", "val", "test"):
        p.add_argument(f"--{split}-src", required=split == "train")
        p.add_argument(f"--{split}-tgt", required=split == "train")
    _common(p, minutes=15, lr=7e-4, batch=64)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--min-freq", type=int, default=2)
    p.add_argument("--tokenizer", choices=["bpe", "word"], default="bpe",
                   help="cased byte-level BPE subwords (default) or lower-cased words")
    p.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary size per language")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in (None, "info"):
        from .__main__ import info
        return info()
    commands = {"demo": cmd_demo, "lm": cmd_lm, "classify": cmd_classify, "translate": cmd_translate}
    _start_distributed()
    try:
        return commands[args.command](args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"cpuformer {args.command}: error: {exc}", file=sys.stderr)
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
