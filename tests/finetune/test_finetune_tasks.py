"""The finetune job's token-classification and question-answering tasks (issue 17): their preprocessing against
transformers' run_ner / run_qa preprocessing, short training runs whose saved folders load in the pipelines and in
transformers, and one-line errors for bad input lines. Tiny random BERT with a WordPiece tokenizer (ft_bert_tok)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from ft_testlib import H

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cpuformer  # noqa: E402
from cpuformer import cli, finetune  # noqa: E402
from cpuformer.models import from_pretrained  # noqa: E402

WORDS = sorted({w for s in H.SENTENCES for w in s.split()})


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cpuformer", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=180)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tagged_rows(seed, n, tags=("B-X", "I-X", "B-Y", "O")):
    """Sentences of random vocabulary words; each word has a fixed random tag (learnable)."""
    rng = np.random.default_rng(seed)
    tag_of = {w: tags[int(rng.integers(len(tags)))] for w in WORDS}
    rows = []
    for _ in range(n):
        words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), int(rng.integers(3, 12)))]
        rows.append({"tokens": words, "tags": [tag_of[w] for w in words]})
    return rows


def squad_rows(seed, n, unanswerable=0.0, sentences=(2, 4)):
    """Contexts of random sentences; the answer is a random run of 1-3 words, named by the question (learnable);
    a share of the examples has no answer."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        picks = rng.choice(len(H.SENTENCES), int(rng.integers(*sentences)), replace=False)
        context = " ".join(H.SENTENCES[i] for i in picks)
        words = context.split(" ")
        k = int(rng.integers(len(words)))
        m = min(len(words) - k, int(rng.integers(1, 4)))
        start = len(" ".join(words[:k])) + (1 if k else 0)
        text = " ".join(words[k:k + m])
        assert context[start:start + len(text)] == text
        if rng.random() < unanswerable:
            answers = {"text": [], "answer_start": []}
        else:
            answers = {"text": [text], "answer_start": [start]}
        rows.append({"question": f"{words[k]} ?", "context": context, "answers": answers})
    return rows


def _hf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(str(path))


# ----------------------------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("max_len", [10, 64])
def test_token_labels_match_run_ner(ft_bert_tok, tmp_path, max_len):
    """Ids and labels equal transformers' run_ner preprocessing (is_split_into_words, the first sub-token of each
    word labelled, the rest -100), truncation included."""
    rows = tagged_rows(1, 20)
    for r in rows[:5]:  # words that split into several sub-tokens and punctuation inside a word
        r["tokens"][0] += ",42"
    model = from_pretrained(ft_bert_tok, trainable=True, task="token-classification", num_labels=4, verbose=False)
    path = _write_jsonl(tmp_path / "t.jsonl", rows)
    parsed = finetune._tagged(str(path), "--train")
    names = sorted({t for r in rows for t in r["tags"]})
    index = {n: i for i, n in enumerate(names)}
    data = finetune._token_classify_data(model, parsed, index, max_len)
    (ids, mask, types), labels = data[np.arange(len(rows))]
    hf = _hf_tokenizer(ft_bert_tok)
    enc = hf([r["tokens"] for r in rows], is_split_into_words=True, truncation=True, max_length=max_len)
    for b, r in enumerate(rows):
        want_ids = enc["input_ids"][b]
        n = len(want_ids)
        assert ids[b, :n].tolist() == want_ids and mask[b].sum() == n
        want, prev = [], None
        for w in enc.word_ids(b):
            want.append(-100 if w is None or w == prev else index[r["tags"][w]])
            prev = w
        assert labels[b, :n].tolist() == want
        assert (labels[b, n:] == -100).all()
    assert (labels != -100).sum() > 0


