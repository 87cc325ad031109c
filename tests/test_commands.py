"""The inference commands (cpuformer.commands: embed, classify, generate, translate, qa) through main_inference,
against the pipelines they run: inputs from arguments, --input files and standard input, JSON lines and text output,
errors as one line."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from cpuformer.commands import main_inference  # noqa: E402
from cpuformer.pipelines import pipeline  # noqa: E402

from test_pipelines import (TEXTS, bert_model, bert_qa, bert_seqcls, gpt2_bpe, own_seq2seq, pc,  # noqa: E402,F401
                            tmp)


class _Stdin:
    def __init__(self, data: bytes):
        self.buffer = io.BytesIO(data)


def run(argv, stdin=b""):
    out = io.StringIO()
    rc = main_inference(argv, stdin=_Stdin(stdin), stdout=out)
    return rc, out.getvalue()


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines()]


def test_classify_arguments_file_and_stdin(bert_seqcls, tmp_path):
    path = bert_seqcls[0]
    want = pipeline("text-classification", path)(TEXTS)
    rc, out = run(["classify", path, *TEXTS, "--batch-size", "2"])
    assert rc == 0
    assert _json_lines(out) == pipeline("text-classification", path, batch_size=2)(TEXTS)
    assert _json_lines(run(["classify", path, *TEXTS])[1]) == want
    f = tmp_path / "in.txt"
    f.write_text("\n".join(TEXTS[:2]) + "\n\n", encoding="utf-8")
    assert _json_lines(run(["classify", path, "--input", str(f)])[1]) == pipeline("text-classification", path)(
        TEXTS[:2])
    assert _json_lines(run(["classify", path], stdin="\r\n".join(TEXTS).encode())[1]) == want
    rc, out = run(["classify", path, TEXTS[0], "--top-k", "2", "--format", "text"])
    top = pipeline("text-classification", path)(TEXTS[0], top_k=2)
    assert out == "\t".join(f"{r['label']}\t{r['score']:.6f}" for r in top) + "\n"
    rc, out = run(["classify", path, TEXTS[0], "--top-k", "3"])
    assert _json_lines(out)[0]["top_k"] == pipeline("text-classification", path)(TEXTS[0], top_k=3)


def test_input_that_is_not_utf8_is_one_line_naming_file_and_line(bert_seqcls, tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes("fine\ncaf\xe9\n".encode("latin-1"))
    rc, out = run(["classify", bert_seqcls[0], "--input", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and f"{f}:2: not UTF-8" in err
    rc, _ = run(["classify", bert_seqcls[0]], stdin=b"ok\n\xff\xfe\n")
    assert rc == 2 and "<stdin>:2: not UTF-8" in capsys.readouterr().err
    rc, _ = run(["classify", str(tmp_path / "nowhere"), "x"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("cpuformer classify: error:") and err.count("\n") == 1


def test_embed(bert_model, tmp):
    path = pc.write_st_dir(tmp / "st_cmd", bert_model[0], ["mean"], normalize=True)
    want = pipeline("sentence-embedding", path)(TEXTS[:3])
    rc, out = run(["embed", path, *TEXTS[:3]])
    assert rc == 0
    got = np.array([r["embedding"] for r in _json_lines(out)], np.float32)
    np.testing.assert_array_equal(got, want)
    rc, out = run(["embed", path, TEXTS[0], "--format", "text"])
    np.testing.assert_allclose(np.array(out.split(), np.float32), want[0], atol=1e-6)


def test_generate_and_stream(gpt2_bpe):
    path = gpt2_bpe[0]
    prompts = ["the cat", "a dog ran"]
    want = [r[0] for r in pipeline("text-generation", path)(prompts, max_new_tokens=7)]
    rc, out = run(["generate", path, *prompts, "--max-new-tokens", "7"])
    assert rc == 0 and _json_lines(out) == want
    rc, out = run(["generate", path, *prompts, "--max-new-tokens", "7", "--format", "text", "--stream"])
    assert out == "".join(w["generated_text"] + "\n" for w in want)
    sampled = pipeline("text-generation", path)("the cat", max_new_tokens=7, do_sample=True, seed=5, top_k=20,
                                                return_full_text=False)
    rc, out = run(["generate", path, "the cat", "--max-new-tokens", "7", "--do-sample", "--seed", "5", "--top-k", "20",
                   "--no-prompt"])
    assert _json_lines(out) == sampled


def test_translate_cpuformer_model(own_seq2seq):
    path = own_seq2seq[0]
    want = [r[0] for r in pipeline("translation", path)(TEXTS[:3], num_beams=2, max_new_tokens=6)]
    rc, out = run(["translate", path, *TEXTS[:3], "--num-beams", "2", "--max-new-tokens", "6"])
    assert rc == 0 and _json_lines(out) == want
    rc, out = run(["translate", path, TEXTS[0], "--num-beams", "2", "--max-new-tokens", "6", "--format", "text"])
    assert out == want[0]["translation_text"] + "\n"


def test_qa_question_option_and_tab_lines(bert_qa, capsys):
    path = bert_qa[0]
    q = "where did the cat sit ?"
    pipe = pipeline("question-answering", path)
    want = [pipe(question=q, context=c) for c in TEXTS[:2]]
    rc, out = run(["qa", path, "--question", q, *TEXTS[:2]])
    assert rc == 0
    got = _json_lines(out)
    for g, w in zip(got, want):
        assert g == {"answer": w["answer"], "score": w["score"], "start": w["start"], "end": w["end"]}
    rc, out = run(["qa", path], stdin="".join(f"{q}\t{c}\n" for c in TEXTS[:2]).encode())
    assert _json_lines(out) == got
    rc, _ = run(["qa", path, "no tab here"])
    assert rc == 2 and "question<TAB>context" in capsys.readouterr().err


def test_help_lists_defaults_and_input_format(capsys):
    for name, needles in (("generate", ["--max-new-tokens", "default: 50", "--temperature", "default: 1.0",
                                        "standard input", "--stream"]),
                          ("classify", ["--top-k", "default: 1", "--batch-size", "default: 8", "--input FILE"]),
                          ("qa", ["question<TAB>context", "--question"]),
                          ("translate", ["--num-beams"]), ("embed", ["--normalize"])):
        with pytest.raises(SystemExit):
            main_inference([name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for n in needles:
            assert n in text, (name, n)


def test_add_inference_parser_and_run_inference(bert_seqcls):
    """What cli.py hooks in: a subparser per command and run_inference on the parsed arguments."""
    import argparse
    from cpuformer.commands import add_inference_parser, run_inference
    parser = argparse.ArgumentParser(prog="cpuformer")
    sub = parser.add_subparsers(dest="command")
    for name in ("embed", "classify", "generate", "translate", "qa"):
        add_inference_parser(sub, name)
    args = parser.parse_args(["classify", bert_seqcls[0], TEXTS[0], "--format", "text"])  # TEXT before options
    out = io.StringIO()
    assert run_inference(args, stdin=_Stdin(b""), stdout=out) == 0
    best = pipeline("text-classification", bert_seqcls[0])(TEXTS[0])[0]
    assert out.getvalue() == f"{best['label']}\t{best['score']:.6f}\n"
    with pytest.raises(ValueError, match="unknown inference command"):
        add_inference_parser(sub, "lm")
