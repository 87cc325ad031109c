"""Trainer.fit as Keras: numpy arrays (x, y) or ((x, y)), validation_data, validation_split (the last fraction),
shuffle; max_time; history.csv and TensorBoard scalars; Ctrl-C inside fit; GPT.generate greedy by default."""
from __future__ import annotations

import csv
import importlib.machinery
import os
import signal
import sys
import types

import numpy as np
import pytest

import cpuformer.nn as nn
from cpuformer.data import ArrayDataset
from cpuformer.models import GPT, TransformerClassifier
from cpuformer.train import AdamW, Callback, Trainer, latest_checkpoint


def data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 10, size=(n, 6))
    y = (x[:, 0] > 5).astype(np.int64)
    return x, y


def classifier(**kw):
    nn.init.manual_seed(0)
    model = TransformerClassifier(10, 2, d_model=8, nhead=2, num_layers=1, dim_feedforward=16, dropout=0.0,
                                  max_len=6)
    return model, Trainer(model, optimizer=AdamW(model, lr=1e-2), metrics=["accuracy"], quiet=True, **kw)


def losses(history):
    return [r["loss"] for r in history if "loss" in r]


def test_fit_with_arrays_as_keras():
    x, y = data()
    _, t1 = classifier()
    h1 = t1.fit(x, y, batch_size=8, epochs=2)
    _, t2 = classifier()
    h2 = t2.fit((x, y), batch_size=8, epochs=2)
    _, t3 = classifier()
    h3 = t3.fit(x=x, y=y, batch_size=8, epochs=2)
    assert len(losses(h1)) == 10 and losses(h1) == losses(h2) == losses(h3)


def test_shuffle_false_takes_the_samples_in_order():
    x, y = data()
    model, t = classifier()
    first = t.evaluate(ArrayDataset(x[:8], y[:8]))["loss"]
    t.fit(x, y, batch_size=8, epochs=1, shuffle=False)
    assert t.history[0]["loss"] == pytest.approx(first, rel=1e-5)


def test_validation_split_is_the_last_fraction_and_validation_data_is_used():
    x, y = data()
    _, t = classifier()
    t.fit(x, y, batch_size=8, epochs=2, validation_split=0.25)
    assert len(losses(t.history)) == 2 * 4  # 30 training samples: 4 batches an epoch
    last_val = [r for r in t.history if "val_loss" in r][-1]
    assert last_val["val_loss"] == pytest.approx(t.evaluate(ArrayDataset(x[30:], y[30:]))["loss"], rel=1e-6)
    xv, yv = data(12, seed=1)
    _, t = classifier()
    t.fit(x, y, batch_size=8, epochs=1, validation_data=(xv, yv))
    last_val = [r for r in t.history if "val_loss" in r][-1]
    assert last_val["val_accuracy"] == pytest.approx(t.evaluate(ArrayDataset(xv, yv))["accuracy"])
    with pytest.raises(ValueError, match="validation_split"):
        t.fit(x, y, validation_split=1.5)


def test_history_csv_and_tensorboard_scalars(tmp_path, monkeypatch):
    scalars = []

    class SummaryWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

    fake = types.ModuleType("tensorboardX")
    fake.SummaryWriter = SummaryWriter
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorboardX", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", fake)
    x, y = data()
    _, t = classifier(output_dir=str(tmp_path), eval_every=2)
    t.fit(x, y, batch_size=8, epochs=1, validation_split=0.2)
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(t.history) == len(open(tmp_path / "history.jsonl").read().splitlines())
    assert {"step", "loss", "lr", "val_loss", "val_accuracy"} <= set(rows[0])
    assert [float(r["loss"]) for r in rows if r["loss"]] == pytest.approx(losses(t.history))
    assert ("loss", t.history[0]["loss"], 1) in scalars and any(tag == "val_accuracy" for tag, _, _ in scalars)


def test_history_csv_without_tensorboard(tmp_path):
    x, y = data()
    _, t = classifier(output_dir=str(tmp_path))
    t.fit(x, y, batch_size=8, epochs=1)
    assert os.path.exists(tmp_path / "history.csv") and not os.path.exists(tmp_path / "tensorboard")


def test_max_time_stops_the_run():
    x, y = data()
    _, t = classifier()
    t.fit(x, y, batch_size=8, epochs=100, max_time=1e-6)
    assert t.step == 1 and t.elapsed() > 0


def test_ctrl_c_stops_at_a_step_boundary_saves_and_raises(tmp_path):
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("another SIGINT handler is installed")
    x, y = data()

    class CtrlC(Callback):
        def on_step_end(self, trainer, logs):
            if trainer.step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    _, t = classifier(output_dir=str(tmp_path), callbacks=[CtrlC()])
    with pytest.raises(KeyboardInterrupt):
        t.fit(x, y, batch_size=4, epochs=5)
    assert t.interrupted and t.step in (3, 4)
    assert latest_checkpoint(str(tmp_path)).endswith(f"checkpoint-{t.step}")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_generate_is_greedy_by_default():
    nn.init.manual_seed(0)
    model = GPT(12, block_size=16, n_layer=1, n_head=2, n_embd=16)
    prompt = np.array([[1, 2, 3]])
    greedy = model.generate(prompt, 6)
    np.testing.assert_array_equal(greedy, model.generate(prompt, 6, do_sample=False))
    np.testing.assert_array_equal(greedy, model.generate(prompt, 6, greedy=True))
    np.testing.assert_array_equal(greedy, model.generate(prompt, 6, do_sample=False, temperature=3.0, seed=1))
    sampled = [model.generate(prompt, 6, do_sample=True, temperature=5.0, seed=s) for s in range(4)]
    assert any((s != greedy).any() for s in sampled)
    np.testing.assert_array_equal(sampled[0], model.generate(prompt, 6, temperature=5.0, seed=0))  # as before
    with pytest.raises(ValueError, match="contradict"):
        model.generate(prompt, 2, greedy=True, do_sample=True)
