"""``cpuformer serve MODEL``: an OpenAI-compatible HTTP server for a Hugging Face model directory.

Decoders (GPT-2, Llama, Mistral, Qwen, Gemma) serve ``/v1/completions`` and ``/v1/chat/completions`` (the chat
template of tokenizer_config.json, streaming as server-sent events) with continuous batching: one engine thread runs
every active request's next token in one batched step, and requests join and leave between steps. Encoders and
sentence-transformers directories serve ``/v1/embeddings``, concurrent requests encoded together. ``/v1/models``
and ``/health`` besides. Needs the ``serve`` extra: ``pip install "cpuformer[serve]"`` (starlette, uvicorn, jinja2).

``add_parser(subparsers)`` and ``run(args)`` are what ``cpuformer``'s command line calls; ``python -m
cpuformer.serving MODEL ...`` is the same command on its own. ``ServerState`` + ``create_app`` build the ASGI app
for embedding in another server."""
from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "run", "main", "build_server", "create_app", "ServerState"]

_MISSING = 'cpuformer serve needs starlette, uvicorn and jinja2: pip install "cpuformer[serve]"'


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a Hugging Face model directory (decoder: completions; encoder or "
                                 "sentence-transformers: embeddings)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the name clients pass as 'model' (default: the directory's name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot before the server answers 429 (default %(default)s)")
    p.add_argument("--max-input-tokens", type=int, default=None,
                   help="longest prompt (default: the model's context minus --max-output-tokens)")
    p.add_argument("--max-output-tokens", type=int, default=None,
                   help="largest max_tokens (default: 256, or half the context if smaller)")
    p.add_argument("--embed-batch", type=int, default=32, help="texts embedded together (default %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take (default %(default)s)")
    p.add_argument("--weights", choices=["float32", "packed", "int8"], default="float32")
    p.add_argument("--threads", type=int, default=None, help="cpuformer's compute threads")
    p.add_argument("--log-level", default="info")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` command to an argparse subparsers object."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server for a model directory")
    _arguments(p)
    return p


def create_app(state):
    from .app import create_app as _create
    return _create(state)


def ServerState(*args, **kwargs):  # noqa: N802 (a class, imported lazily)
    from .app import ServerState as _State
    return _State(*args, **kwargs)


def build_server(args):
    """(uvicorn.Server, ServerState) for parsed arguments; the caller runs server.run() and state.close()."""
    import uvicorn
    from .app import ServerState as _State, create_app as _create
    if args.threads:
        import cpuformer
        cpuformer.set_num_threads(args.threads)
    state = _State(args.model, model_name=args.model_name, max_batch=args.max_batch, max_queue=args.max_queue,
                   max_input_tokens=args.max_input_tokens, max_output_tokens=args.max_output_tokens,
                   timeout=args.timeout, api_key=args.api_key, embed_batch=args.embed_batch, weights=args.weights)
    config = uvicorn.Config(_create(state), host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config), state


def run(args) -> int:
    """Run the server for parsed ``serve`` arguments until interrupted. Returns the exit status."""
    try:
        import jinja2  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print(_MISSING, file=sys.stderr)
        return 2
    try:
        server, state = build_server(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"cpuformer serve: error: {exc}", file=sys.stderr)
        return 2
    kind = "completions, chat completions" if state.kind == "generation" else "embeddings"
    print(f"cpuformer serve: '{state.model_name}' ({kind}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        server.run()  # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal
    except KeyboardInterrupt:
        pass
    finally:
        state.close()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpuformer.serving",
                                     description="OpenAI-compatible HTTP server for a model directory")
    _arguments(parser)
    return run(parser.parse_args(argv))