def _run_qa_features(hf, rows, max_len, stride):
    """transformers' run_qa prepare_train_features (pad_on_right, truncation only_second), one fix below."""
    enc = hf([r["question"] for r in rows], [r["context"] for r in rows], truncation="only_second",
             max_length=max_len, stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
             return_token_type_ids=True)
    out = []
    for i, ids in enumerate(enc["input_ids"]):
        r = rows[enc["overflow_to_sample_mapping"][i]]
        offsets, seq = enc["offset_mapping"][i], enc.sequence_ids(i)
        cls = ids.index(hf.cls_token_id)
        ans = r["answers"]
        if not ans["answer_start"]:
            out.append((ids, enc["token_type_ids"][i], (cls, cls)))
            continue
        start_char = ans["answer_start"][0]
        end_char = start_char + len(ans["text"][0])
        ts = seq.index(1)
        te = len(seq) - 1 - seq[::-1].index(1)
        if not (offsets[ts][0] <= start_char and offsets[te][1] >= end_char):
            out.append((ids, enc["token_type_ids"][i], (cls, cls)))
            continue
        # (run_qa's loop is not bounded to the context: when the answer starts at a window's last token it walks on
        # onto [SEP], whose offsets are (0, 0), and labels the start there, after the end)
        while ts < len(offsets) and seq[ts] == 1 and offsets[ts][0] <= start_char:
            ts += 1
        while offsets[te][1] >= end_char:
            te -= 1
        out.append((ids, enc["token_type_ids"][i], (ts - 1, te + 1)))
    return out


@pytest.mark.parametrize("max_len,stride", [(24, 4), (40, 10), (128, 32)])
def test_qa_windows_and_labels_match_run_qa(ft_bert_tok, tmp_path, max_len, stride):
    """Windows (ids, token types) and start/end labels equal transformers' run_qa preprocessing: long contexts cut
    into overlapping windows, a window without the answer and an unanswerable example pointing at CLS."""
    rows = squad_rows(2, 25, unanswerable=0.2)
    model = from_pretrained(ft_bert_tok, trainable=True, task="question-answering", verbose=False)
    examples = finetune._qa_examples(str(_write_jsonl(tmp_path / "q.jsonl", rows)), "--train")
    data = finetune._qa_data(model, examples, max_len, stride)
    want = _run_qa_features(_hf_tokenizer(ft_bert_tok), rows, max_len, stride)
    assert len(data) == len(want)
    if max_len == 24:
        assert len(data) > 2 * len(rows)  # several windows per context
    (ids, mask, types), labels = data[np.arange(len(data))]
    for f, (w_ids, w_types, w_label) in enumerate(want):
        n = len(w_ids)
        assert ids[f, :n].tolist() == w_ids and mask[f].sum() == n
        assert types[f, :n].tolist() == w_types
        assert tuple(labels[f]) == w_label, f
    inside = [f for f in range(len(data)) if labels[f, 0] > 0]
    assert inside and len(inside) < len(data)
    for f in inside:  # the labelled tokens cover exactly the answer's words
        n, ctx0, lo, _ = data.windows[f]
        offs, x = data.offsets[n], data.examples[n]
        s, e = labels[f] - ctx0 + lo
        assert x.context[offs[s][0]:offs[e][1]] == x.texts[0]


def test_qa_scores_exact_match_and_f1():
    assert finetune._normalize_answer("The  Cat, sat!") == "cat sat"
    assert finetune._f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    assert finetune._f1("dog", "cat") == 0.0


# ----------------------------------------------------------------------------------------------- the jobs

