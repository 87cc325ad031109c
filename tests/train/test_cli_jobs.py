"""The training commands' surface: --steps, the output folder (model + tokenizer + job.json, loadable; the best
weights after early stopping), resume and Ctrl-C messages, one-line user errors (exit 2), --help and --version,
the hooks for the inference and serving commands. Tiny synthetic data, a few steps each."""
from __future__ import annotations

import csv
import glob
import json
import os
import random
import signal
import subprocess
import sys
import types

import numpy as np
import pytest

import cpuformer
from cpuformer import cli
from cpuformer.data import SequenceClassificationDataset
from cpuformer.train import Trainer, latest_checkpoint, load_job

TINY_LM = ["--layers", "1", "--embd", "16", "--heads", "2", "--block-size", "16", "--sample-chars", "5",
           "--batch-size", "8", "--threads", "1"]
TINY_CLS = ["--d-model", "16", "--heads", "2", "--layers", "1", "--d-ff", "32", "--batch-size", "8", "--min-freq",
            "1", "--dropout", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "t.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 60)
    rng = random.Random(1)
    pos, neg = ["good", "great", "fine", "nice", "lovely"], ["bad", "awful", "poor", "sad", "ugly"]

    def rows(n):
        out = ["sentence\tlabel"]
        for i in range(n):
            w = rng.choice(pos if i % 2 else neg)
            out.append(f"this movie is {w} and {rng.choice(pos + neg)} {rng.choice(pos + neg)}\t"
                       + ("positive" if i % 2 else "negative"))
        return "\n".join(out) + "\n"

    (d / "n.tsv").write_text(rows(120))
    (d / "nv.tsv").write_text(rows(40))
    (d / "int.tsv").write_text("".join(f"word{i % 3} thing\t{i % 3}\n" for i in range(30)))
    (d / "folder").mkdir()
    (d / "empty.txt").write_text("  \n")
    (d / "latin1.txt").write_bytes("ok line\nanother\ncaf\xe9 au lait\n".encode("latin-1"))
    return d


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_lm_with_steps_writes_a_loadable_run_folder_by_default(files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "lm", "--train", files / "t.txt", "--steps", 6, *TINY_LM)
    assert code == 0, err
    (run_dir,) = glob.glob("runs/lm-*")
    assert out.count(run_dir) >= 2  # printed at the start and at the end
    assert "step 1/6" in out and "ETA" in out and "elapsed" in out
    job = load_job(run_dir)
    assert job.job == "lm" and job.meta["steps"] == 6 and type(job.model).__name__ == "GPT"
    ids = job.tokenizer.encode("the fox")
    assert job.tokenizer.decode(job.model.generate(np.array([ids]), 3)[0]).startswith("the fox")
    with open(os.path.join(run_dir, "history.csv")) as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table if r["loss"]] == list(range(1, 7))
    assert latest_checkpoint(run_dir).endswith("checkpoint-6")


def test_classify_saves_vocabulary_labels_and_the_best_weights(files, tmp_path, capsys):
    out_dir = tmp_path / "cls"
    code, out, err = run(capsys, "classify", "--train", files / "n.tsv", "--val", files / "nv.tsv", "--steps", 30,
                         "--eval-every", 1, "--patience", 100, "--lr", 0.03, "--output-dir", out_dir, *TINY_CLS)
    assert code == 0, err
    evals = [json.loads(line) for line in open(out_dir / "history.jsonl") if '"val_accuracy"' in line]
    best = max(r["val_accuracy"] for r in evals)
    assert evals[-1]["val_accuracy"] < best  # the case: the last evaluation is worse than the best
    job = load_job(str(out_dir))
    assert job.labels == ["negative", "positive"] and job.meta["max_len"] == 64
    rows = [line.split("\t") for line in open(files / "nv.tsv").read().splitlines()[1:]]
    ds = SequenceClassificationDataset([job.tokenizer.encode(t) or [job.tokenizer.unk_id] for t, _ in rows],
                                       [job.labels.index(label) for _, label in rows], pad_id=job.tokenizer.pad_id)
    accuracy = Trainer(job.model, metrics=["accuracy"], quiet=True).evaluate(ds)["accuracy"]
    assert accuracy == pytest.approx(best)  # the saved model is the best one, not the last


def test_classify_holds_out_validation_and_names_integer_labels(files, tmp_path, capsys):
    out_dir = tmp_path / "cls2"
    code, out, err = run(capsys, "classify", "--train", files / "int.tsv", "--steps", 4, "--labels", "a,b,c",
                         "--output-dir", out_dir, *TINY_CLS)
    assert code == 0, err
    assert "held out" in out and "val: accuracy" in out
    assert any("val_accuracy" in json.loads(line) for line in open(out_dir / "history.jsonl"))
    assert load_job(str(out_dir)).labels == ["a", "b", "c"]


