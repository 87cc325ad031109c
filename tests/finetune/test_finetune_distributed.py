"""The finetune job data-parallel over MPI (issue 17): 2 ranks equal 1 process with the doubled batch (LoRA and full
fine-tuning), exact resume under MPI, every task runs. Real `mpiexec` jobs of `python -m cpuformer finetune`, as a
user starts them; skipped without mpi4py + mpiexec (pip install "cpuformer[mpi]") or torch / transformers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ft_testlib import H

pytest.importorskip("mpi4py")
pytest.importorskip("torch")
pytest.importorskip("transformers")
BIN = os.path.dirname(sys.executable)
MPIEXEC = shutil.which("mpiexec", path=BIN + os.pathsep + os.environ.get("PATH", ""))
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install 'cpuformer[mpi]')")

from cpuformer.io import load_safetensors  # noqa: E402


def finetune(args, cwd, ranks=None, threads=None, quiet=True):
    cmd = [sys.executable, "-m", "cpuformer", "finetune", *map(str, args), *(["--quiet"] if quiet else [])]
    if ranks:
        cmd = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py", *cmd[1:]]
    else:
        cmd += ["--threads", str(threads or 2)]
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def trained(out, step):
    """The trainable parameters at ``step`` (the checkpoint) and the per-step losses."""
    weights, _ = load_safetensors(str(out / f"checkpoint-{step}" / "model.safetensors"))
    losses = [json.loads(line)["loss"] for line in (out / "history.jsonl").read_text().splitlines()
              if '"loss"' in line]
    return weights, np.array(losses)


def classify_file(path, seed, n):
    rng = np.random.default_rng(seed)
    rows = [f"{H.SENTENCES[int(rng.integers(len(H.SENTENCES)))]}\t{'pos' if rng.random() < 0.5 else 'neg'}"
            for _ in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path.name


def tags_file(path, seed, n):
    rng = np.random.default_rng(seed)
    words = sorted({w for s in H.SENTENCES for w in s.split()})
    tag_of = {w: ("B-X", "I-X", "O")[int(rng.integers(3))] for w in words}
    with open(path, "w") as f:
        for _ in range(n):
            toks = [words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(3, 14)))]
            f.write(json.dumps({"tokens": toks, "tags": [tag_of[w] for w in toks]}) + "\n")
    return path.name


def assert_same_training(one, two, rtol, noisy=(), noisy_atol=0.0):
    """Losses within 1e-4 relative; every tensor within ``rtol`` of its largest magnitude, except ``noisy`` ones
    (names ending so) within ``noisy_atol``."""
    (a, la), (b, lb) = one, two
    np.testing.assert_allclose(lb, la, rtol=1e-4)
    assert set(a) == set(b)
    for k in a:
        diff = np.abs(a[k] - b[k]).max()
        if k.endswith(noisy):
            assert diff <= noisy_atol, (k, diff)
        else:
            assert diff <= rtol * np.abs(a[k]).max(), (k, diff / np.abs(a[k]).max())


def test_data_parallel_on_pretrained_parameters(ft_bert_tok):
    """DataParallel's copy-in / copy-out mode (tests/finetune/dp_pretrained.py): rank 0's trainable parameters
    broadcast, frozen ones untouched, gradients summed, the layout rebuilt when another parameter is unfrozen, and
    ranks that train different parameters refused."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dp_pretrained.py")
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    for mode, expect in (("check", ": ok, "), ("mismatch", "rank 1 has other parameters than rank 0")):
        proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", script, ft_bert_tok, mode],
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.count(expect) == 2, proc.stdout + proc.stderr


# 21 samples in global batches of 8: each epoch ends with a batch of 5, split 3 + 2 between the ranks; 7 steps
# run into a third epoch. Dropout off: the ranks' dropout streams differ from one process's.
COMMON = ["--steps", 7, "--no-dropout", "--warmup", 2, "--seed", 5]


def test_lora_two_ranks_equal_one_process_with_doubled_batch(ft_bert_tok, tmp_path):
    """LoRA adapters and a new head (the rest frozen: no gradient, not reduced), AdamW with clipping and the
    warm-up / cosine schedule: 2 ranks x batch 4 make one process's updates with batch 8 up to float32 summation
    order. AdamW's normalised steps magnify that rounding in the adapters' small gradients (lora_B starts at zero), by
    an amount that depends on the tiny tokenizer's vocabulary order, which the tokenizers library's trainer draws
    afresh in each process. Over ~140 runs on the AMX, AVX-512 and AVX2 paths and one CI run: losses up to 3.3e-6
    apart (mostly ~5e-8), the head up to 5e-5 of its largest value, the adapters up to 2.6e-4. Held to 1e-4 (losses),
    1e-3 of the largest value (head, merged model) and lr / 10 (adapters). The bug this guards against is far above
    that: ranks that average their own samples instead of the global batch (the last batch of an epoch splits 3 + 2)
    move the losses by 6e-3, the head by 0.4 of its largest value and every adapter by 2e-3 to 1e-2."""
    train = classify_file(tmp_path / "train.tsv", 0, 21)
    args = [ft_bert_tok, "--task", "classify", "--train", train, "--lora", 4, "--lr", 1e-2, *COMMON]
    finetune([*args, "--batch-size", 8, "--output-dir", "one"], tmp_path)
    proc = finetune([*args, "--batch-size", 4, "--output-dir", "two"], tmp_path, ranks=2)
    assert "data-parallel: 2 ranks, threads per rank [1, 1]" in proc.stdout  # 2 cores or more: cores / ranks
    assert proc.stderr.count("newly initialized") == 1  # rank 0 reports the new head, once
    one, two = trained(tmp_path / "one", 7), trained(tmp_path / "two", 7)
    assert len(one[1]) == 7 and any("lora_B" in k for k in one[0])
    assert not any(k.endswith(("query.weight", "key.bias")) for k in one[0])  # the frozen base: not trained
    assert_same_training(one, two, 1e-3, noisy=("lora_A.weight", "lora_B.weight"), noisy_atol=1e-2 / 10)
    # the saved model (adapters merged) is the same model
    merged = [load_safetensors(str(tmp_path / d / "model.safetensors"))[0] for d in ("one", "two")]
    for k in merged[0]:
        assert np.abs(merged[0][k] - merged[1][k]).max() <= 1e-3 * max(np.abs(merged[0][k]).max(), 1e-3), k