def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "history.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_finetune_job_token_classify(ft_bert_tok, tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", tagged_rows(3, 48))
    _write_jsonl(tmp_path / "val.jsonl", tagged_rows(3, 48)[:12])
    out = tmp_path / "ner"
    r = _cli("finetune", ft_bert_tok, "--task", "token-classify", "--train", "train.jsonl", "--val", "val.jsonl",
             "--steps", 60, "--batch-size", 8, "--lr", 3e-3, "--warmup", 0, "--output-dir", out, "--quiet",
             "--threads", 1, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    losses = _losses(out)
    assert np.mean(losses[-6:]) < 0.5 * np.mean(losses[:3]), losses
    accuracy = float(re.search(r"token accuracy ([0-9.]+)", r.stdout).group(1))
    assert accuracy > 0.8, r.stdout  # (each word's tag is a fixed function of the word; 4 tags)
    names = ["B-X", "B-Y", "I-X", "O"]
    model = from_pretrained(out)
    assert model.head == "token-classification" and model.id2label == dict(enumerate(names))
    pipe = cpuformer.pipeline("token-classification", str(out))
    text = "the cat sat on the mat ."
    ents = pipe(text, ignore_labels=[])
    assert len(ents) == len(text.split()) and all(e["entity"] in names for e in ents)
    assert [text[e["start"]:e["end"]] for e in ents] == text.split()
    ref = transformers.AutoModelForTokenClassification.from_pretrained(str(out)).eval()
    assert ref.config.id2label == dict(enumerate(names))
    ids = np.array([[2, 10, 11, 12, 3]])
    got = ref(input_ids=torch.tensor(ids)).logits.detach().numpy()
    assert np.abs(got - model(ids)).max() < 1e-4 * np.abs(got).max()


def test_finetune_job_qa_lora(ft_bert_tok, tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", squad_rows(4, 40, unanswerable=0.1))
    _write_jsonl(tmp_path / "val.jsonl", squad_rows(5, 10))
    out = tmp_path / "qa"
    r = _cli("finetune", ft_bert_tok, "--task", "qa", "--train", "train.jsonl", "--val", "val.jsonl", "--steps", 40,
             "--batch-size", 8, "--lr", 1e-2, "--warmup", 0, "--lora", 4, "--max-len", 48, "--doc-stride", 8,
             "--output-dir", out, "--quiet", "--threads", 1, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    losses = _losses(out)
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:3]), losses
    assert "exact match" in r.stdout and "F1" in r.stdout
    assert (out / "lora" / "adapter_config.json").is_file()
    model = from_pretrained(out)
    assert model.head == "question-answering"
    pipe = cpuformer.pipeline("question-answering", str(out))
    context = H.SENTENCES[0] + " " + H.SENTENCES[1]
    ans = pipe(question="cat ?", context=context)
    assert 0 <= ans["start"] < ans["end"] <= len(context) and ans["answer"] == context[ans["start"]:ans["end"]]
    ref = transformers.AutoModelForQuestionAnswering.from_pretrained(str(out)).eval()  # qa_outputs sized 2
    ids = np.array([[2, 10, 11, 3, 12, 13, 14, 3]])
    o = ref(input_ids=torch.tensor(ids))
    start, end = model(ids)
    assert np.abs(o.start_logits.detach().numpy() - start).max() < 1e-4
    assert np.abs(o.end_logits.detach().numpy() - end).max() < 1e-4


def test_max_len_is_cut_to_the_model_positions(ft_bert_tok, tmp_path):
    """The default --max-len 128 on a 64-position model: windows of long contexts are cut to 64 tokens (with the
    default stride derived from it) instead of failing at the first full window."""
    _write_jsonl(tmp_path / "train.jsonl", squad_rows(6, 6, sentences=(6, 7)))
    r = _cli("finetune", ft_bert_tok, "--task", "qa", "--train", "train.jsonl", "--steps", 2, "--batch-size", 4,
             "--output-dir", tmp_path / "out", "--quiet", "--threads", 1, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--max-len 128 is more than the model's 64 positions: using 64" in r.stdout
    examples = finetune._qa_examples(str(tmp_path / "train.jsonl"), "--train")
    model = from_pretrained(ft_bert_tok, trainable=True, task="question-answering", verbose=False)
    (ids, _, _), _ = finetune._qa_data(model, examples, 64, 16)[np.arange(6)]
    assert ids.shape[1] == 64  # (these contexts do fill a window)


# ----------------------------------------------------------------------------------------------- bad inputs

_QA_OK = {"question": "cat ?", "context": "the cat sat .", "answers": {"text": ["cat"], "answer_start": [4]}}
_TAG_OK = {"tokens": ["the", "cat"], "tags": ["O", "B-X"]}


def _bad(task, line, *fragments):
    return pytest.param(task, line, fragments, id=f"{task}:{fragments[0]}")


@pytest.mark.parametrize("task,line,fragments", [
    _bad("qa", '{"question": "q", "context": "c"}', 'no "answers"'),
    _bad("qa", '{"context": "c", "answers": {"text": [], "answer_start": []}}', 'no "question"'),
    _bad("qa", json.dumps({**_QA_OK, "answers": {"text": ["sat ."], "answer_start": [11]}}), "beyond the context",
         "answer_start[0] 11"),
    _bad("qa", json.dumps({**_QA_OK, "answers": {"text": ["cat"], "answer_start": [5]}}), "is not at answer_start 5"),
    _bad("qa", json.dumps({**_QA_OK, "answers": {"text": ["cat"], "answer_start": [-1]}}), "answer_start[0] must be"),
    _bad("qa", json.dumps({**_QA_OK, "answers": {"text": ["cat", "the"], "answer_start": [4]}}),
         "2 answers.text but 1 answers.answer_start"),
    _bad("qa", json.dumps({**_QA_OK, "answers": ["cat"]}), '"answers" must be'),
    _bad("qa", '{"question": "q", "context": ', "not a JSON object"),
    _bad("qa", '["q", "c"]', "expected a JSON object, got list"),
    _bad("token-classify", '{"tokens": ["a", "b", "c"], "tags": ["O", "O"]}', "3 tokens but 2 tags"),
    _bad("token-classify", '{"tokens": ["a", "b"]}', 'no "tags"'),
    _bad("token-classify", '{"tokens": [], "tags": []}', '"tokens" must be a non-empty list'),
    _bad("token-classify", '{"tokens": ["a"], "tags": [3]}', '"tags" must be a list of tag names'),
])
def test_bad_input_lines_are_one_line_errors(ft_bert_tok, tmp_path, capsys, task, line, fragments):
    good = json.dumps(_QA_OK if task == "qa" else _TAG_OK)
    path = tmp_path / "train.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    code = cli.main(["finetune", str(ft_bert_tok), "--task", task, "--train", str(path), "--steps", "1",
                     "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"--train {path}:3: " in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_one_line_errors(ft_bert_tok, tmp_path, capsys):
    qa = _write_jsonl(tmp_path / "qa.jsonl", [_QA_OK])
    tags = _write_jsonl(tmp_path / "tags.jsonl", [_TAG_OK])
    val = _write_jsonl(tmp_path / "val.jsonl", [_TAG_OK, {"tokens": ["a"], "tags": ["B-Z"]}])
    for argv, fragment in (
            (["--task", "qa", "--train", qa, "--max-len", "32", "--doc-stride", "20"], "--doc-stride 20: must be"),
            (["--task", "token-classify", "--train", tags, "--doc-stride", "4"], "--doc-stride is for --task qa"),
            (["--task", "token-classify", "--train", tags, "--val", val], "'B-Z' do not occur in --train"),
            (["--task", "qa", "--train", tmp_path / "missing.jsonl"], "no such file")):
        code = cli.main(["finetune", str(ft_bert_tok), *map(str, argv), "--steps", "1", "--output-dir",
                         str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and fragment in err, err


def test_task_head_mismatch(ft_bert_seqcls, tmp_path, capsys):
    """A checkpoint with another task's head is refused, naming what --task needs."""
    tags = _write_jsonl(tmp_path / "tags.jsonl", [_TAG_OK])
    code = cli.main(["finetune", str(ft_bert_seqcls[0]), "--task", "token-classify", "--train", str(tags),
                     "--steps", "1", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "ForTokenClassification" in err and err.count("\n") == 1, err
