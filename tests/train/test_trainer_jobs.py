"""Trainer and the three jobs: pipelines learn on small slices of the real data, resume is exact, checkpoint writes
are atomic, generation with and without the KV cache agree, non-finite values stop training."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cpuformer
import cpuformer.nn as nn
from cpuformer.data import (CharTokenizer, LanguageModelDataset, Seq2SeqDataset, SequenceClassificationDataset,
                            WordTokenizer, read_parallel, read_text, read_tsv)
from cpuformer.models import GPT, Seq2SeqTransformer, TransformerClassifier
from cpuformer.train import AdamW, Callback, EarlyStopping, Trainer, constant, latest_checkpoint, warmup_cosine

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: data_path
from data_path import DATA  # noqa: E402  CPUFORMER_TEST_DATA, else ../shared/data
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data not present")


def tiny_lm(dropout=0.0, seed=0):
    nn.init.manual_seed(seed)
    text = "the quick brown fox jumps over the lazy dog. " * 40
    tok = CharTokenizer.from_corpus([text])
    model = GPT(tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=dropout)
    return model, tok, LanguageModelDataset(tok.encode(text), 16)


# ------------------------------------------------------------------------------------------------ the three jobs

@needs_data
def test_sentiment_pipeline_learns_on_a_slice():
    rows = read_tsv(os.path.join(DATA, "sst2", "train.tsv"), label_column=1)[:1500]
    tok = WordTokenizer.from_corpus([r[0] for r in rows], min_freq=1)
    ds = SequenceClassificationDataset([tok.encode(r[0]) or [tok.unk_id] for r in rows], [r[1] for r in rows],
                                       pad_id=tok.pad_id, max_len=32)
    nn.init.manual_seed(0)
    model = TransformerClassifier(tok.vocab_size, 2, d_model=32, nhead=2, num_layers=1, dim_feedforward=64,
                                  dropout=0.0, max_len=32)
    trainer = Trainer(model, optimizer=AdamW(model, lr=3e-3), metrics=["accuracy", "f1"], quiet=True)
    before = trainer.evaluate(ds)["loss"]
    trainer.fit(ds, epochs=3, batch_size=64, bucket=True)
    after = trainer.evaluate(ds)
    assert after["loss"] < before - 0.1 and after["accuracy"] > 0.7


@needs_data
def test_char_lm_pipeline_learns_on_a_slice():
    text = read_text(os.path.join(DATA, "tinyshakespeare", "train.txt"))[:20000]
    tok = CharTokenizer.from_corpus([text])
    ds = LanguageModelDataset(tok.encode(text), 32)
    nn.init.manual_seed(0)
    model = GPT(tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32)
    trainer = Trainer(model, optimizer=AdamW(model, lr=5e-3), metrics=["perplexity"], quiet=True)
    before = trainer.evaluate(ds)["loss"]
    trainer.fit(ds, max_steps=60, batch_size=16)
    assert trainer.evaluate(ds)["loss"] < before - 1.0  # from ~ln(65) = 4.2 towards bigram statistics


@needs_data
def test_translation_pipeline_learns_on_a_slice():
    pairs = read_parallel(os.path.join(DATA, "multi30k", "train.en"), os.path.join(DATA, "multi30k", "train.fr"))[:300]
    src_tok = WordTokenizer.from_corpus([s for s, _ in pairs])
    tgt_tok = WordTokenizer.from_corpus([t for _, t in pairs])
    ds = Seq2SeqDataset([src_tok.encode(s) for s, _ in pairs], [tgt_tok.encode(t) for _, t in pairs], 0, 2, 3,
                        max_len=30)
    nn.init.manual_seed(0)
    model = Seq2SeqTransformer(src_tok.vocab_size, tgt_tok.vocab_size, 32, 2, 1, 1, 64, dropout=0.0, max_len=40)
    trainer = Trainer(model, optimizer=AdamW(model, lr=3e-3), quiet=True)
    before = trainer.evaluate(ds)["loss"]
    trainer.fit(ds, epochs=3, batch_size=32, bucket=True)
    assert trainer.evaluate(ds)["loss"] < before - 1.0
    out = model.translate(np.array([src_tok.encode(pairs[0][0])]), max_len=10, beam_size=2)
    assert len(out) == 1 and all(0 <= t < tgt_tok.vocab_size for t in out[0])


@needs_data
@pytest.mark.parametrize("command", ["classify", "lm", "lm-bpe", "translate", "translate-word", "demo"])
def test_cli_commands_run(tmp_path, command):
    d = DATA
    small = tmp_path / "small"
    small.mkdir()
    if command == "classify":
        lines = open(os.path.join(d, "sst2", "train.tsv")).read().splitlines()[:300]
        (small / "train.tsv").write_text("\n".join(lines) + "\n")
        args = ["classify", "--train", str(small / "train.tsv"), "--val", str(small / "train.tsv"), "--d-model", "16",
                "--heads", "2", "--layers", "1", "--d-ff", "32"]
        expect = "val: accuracy"
    elif command in ("lm", "lm-bpe"):
        (small / "t.txt").write_text(read_text(os.path.join(d, "tinyshakespeare", "train.txt"))[:5000])
        args = ["lm", "--train", str(small / "t.txt"), "--val", str(small / "t.txt"), "--layers", "1", "--embd",
                "16", "--heads", "2", "--block-size", "16", "--sample-chars", "20"]
        if command == "lm-bpe":
            args += ["--tokenizer", "bpe", "--vocab-size", "300"]
        expect = "nats/token" if command == "lm-bpe" else "nats/char"
    elif command in ("translate", "translate-word"):
        for lang in ("en", "fr"):
            lines = open(os.path.join(d, "multi30k", f"train.{lang}")).read().splitlines()[:100]
            (small / f"s.{lang}").write_text("\n".join(lines) + "\n")
        args = ["translate", "--train-src", str(small / "s.en"), "--train-tgt", str(small / "s.fr"), "--test-src",
                str(small / "s.en"), "--test-tgt", str(small / "s.fr"), "--d-model", "16", "--heads", "2",
                "--layers", "1", "--d-ff", "32", "--max-len", "12", "--beam", "2"]
        if command == "translate-word":
            args += ["--tokenizer", "word"]
        expect = "lower-cased words" if command == "translate-word" else "cased, detokenized"
    else:
        args = ["demo", "--files", "2", "--layers", "1", "--embd", "16", "--heads", "2", "--block-size", "16",
                "--sample-chars", "20"]
        expect = "nats/char"
    args += ["--max-steps", "4", "--batch-size", "8", "--eval-every", "2", "--output-dir", str(tmp_path / "out"),
             "--quiet"]
    out = subprocess.run([sys.executable, "-m", "cpuformer", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert expect in out.stdout
    assert latest_checkpoint(str(tmp_path / "out")) is not None


def test_cli_reports_bad_paths_clearly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cpuformer", "lm", "--train", str(tmp_path / "missing.txt"), "--val",
                          str(tmp_path / "missing.txt")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "missing.txt" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------------------ trainer behaviour

def run_losses(steps, **kw):
    model, tok, ds = tiny_lm(dropout=0.1)
    trainer = Trainer(model, optimizer=AdamW(model, lr=3e-3), schedule=warmup_cosine(3e-3, 3, 12), seed=7,
                      quiet=True, **kw)
    trainer.fit(ds, max_steps=steps, batch_size=4, epochs=10)
    return trainer, [r["loss"] for r in trainer.history if "loss" in r]


def test_same_seed_same_loss_curve():
    _, a = run_losses(8)
    _, b = run_losses(8)
    assert a == b and len(a) == 8


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    _, full = run_losses(12)
    trainer, first = run_losses(5, output_dir=str(tmp_path), save_every=5)
    ckpt = latest_checkpoint(str(tmp_path))
    assert ckpt.endswith("checkpoint-5")
    # a fresh process-like start: new model with other initial weights, other RNG state
    model, tok, ds = tiny_lm(dropout=0.1, seed=99)
    nn.init.manual_seed(12345)
    resumed = Trainer(model, optimizer=AdamW(model, lr=3e-3), schedule=warmup_cosine(3e-3, 3, 12), seed=7,
                      quiet=True, output_dir=str(tmp_path))
    resumed.fit(ds, max_steps=12, batch_size=4, epochs=10, resume_from="latest")
    losses = [r["loss"] for r in resumed.history if "loss" in r]
    assert losses == full  # bitwise: same weights, moments, data order and dropout masks
    history_file = open(os.path.join(tmp_path, "history.jsonl")).read().splitlines()
    assert len([line for line in history_file if '"loss"' in line]) == 12


def test_checkpoint_killed_halfway_leaves_previous_loadable(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_trainer_jobs import tiny_lm
        from cpuformer.train import Trainer, AdamW
        import cpuformer.train.trainer as tr
        model, tok, ds = tiny_lm()
        t = Trainer(model, optimizer=AdamW(model, lr=1e-3), quiet=True, output_dir={str(tmp_path)!r})
        t.fit(ds, max_steps=2, batch_size=4)          # writes checkpoint-2 at the end
        real = tr.save_safetensors
        def dying(path, *a, **k):
            real(path, *a, **k)
            if path.endswith("optimizer.safetensors"):
                os._exit(17)                          # killed between files of checkpoint-4
        tr.save_safetensors = dying
        t.fit(ds, max_steps=4, batch_size=4)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 17, out.stderr[-1500:]
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-2")
    model, tok, ds = tiny_lm(seed=5)
    t = Trainer(model, optimizer=AdamW(model, lr=1e-3), quiet=True)
    t.load_checkpoint(latest_checkpoint(str(tmp_path)))
    assert t.step == 2


def test_gradient_accumulation_matches_a_bigger_batch():
    def final_weights(batch, accum):
        model, tok, ds = tiny_lm()
        t = Trainer(model, optimizer=AdamW(model, lr=1e-2), grad_accum_steps=accum, quiet=True, seed=3)
        t.fit(ds, max_steps=3, batch_size=batch)
        return model.wte.weight.data.copy(), [r["loss"] for r in t.history]

    w1, l1 = final_weights(8, 1)
    w2, l2 = final_weights(4, 2)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    np.testing.assert_allclose(w1, w2, rtol=1e-4, atol=1e-6)


def test_nonfinite_loss_stops_with_step_and_skip_mode_skips():
    model, tok, ds = tiny_lm()
    model.wte.weight.data[5, 0] = np.nan
    t = Trainer(model, optimizer=AdamW(model, lr=1e-3), quiet=True)
    with pytest.raises(FloatingPointError, match="step 1: the loss is not finite"):
        t.fit(ds, max_steps=2, batch_size=4)

    class NanGradLoss:
        ignore_index = -100

        def __call__(self, outputs, targets, grad_scale=1.0, need_grad=True):
            g = np.zeros_like(outputs)
            g[0, 0, 0] = np.inf
            return 1.0, g, int(np.asarray(targets).size)

    model, tok, ds = tiny_lm()
    t = Trainer(model, NanGradLoss(), AdamW(model, lr=1e-3), quiet=True)
    with pytest.raises(FloatingPointError, match=r"step 1: non-finite gradient in parameter 'wte.weight'"):
        t.fit(ds, max_steps=1, batch_size=4)
    before = model.ln_f.weight.data.copy()
    t = Trainer(model, NanGradLoss(), AdamW(model, lr=1e-3), quiet=True, on_nonfinite="skip")
    t.fit(ds, max_steps=2, batch_size=4, epochs=1)
    assert t.skipped_steps > 0 and t.step == 0
    np.testing.assert_array_equal(model.ln_f.weight.data, before)


def test_early_stopping_and_callbacks():
    model, tok, ds = tiny_lm()
    stopper = EarlyStopping("val_loss", patience=1, mode="max")  # "max" of a falling loss never improves after 1st
    t = Trainer(model, optimizer=AdamW(model, lr=3e-3), eval_every=1, callbacks=[stopper], quiet=True)
    t.fit(ds, ds, max_steps=20, batch_size=4)
    assert t.step == 2


def test_predict_and_evaluate_keep_training_mode():
    model, tok, ds = tiny_lm(dropout=0.2)
    t = Trainer(model, optimizer=AdamW(model, lr=1e-3), schedule=constant(1e-3), metrics=["accuracy", "perplexity"],
                quiet=True)
    out = t.predict(ds, batch_size=7)
    assert out.shape == (len(ds), 16, tok.vocab_size)
    res = t.evaluate(ds)
    assert set(res) == {"loss", "accuracy", "perplexity"} and model.training


# ------------------------------------------------------------------------------------------------ generation

def test_kv_cache_generation_equals_generation_without_cache():
    model, tok, ds = tiny_lm()
    t = Trainer(model, optimizer=AdamW(model, lr=3e-3), quiet=True)
    t.fit(ds, max_steps=20, batch_size=8)
    prompt = np.array([tok.encode("the qu"), tok.encode("lazy d")])
    for kw in (dict(greedy=True), dict(do_sample=True, temperature=0.9, top_k=5, seed=3),
               dict(do_sample=True, temperature=1.2, top_p=0.8, seed=4)):
        a = model.generate(prompt, 8, use_cache=True, **kw)
        b = model.generate(prompt, 8, use_cache=False, **kw)
        np.testing.assert_array_equal(a, b)
    long = model.generate(prompt[:1], 30, greedy=True)  # past block_size: falls back to the sliding window
    assert long.shape == (1, 36)


def test_sampling_filters():
    from cpuformer.models import sample_next
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    draws = [int(sample_next(logits, rng, top_k=2)[0]) for _ in range(300)]
    assert set(draws) == {0, 1}
    draws = [int(sample_next(logits, rng, top_p=0.7)[0]) for _ in range(300)]
    assert set(draws) == {0, 1}
    assert int(sample_next(logits, rng, greedy=True)[0]) == 0
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, rng, top_p=0.0)


def test_model_input_errors():
    model, tok, ds = tiny_lm()
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(np.zeros((1, 17), np.int64))
    with pytest.raises(TypeError, match="integer"):
        model(np.zeros((1, 4)))
    with pytest.raises(IndexError, match="out of range"):
        model(np.full((1, 4), 999))
    with pytest.raises(ValueError, match="pooling"):
        TransformerClassifier(10, 2, pooling="max")
    assert cpuformer.get_num_threads() >= 1


# ------------------------------------------------------------------------------------------------ attention maps

def test_attention_weights_can_be_pulled_from_every_layer(tmp_path):
    model, tok, ds = tiny_lm()
    nn.record_attention(model)
    ids = np.array([tok.encode("the lazy dog")])
    model(ids)
    maps = nn.attention_maps(model)
    assert sorted(maps) == ["blocks.0.self_attn", "blocks.1.self_attn"]
    w = maps["blocks.0.self_attn"]
    assert w.shape == (1, 2, 12, 12)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    assert np.allclose(np.triu(w[0, 0], 1), 0)  # causal
    pytest.importorskip("matplotlib")
    from cpuformer.plot import attention_heatmap
    path = attention_heatmap(w[0], str(tmp_path / "attn.png"), list("the lazy dog"), list("the lazy dog"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_early_stopping_restores_the_best_weights():
    model, tok, ds = tiny_lm()
    seen = {}

    class Spy(Callback):
        def on_evaluate(self, trainer, logs):
            seen[trainer.step] = (logs["val_loss"], model.ln_f.weight.data.copy())

    stopper = EarlyStopping("val_loss", patience=3, mode="min", restore_best=True)
    t = Trainer(model, optimizer=AdamW(model, lr=0.5), eval_every=1, callbacks=[stopper, Spy()], quiet=True)
    t.fit(ds, ds, max_steps=12, batch_size=8)  # a huge learning rate: the loss soon gets worse
    best_step = min(seen, key=lambda s: seen[s][0])
    assert stopper.best_step == best_step
    np.testing.assert_array_equal(model.ln_f.weight.data, seen[best_step][1])
