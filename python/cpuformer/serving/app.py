"""The OpenAI-compatible HTTP API (starlette): /v1/embeddings, /v1/completions, /v1/chat/completions (with
``stream: true`` as server-sent events), /v1/models, /health. Errors are OpenAI-style bodies
``{"error": {"message", "type", "param", "code"}}``; a malformed request is a 4xx, never a 500."""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
import uuid
from typing import Optional

import numpy as np

from .engine import EmbeddingEngine, EmbeddingRequest, GenerationEngine, GenerationRequest, QueueFull

log = logging.getLogger("cpuformer.serving")

__all__ = ["APIError", "ServerState", "create_app"]


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _error_response(status, message, type_="invalid_request_error", param=None, code=None, headers=None):
    from starlette.responses import JSONResponse
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


class ServerState:
    """What the app serves: one model directory, its engines and limits."""

    def __init__(self, model_dir: str, model_name: Optional[str] = None, max_batch: int = 8,
                 max_queue: int = 64, max_input_tokens: Optional[int] = None,
                 max_output_tokens: Optional[int] = None, timeout: Optional[float] = 600.0,
                 api_key: Optional[str] = None, embed_batch: int = 32, weights: str = "float32") -> None:
        from ..models.pretrained import CausalLM, EncoderModel, SentenceEncoder, from_pretrained
        self.model_dir = os.path.abspath(os.fspath(model_dir))
        self.model_name = model_name or os.path.basename(self.model_dir.rstrip(os.sep))
        self.timeout = timeout
        self.api_key = api_key
        self.created = int(time.time())
        self.generation: Optional[GenerationEngine] = None
        self.embeddings: Optional[EmbeddingEngine] = None
        self.chat_template = None
        if os.path.isfile(os.path.join(self.model_dir, "modules.json")):
            model = None
            encoder = SentenceEncoder.from_pretrained(self.model_dir, weights=weights)
        else:
            model = from_pretrained(self.model_dir, weights=weights)
            encoder = SentenceEncoder.from_pretrained(self.model_dir, weights=weights) \
                if isinstance(model, EncoderModel) else None
        if encoder is not None:
            self.kind = "embeddings"
            self.embeddings = EmbeddingEngine(encoder, embed_batch, max_queue)
            self.max_input_tokens = encoder.max_seq_length
        elif isinstance(model, CausalLM):
            if model.tokenizer is None:
                raise ValueError(f"{self.model_dir}: a decoder without a tokenizer cannot be served")
            self.kind = "generation"
            self.model = model
            self.tokenizer = model.tokenizer
            mpe = model.config.get("max_position_embeddings", model.config.get("n_positions"))
            context = int(model._core.max_positions or 0) or (mpe if isinstance(mpe, int) and mpe > 0 else 4096)
            if max_output_tokens is None:
                max_output_tokens = min(256, max(1, context // 2))
            if max_input_tokens is None:
                max_input_tokens = context - max_output_tokens
            if max_input_tokens < 1 or max_output_tokens < 1:
                raise ValueError(f"--max-input-tokens and --max-output-tokens must be >= 1 (context {context})")
            self.max_input_tokens, self.max_output_tokens = int(max_input_tokens), int(max_output_tokens)
            self.generation = GenerationEngine(model, max_batch, self.max_input_tokens + self.max_output_tokens,
                                               max_queue)
            from .chat_template import load_chat_template
            self.chat_template = load_chat_template(self.model_dir)
        else:
            raise ValueError(f"{self.model_dir}: a {model.model_type!r} {type(model).__name__} cannot be served "
                             "(decoders for completions, encoders for embeddings)")

    def close(self) -> None:
        for e in (self.generation, self.embeddings):
            if e is not None:
                e.close()


# ------------------------------------------------------------------------------------------ validation helpers

def _field(body, name, types, default=None, required=False, check=None, what=None):
    if name not in body or body[name] is None:
        if required:
            raise APIError(400, f"'{name}' is required", param=name, code="missing_required_parameter")
        return default
    v = body[name]
    tup = types if isinstance(types, tuple) else (types,)
    ok = isinstance(v, tup) and not (isinstance(v, bool) and bool not in tup)
    if not ok:
        raise APIError(400, f"'{name}' must be {what or _typename(types)}, got {json.dumps(v)[:80]}", param=name,
                       code="invalid_type")
    if check is not None and not check(v):
        raise APIError(400, f"'{name}' is out of range: {json.dumps(v)[:80]}", param=name, code="invalid_value")
    return v


def _typename(types):
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list", dict: "an object"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in types)


async def _json_body(request):
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _check_model(state: ServerState, body, kind: str):
    name = _field(body, "model", str, required=True)
    if name != state.model_name:
        raise APIError(404, f"The model '{name}' does not exist (this server has '{state.model_name}')",
                       param="model", code="model_not_found")
    if state.kind != kind:
        what = {"embeddings": "embeddings", "generation": "completions"}[kind]
        raise APIError(400, f"the model '{name}' does not support {what} (it is a {state.kind} model)",
                       param="model", code="unsupported_model")


def _stop_list(body):
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    if len(stop) > 4:
        raise APIError(400, "'stop' holds at most 4 sequences", param="stop", code="invalid_value")
    return [s for s in stop if s]


def _unsupported(body, names):
    for name, default_ok in names:
        if name in body and body[name] is not None and not default_ok(body[name]):
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def _sampling(state: ServerState, body, prompt_len: int, default_max: Optional[int]):
    n = _field(body, "n", int, 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported_parameter")
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, max_key, int, None, check=lambda v: v >= 1)
    if max_tokens is None:
        max_tokens = default_max if default_max is not None else state.max_output_tokens
        max_tokens = min(max_tokens, state.max_output_tokens)
    if max_tokens > state.max_output_tokens:
        raise APIError(400, f"'{max_key}' is {max_tokens}, more than this server's maximum of "
                            f"{state.max_output_tokens} output tokens", param=max_key, code="invalid_value")
    temperature = float(_field(body, "temperature", (int, float), 1.0, check=lambda v: 0 <= v <= 2))
    top_p = float(_field(body, "top_p", (int, float), 1.0, check=lambda v: 0 < v <= 1))
    top_k = _field(body, "top_k", int, 0, check=lambda v: v >= 0 or v == -1)
    seed = _field(body, "seed", int, None, check=lambda v: -(1 << 63) <= v < (1 << 64))
    if seed is not None:
        seed %= (1 << 64)
    stream = _field(body, "stream", bool, False)
    opts = _field(body, "stream_options", dict, {}) or {}
    include_usage = bool(opts.get("include_usage", False)) and stream
    _unsupported(body, [("logprobs", lambda v: v is False), ("top_logprobs", lambda v: False),
                        ("echo", lambda v: v is False), ("best_of", lambda v: v == 1),
                        ("presence_penalty", lambda v: v == 0), ("frequency_penalty", lambda v: v == 0),
                        ("logit_bias", lambda v: v == {}), ("suffix", lambda v: v == ""),
                        ("tools", lambda v: v == []), ("response_format", lambda v: isinstance(v, dict) and v.get("type") == "text")])
    if prompt_len < 1:
        raise APIError(400, "the prompt is empty (no tokens)", param="prompt", code="invalid_value")
    if prompt_len > state.max_input_tokens:
        raise APIError(400, f"the prompt has {prompt_len} tokens, more than this server's maximum of "
                            f"{state.max_input_tokens} input tokens", param="messages" if "messages" in body
                       else "prompt", code="context_length_exceeded")
    return dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=max(0, top_k), seed=seed,
                stop=_stop_list(body)), stream, include_usage


def _check_ids(state, ids, param):
    V = state.generation.vocab_size
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V for t in ids):
        raise APIError(400, f"'{param}' token ids must be integers in [0, {V})", param=param, code="invalid_value")
    return ids