def test_full_finetune_two_ranks_equal_one_process(ft_bert_tok, tmp_path):
    """Every weight trained, token classification (per-token targets: each rank's count weighs its gradient). As
    in tests/test_distributed.py, AdamW divides by the gradient's RMS, which magnifies rounding in gradients that
    nearly cancel (up to 5.9e-5 of a tensor's largest value seen over 36 runs on the AMX, AVX-512 and AVX2 paths; held
    to 5e-4) and turns the rounding noise of a gradient that is analytically zero (the attention key bias: softmax
    ignores a constant added to every score) into steps of its own, so that bias is only held to a quarter of what 7
    steps of lr 3e-3 can move it (3.4e-4 seen). Ranks that average their own samples instead of the global batch
    move the losses by 6e-3 and a tensor by 0.37 of its largest value."""
    train = tags_file(tmp_path / "train.jsonl", 1, 21)
    args = [ft_bert_tok, "--task", "token-classify", "--train", train, "--lr", 3e-3, *COMMON]
    finetune([*args, "--batch-size", 8, "--output-dir", "one"], tmp_path)
    finetune([*args, "--batch-size", 4, "--output-dir", "two"], tmp_path, ranks=2)
    one, two = trained(tmp_path / "one", 7), trained(tmp_path / "two", 7)
    assert "encoder.layer.0.attention.self.query.weight" in one[0]
    assert_same_training(one, two, 5e-4, noisy=("key.bias",), noisy_atol=0.25 * 7 * 3e-3)


def test_resume_under_mpi_is_exact(ft_bert_tok, tmp_path):
    """A 2-rank LoRA run with dropout on, cut off after its step-4 checkpoint (its later checkpoint removed) and
    resumed, ends bitwise where the uninterrupted run ended (each rank's dropout stream is in the checkpoint; the
    schedule depends on --steps, so both runs are given 7)."""
    model = tmp_path / "dropout_bert"
    shutil.copytree(ft_bert_tok, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    (model / "config.json").write_text(json.dumps(cfg))
    train = classify_file(tmp_path / "train.tsv", 2, 30)
    args = [model, "--task", "classify", "--train", train, "--lora", 2, "--batch-size", 3, "--steps", 7,
            "--save-every", 4, "--output-dir", "run"]
    finetune(args, tmp_path, ranks=2)
    a, la = trained(tmp_path / "run", 7)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-7"]
    shutil.rmtree(tmp_path / "run" / "checkpoint-7")
    proc = finetune([*args, "--resume"], tmp_path, ranks=2, quiet=False)
    assert "resumed from checkpoint-4" in proc.stdout
    b, lb = trained(tmp_path / "run", 7)
    assert la.tolist() == lb.tolist() and len(la) == 7
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # and dropout was on: without it the run differs
    finetune([*args[:-1], "nodrop", "--no-dropout"], tmp_path, ranks=2)
    assert trained(tmp_path / "nodrop", 7)[1].tolist() != la.tolist()


def test_qa_and_embed_run_data_parallel(ft_bert_tok, tmp_path):
    """The other data paths under mpiexec: QA windows (with validation: loss summed over ranks, EM on rank 0) and
    sentence-embedding pairs (in-batch negatives per rank); the outputs load."""
    from cpuformer.models import SentenceEncoder, from_pretrained
    with open(tmp_path / "qa.jsonl", "w") as f:
        for i in range(12):
            context = H.SENTENCES[i % 7] + " " + H.SENTENCES[(i + 2) % 7]
            word = context.split()[i % 5]
            f.write(json.dumps({"question": f"{word} ?", "context": context,
                                "answers": {"text": [word], "answer_start": [context.index(word)]}}) + "\n")
    proc = finetune([ft_bert_tok, "--task", "qa", "--train", "qa.jsonl", "--val", "qa.jsonl", "--steps", 3,
                     "--batch-size", 3, "--max-len", 24, "--output-dir", "qa"], tmp_path, ranks=2)
    assert "exact match" in proc.stdout
    assert from_pretrained(tmp_path / "qa").head == "question-answering"
    (tmp_path / "pairs.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in zip(H.SENTENCES, H.SENTENCES[1:])))
    finetune([ft_bert_tok, "--task", "embed", "--train", "pairs.tsv", "--steps", 2, "--batch-size", 2,
              "--output-dir", "emb"], tmp_path, ranks=2)
    assert SentenceEncoder.from_pretrained(tmp_path / "emb").encode(["the cat sat"]).shape == (1, 32)
