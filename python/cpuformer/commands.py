"""Inference commands over :mod:`cpuformer.pipelines`: ``python -m cpuformer embed|classify|generate|translate|qa
MODEL [TEXT ...]``.

``add_inference_parser(subparsers, name)`` adds one command's parser, ``run_inference(args)`` runs it (returns the
exit status), ``main_inference(argv)`` parses and runs ``argv`` (``["embed", MODEL, ...]``) on its own.

Input: the TEXT arguments; else ``--input FILE``; else standard input. A file or standard input holds one text per
line (UTF-8; blank lines are skipped). ``qa`` takes contexts with ``--question Q``, or lines ``question<TAB>context``.
Output: one JSON object per input, per line (``--format json``, the default), or plain text (``--format text``).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import numpy as np

__all__ = ["add_inference_parser", "run_inference", "main_inference", "COMMANDS"]

COMMANDS = {
    "embed": ("sentence embeddings of texts", "sentence-embedding",
              'json: {"embedding": [...]} per text; text: the numbers separated by spaces'),
    "classify": ("classify texts", "text-classification",
                 'json: {"label", "score"} per text (with --top-k k > 1 also "top_k": [{"label", "score"}, ...]); '
                 "text: label<TAB>score"),
    "generate": ("continue prompts with a language model", "text-generation",
                 'json: {"generated_text": prompt + continuation} per prompt; text: the generated text'),
    "translate": ("translate texts with a sequence-to-sequence model", "translation",
                  'json: {"translation_text"} per text; text: the translation'),
    "qa": ("extract answers to questions from contexts", "question-answering",
           'json: {"answer", "score", "start", "end"} per context (character offsets); text: the answer'),
}

_INPUT = ("Input: the TEXT arguments; else --input FILE; else standard input, one text per line (UTF-8, blank lines "
          "skipped).")


def _description(name: str) -> str:
    help_, task, output = COMMANDS[name]
    extra = " For qa: contexts, with --question Q, or lines question<TAB>context." if name == "qa" else ""
    return f"{help_[0].upper()}{help_[1:]} ({task} pipeline). {_INPUT}{extra} Output: one line per input; {output}."


def add_inference_parser(subparsers, name: str) -> argparse.ArgumentParser:
    """Add the parser of inference command ``name`` (embed, classify, generate, translate, qa) to ``subparsers``
    (from ``ArgumentParser.add_subparsers``) and return it."""
    if name not in COMMANDS:
        raise ValueError(f"unknown inference command {name!r}; the commands are {', '.join(COMMANDS)}")
    p = subparsers.add_parser(name, help=COMMANDS[name][0], description=_description(name),
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_inference_arguments(p, name)
    return p


def add_inference_arguments(p: argparse.ArgumentParser, name: str) -> None:
    """The arguments of inference command ``name`` on parser ``p``."""
    p.set_defaults(inference=name)
    p.add_argument("model", metavar="MODEL",
                   help="a Hugging Face or sentence-transformers model directory, or a cpuformer model file / "
                        "training output directory")
    p.add_argument("texts", metavar="TEXT", nargs="*",
                   help="inputs (contexts for qa); without them --input FILE, else standard input")
    p.add_argument("--input", metavar="FILE", default=None, help="a UTF-8 file with one input per line")
    p.add_argument("--format", choices=["json", "text"], default="json", help="JSON lines or plain text")
    p.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass")
    if name == "embed":
        p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    elif name == "classify":
        p.add_argument("--top-k", type=int, default=1, help="how many labels to report per text")
    elif name == "qa":
        p.add_argument("--question", default=None, help="the question asked of every context; without it each "
                                                        "input is question<TAB>context")
        p.add_argument("--doc-stride", type=int, default=None,
                       help="overlap of the windows of a long context (default: min(128, max length / 2))")
    elif name in ("generate", "translate"):
        p.add_argument("--max-new-tokens", type=int, default=50 if name == "generate" else None,
                       help="most new tokens" + ("" if name == "generate" else
                                                 " (default: the model's generation config, else 19)"))
        if name == "translate":
            p.add_argument("--num-beams", type=int, default=None,
                           help="beam search width (default: the model's generation config, else 1 = greedy)")
        else:
            p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
            p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
            p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
            p.add_argument("--top-p", type=float, default=None, help="nucleus sampling probability mass")
            p.add_argument("--seed", type=int, default=None, help="random seed of the sampling")
            p.add_argument("--no-prompt", action="store_true", help="print the continuation without the prompt")
            p.add_argument("--stream", action="store_true",
                           help="--format text: print the text as it is generated")


class InputError(ValueError):
    pass


def _lines(data: bytes, where: str) -> List[str]:
    out = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{where}:{lineno}: not UTF-8 (byte {exc.start + 1} of the line)") from None
        line = line.rstrip("\r")
        if lineno == 1:
            line = line.lstrip("\ufeff")
        if line.strip():
            out.append(line)
    return out


def read_inputs(args, stdin=None) -> List[str]:
    """The command's inputs: its TEXT arguments, else the lines of --input, else of standard input."""
    if args.texts:
        if args.input:
            raise InputError("give TEXT arguments or --input FILE, not both")
        return list(args.texts)
    if args.input:
        try:
            with open(args.input, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise InputError(f"{args.input}: {exc.strerror or exc}") from None
        return _lines(data, args.input)
    stdin = sys.stdin if stdin is None else stdin
    data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8")
    return _lines(data, "<stdin>")


def _emit(obj, args, text: str, out) -> None:
    if args.format == "json":
        out.write(json.dumps(obj, ensure_ascii=False) + "\n")
    else:
        out.write(text + "\n")


def run_inference(args, stdin=None, stdout=None) -> int:
    """Run the inference command parsed into ``args``; 0 on success, 2 with a one-line error on stderr."""
    from .pipelines import pipeline
    out = sys.stdout if stdout is None else stdout
    name = args.inference
    try:
        if args.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
        inputs = read_inputs(args, stdin)
        task = COMMANDS[name][1]
        pipe = pipeline(task, args.model, batch_size=args.batch_size)
        if not inputs:
            return 0
        if name == "embed":
            emb = pipe(inputs, normalize_embeddings=True if args.normalize else None)
            for e in emb:
                vals = [float(v) for v in np.asarray(e, np.float32)]
                _emit({"embedding": vals}, args, " ".join(repr(v) for v in vals), out)
        elif name == "classify":
            if args.top_k < 1:
                raise InputError(f"--top-k must be >= 1, got {args.top_k}")
            for ranked in pipe(inputs, top_k=args.top_k):
                obj = {"label": ranked[0]["label"], "score": ranked[0]["score"]}
                if args.top_k > 1:
                    obj["top_k"] = ranked
                _emit(obj, args, "\t".join(f"{r['label']}\t{r['score']:.6f}" for r in ranked), out)
        elif name == "generate":
            kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, return_full_text=not args.no_prompt)
            if args.stream and args.format == "text":
                for prompt in inputs:
                    if not args.no_prompt:
                        out.write(prompt)
                    for piece in pipe(prompt, stream=True, **{k: v for k, v in kw.items()
                                                               if k != "return_full_text"}):
                        out.write(piece)
                        out.flush()
                    out.write("\n")
            else:
                for res in pipe(inputs, **kw):
                    _emit(res[0], args, res[0]["generated_text"], out)
        elif name == "translate":
            for res in pipe(inputs, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens):
                _emit(res[0], args, res[0]["translation_text"], out)
        elif name == "qa":
            items = []
            for i, line in enumerate(inputs, 1):
                if args.question is not None:
                    items.append({"question": args.question, "context": line})
                elif "\t" in line:
                    q, c = line.split("\t", 1)
                    items.append({"question": q, "context": c})
                else:
                    raise InputError(f"input {i}: expected question<TAB>context (or give --question)")
            kw = {} if args.doc_stride is None else {"doc_stride": args.doc_stride}
            for res in pipe(items, **kw):
                obj = {"answer": res["answer"], "score": res["score"], "start": res["start"], "end": res["end"]}
                _emit(obj, args, res["answer"], out)
        out.flush()
        return 0
    except (ValueError, FileNotFoundError, TypeError) as exc:
        msg = " ".join(str(exc).split())
        print(f"cpuformer {name}: error: {msg}", file=sys.stderr)
        return 2


def main_inference(argv: Optional[List[str]] = None, stdin=None, stdout=None) -> int:
    """``main_inference(["classify", MODEL, "text", ...])``: parse and run one inference command. TEXT arguments
    may come before or after the options (``qa MODEL --question Q CONTEXT ...``), which a subparser cannot offer:
    a command line dispatcher can hand the whole argv of an inference command to this function."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        top = argparse.ArgumentParser(prog="cpuformer", description="cpuformer inference commands")
        sub = top.add_subparsers(dest="command", required=True)
        for name in COMMANDS:
            add_inference_parser(sub, name)
        top.parse_args(argv)  # prints the usage and exits
        return 2
    name = argv[0]
    help_, task, output = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"cpuformer {name}", description=_description(name),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_inference_arguments(parser, name)
    args = parser.parse_intermixed_args(argv[1:])
    return run_inference(args, stdin=stdin, stdout=stdout)