def _prompt_ids(state: ServerState, body):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "'prompt' is empty", param="prompt", code="invalid_value")
        return state.tokenizer.encode(prompt).ids
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return _check_ids(state, prompt, "prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) > 1:
        raise APIError(400, "one prompt per request is supported", param="prompt", code="unsupported_parameter")
    raise APIError(400, "'prompt' must be a string or a list of token ids", param="prompt", code="invalid_type")


_ROLES = ("system", "developer", "user", "assistant", "tool")


def _messages(body):
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list", param="messages",
                       code="invalid_type" if msgs is not None else "missing_required_parameter")
    out = []
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"'{p}' must be an object", param=p, code="invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            raise APIError(400, f"'{p}.role' must be one of {', '.join(_ROLES)}, got {json.dumps(role)[:40]}",
                           param=f"{p}.role", code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only, joined as vLLM does
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"'{p}.content' parts must be text parts", param=f"{p}.content",
                                   code="invalid_value")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None:
            if role != "assistant":
                raise APIError(400, f"'{p}.content' is required", param=f"{p}.content",
                               code="missing_required_parameter")
        elif not isinstance(content, str):
            raise APIError(400, f"'{p}.content' must be a string or a list of text parts", param=f"{p}.content",
                           code="invalid_type")
        msg = {k: v for k, v in m.items() if k != "content"}
        msg["content"] = content
        out.append(msg)
    return out