def test_resume_says_where_it_continues(files, tmp_path, capsys):
    out_dir = tmp_path / "r"
    assert run(capsys, "lm", "--train", files / "t.txt", "--steps", 3, "--output-dir", out_dir, *TINY_LM)[0] == 0
    code, out, err = run(capsys, "lm", "--train", files / "t.txt", "--steps", 5, "--output-dir", out_dir, "--resume",
                         *TINY_LM)
    assert code == 0, err
    assert "resumed from checkpoint-3" in out and "step 4/5" in out
    assert json.load(open(out_dir / "job.json"))["steps"] == 5


def test_ctrl_c_saves_checkpoint_and_model_and_exits_130(files, tmp_path):
    out_dir = tmp_path / "int"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "cpuformer", "lm", "--train", str(files / "t.txt"), "--steps",
                             "1000000", "--output-dir", str(out_dir), *TINY_LM], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted at step" in lines[0] and "Traceback" not in err
    ckpt = latest_checkpoint(str(out_dir))
    assert ckpt is not None and os.path.exists(out_dir / "model.safetensors")
    step = int(ckpt.rsplit("-", 1)[1])
    assert load_job(str(out_dir)).meta["steps"] == step and f"checkpoint-{step}" in lines[0]


@pytest.mark.parametrize("argv, words", [
    (["lm", "--train", "{d}/folder"], ["folder", "is a directory"]),
    (["lm", "--train", "{d}/t.txt", "--batch-size", "0"], ["--batch-size", "at least 1"]),
    (["lm", "--train", "{d}/t.txt", "--steps", "-3"], ["--steps", "at least 1"]),
    (["lm", "--train", "{d}/t.txt", "--lr", "abc"], ["--lr", "expected a number"]),
    (["lm", "--train", "{d}/empty.txt"], ["empty.txt", "empty"]),
    (["lm", "--train", "{d}/latin1.txt"], ["latin1.txt:3", "UTF-8"]),
    (["classify", "--train", "{d}/latin1.txt"], ["latin1.txt:3", "UTF-8"]),
    (["classify", "--train", "{d}/missing.tsv"], ["missing.tsv", "no such file"]),
    (["classify", "--steps", "2"], ["--train is required"]),
    (["translate", "--train-src", "{d}/t.txt"], ["--train-tgt"]),
    (["lm", "--train", "{d}/t.txt", "--embd", "10", "--heads", "3", "--steps", "1"], ["multiple of --heads"]),
])
def test_user_mistakes_are_one_line_and_exit_2(files, tmp_path, capsys, argv, words):
    argv = [a.format(d=files) for a in argv] + ["--output-dir", str(tmp_path / "o")]
    try:
        code, _, err = run(capsys, *argv)
    except SystemExit as exc:  # argparse's own checks
        code, err = exc.code, capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]
    assert not os.path.exists(tmp_path / "o")  # nothing written for a refused command


def test_unknown_prompt_characters_are_dropped_with_a_note(files, tmp_path, capsys):
    code, out, err = run(capsys, "lm", "--train", files / "t.txt", "--steps", 1, "--prompt", "the ✓fox",
                         "--output-dir", tmp_path / "p", *TINY_LM)
    assert code == 0 and "dropped" in err and "✓" in err and len(err.strip().splitlines()) == 1


def test_help_lists_every_option_with_its_default_and_the_input_format():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("demo", "lm", "classify", "translate"):
        p = subparsers[name]
        text = " ".join(p.format_help().split())
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
                assert "default" in p._get_formatter()._get_help_string(action), (name, action.option_strings)
        assert "(default: 32)" in text or name in ("classify", "translate")
    assert "TAB" in subparsers["classify"].format_help()
    assert "line-aligned" in subparsers["translate"].format_help()
    assert "UTF-8" in subparsers["lm"].format_help()
    args = parser.parse_args(["demo"])
    cli._budget(args, cli.DEMO_STEPS)
    assert args.steps == cli.DEMO_STEPS and args.minutes is None  # the demo: a fixed number of steps


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"cpuformer {cpuformer.__version__}"


def test_hooks_for_inference_and_serving_commands(monkeypatch, capsys):
    """Inference commands go whole to cpuformer.commands.main_inference (classify / translate when a MODEL comes
    instead of --train); serve goes to cpuformer.serving."""
    calls = []
    from cpuformer import commands
    monkeypatch.setattr(commands, "main_inference", lambda argv: calls.append(list(argv)) or 0)
    serving = types.ModuleType("cpuformer.serving")
    serving.add_parser = lambda sub: sub.add_parser("serve").add_argument("--port", type=int, default=8000)
    serving.run = lambda args: calls.append(("serve", args.port)) or 0
    monkeypatch.setitem(sys.modules, "cpuformer.serving", serving)
    assert cli.main(["classify", "runs/x", "a text", "another", "--top-k", "2"]) == 0
    assert cli.main(["translate", "runs/y", "hello"]) == 0
    assert cli.main(["embed", "m", "t"]) == 0
    assert cli.main(["serve", "--port", "9"]) == 0
    assert calls == [["classify", "runs/x", "a text", "another", "--top-k", "2"], ["translate", "runs/y", "hello"],
                     ["embed", "m", "t"], ("serve", 9)]