# ------------------------------------------------------------------------------------------------- handlers

def create_app(state: ServerState):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def health(request):
        return JSONResponse({"status": "ok", "model": state.model_name})

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "cpuformer"}]})

    async def _wait(request, req, engine):
        """Events of req until it is done; cancels it if the client goes away."""
        checked = time.monotonic()
        while True:
            try:
                ev = await asyncio.wait_for(req.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                ev = None
            if time.monotonic() - checked >= 0.5:  # events may keep coming: check by the clock
                checked = time.monotonic()
                if await request.is_disconnected():
                    engine.cancel(req)
                    raise APIError(499, "client disconnected")
            if ev is None:
                continue
            yield ev
            if ev[0] in ("done", "error"):
                return

    def _submit(engine, req):
        try:
            engine.submit(req)
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}; retry later", "rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None

    def _raise(ev):
        _, status, message, type_, code = ev
        raise APIError(status, message, type_, code=code)

    async def embeddings(request):
        body = await _json_body(request)
        _check_model(state, body, "embeddings")
        inp = body.get("input")
        if isinstance(inp, str):
            inp = [inp]
        if not isinstance(inp, list) or not inp:
            raise APIError(400, "'input' must be a non-empty string or a non-empty list of strings", param="input",
                           code="invalid_type" if inp is not None else "missing_required_parameter")
        if not all(isinstance(t, str) for t in inp):
            raise APIError(400, "'input' must be a string or a list of strings (token ids are not supported)",
                           param="input", code="invalid_type")
        if any(not t for t in inp):
            raise APIError(400, "'input' must not contain empty strings", param="input", code="invalid_value")
        if len(inp) > 2048:
            raise APIError(400, "'input' holds at most 2048 texts", param="input", code="invalid_value")
        fmt = _field(body, "encoding_format", str, "float", check=lambda v: v in ("float", "base64"),
                     what="'float' or 'base64'")
        dims = _field(body, "dimensions", int, None, check=lambda v: v >= 1)
        req = EmbeddingRequest(asyncio.get_running_loop(), inp, state.timeout)
        _submit(state.embeddings, req)
        try:
            async for ev in _wait(request, req, state.embeddings):
                if ev[0] == "error":
                    _raise(ev)
                _, emb, tokens = ev
        finally:
            if not req.done:
                state.embeddings.cancel(req)
        if dims is not None:
            if dims > emb.shape[1]:
                raise APIError(400, f"'dimensions' is {dims}, more than the model's {emb.shape[1]}",
                               param="dimensions", code="invalid_value")
            if dims < emb.shape[1]:  # Matryoshka-style truncation, renormalised
                emb = emb[:, :dims]
                emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        emb = np.ascontiguousarray(emb, dtype="<f4")
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(row.tobytes()).decode("ascii") if fmt == "base64" else row.tolist()}
                for i, row in enumerate(emb)]
        return JSONResponse({"object": "list", "data": data, "model": state.model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def completions(request):
        body = await _json_body(request)
        _check_model(state, body, "generation")
        ids = _prompt_ids(state, body)
        return await _generate(request, body, ids, chat=False, default_max=16)

    async def chat_completions(request):
        body = await _json_body(request)
        _check_model(state, body, "generation")
        msgs = _messages(body)
        if state.chat_template is None:
            raise APIError(400, f"the model '{state.model_name}' has no chat template (tokenizer_config.json "
                                "'chat_template'); use /v1/completions", param="messages", code="no_chat_template")
        from .chat_template import TemplateError
        try:
            text = state.chat_template.render(msgs, add_generation_prompt=True)
        except TemplateError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_value") from None
        ids = state.tokenizer.encode(text, add_special_tokens=False).ids
        return await _generate(request, body, ids, chat=True, default_max=None)

    async def _generate(request, body, ids, chat, default_max):
        params, stream, include_usage = _sampling(state, body, len(ids), default_max)
        engine = state.generation
        req = GenerationRequest(asyncio.get_running_loop(), ids, tokenizer=state.tokenizer, timeout=state.timeout,
                                **params)
        _submit(engine, req)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage(p, c):
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        if not stream:
            pieces = []
            try:
                async for ev in _wait(request, req, engine):
                    if ev[0] == "text":
                        pieces.append(ev[1])
                    elif ev[0] == "error":
                        _raise(ev)
                    else:
                        _, reason, p, c = ev
            finally:
                if not req.done:  # the client went away or the server stops
                    engine.cancel(req)
            text = "".join(pieces)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                       "finish_reason": reason} if chat else
                      {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": state.model_name,
                                 "system_fingerprint": None, "choices": [choice], "usage": usage(p, c)})

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text=None, reason=None, role=False):
            if chat:
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            out = {"id": rid, "object": chunk_obj, "created": created, "model": state.model_name,
                   "system_fingerprint": None, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return "data: " + json.dumps(out, ensure_ascii=False) + "\n\n"

        async def events():
            try:
                if chat:
                    yield chunk("", role=True)
                while True:
                    ev = await req.events.get()
                    if ev[0] == "text":
                        yield chunk(ev[1])
                    elif ev[0] == "error":
                        _, status, message, type_, code = ev
                        yield "data: " + json.dumps({"error": {"message": message, "type": type_, "param": None,
                                                               "code": code}}) + "\n\n"
                        break
                    else:
                        _, reason, p, c = ev
                        yield chunk(None, reason)
                        if include_usage:
                            yield "data: " + json.dumps({"id": rid, "object": chunk_obj, "created": created,
                                                         "model": state.model_name, "choices": [],
                                                         "usage": usage(p, c)}) + "\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                if not req.done:  # the client went away (or the server stops): free the slot
                    engine.cancel(req)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def guarded(handler):
        async def run(request):
            if state.api_key is not None:
                auth = request.headers.get("authorization", "")
                if auth != f"Bearer {state.api_key}":
                    return _error_response(401, "Incorrect API key provided" if auth else
                                           "Missing API key (Authorization: Bearer ...)",
                                           "invalid_request_error", code="invalid_api_key")
            try:
                return await handler(request)
            except APIError as exc:
                return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)
            except Exception:  # a bug: answer it as one, but keep serving
                log.exception("unexpected error in %s", request.url.path)
                return _error_response(500, "internal server error", "server_error")
        return run

    async def http_error(request, exc):
        return _error_response(exc.status_code, exc.detail or "error",
                               "invalid_request_error" if exc.status_code < 500 else "server_error",
                               code="not_found" if exc.status_code == 404 else None)

    routes = [Route("/health", health, methods=["GET"]),
              Route("/v1/models", guarded(models), methods=["GET"]),
              Route("/v1/embeddings", guarded(embeddings), methods=["POST"]),
              Route("/v1/completions", guarded(completions), methods=["POST"]),
              Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.server = state
    return app
