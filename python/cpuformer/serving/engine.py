"""The server's two engines, each one thread.

GenerationEngine owns a ``_DecoderBatch`` (continuous batching): each turn of its loop admits waiting requests into
free slots (prefill, first token), then runs one ``step`` over every active slot and samples each row with the
request's own ``_TokenSampler``; tokens go to the request's asyncio queue (``loop.call_soon_threadsafe``); finished,
cancelled and timed-out requests leave, and a request that arrives joins at the next step. Greedy results equal
``model.generate`` of the request alone, seeded sampling ``generate(seed=...)`` (what the DecoderBatch guarantees).

EmbeddingEngine gathers the waiting embedding requests up to a batch size and encodes their texts together.

Both engines catch everything: an error fails only the request that caused it, never the thread."""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from typing import List, Optional, Sequence

import numpy as np

from .. import _core
from .text import IncrementalText

__all__ = ["QueueFull", "GenerationRequest", "GenerationEngine", "EmbeddingRequest", "EmbeddingEngine"]

log = logging.getLogger("cpuformer.serving")


class QueueFull(Exception):
    """The engine's waiting queue is full (the server answers 429)."""


class _Request:
    """Base: the asyncio side's queue of events, a cancel flag and a deadline."""

    _ids = itertools.count()

    def __init__(self, loop, timeout: Optional[float]) -> None:
        import asyncio
        self.loop = loop
        self.events: "asyncio.Queue" = asyncio.Queue()
        self.cancelled = False
        self.done = False
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.id = next(self._ids)

    def _post(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed (server shutting down)
            self.cancelled = True

    def fail(self, status: int, message: str, type_: str = "server_error", code: Optional[str] = None) -> None:
        if not self.done:
            self.done = True
            self._post(("error", status, message, type_, code))

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


class GenerationRequest(_Request):
    """One completion. Events: ("text", piece), then ("done", finish_reason, prompt_tokens, completion_tokens) or
    ("error", status, message, type, code)."""

    def __init__(self, loop, prompt_ids: Sequence[int], max_tokens: int, tokenizer, stop: Sequence[str] = (),
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
                 timeout: Optional[float] = None) -> None:
        super().__init__(loop, timeout)
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.max_tokens = int(max_tokens)
        self.text = IncrementalText(tokenizer, stop)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (1 << 63))
        do_sample = temperature > 0
        self.sampler = _core._TokenSampler(do_sample, float(temperature) if do_sample else 1.0, int(top_k),
                                           float(top_p), int(seed))
        self.generated: List[int] = []
        self.last = None  # the token to feed at the next step

    def _emit(self, piece: str) -> None:
        if piece:
            self._post(("text", piece))

    def finish(self, reason: str) -> None:
        if not self.done:
            self._emit(self.text.finish())
            self.done = True
            self._post(("done", reason, len(self.prompt_ids), len(self.generated)))


class _Engine:
    """A bounded queue of requests served by one thread (`_run`, defined by each engine)."""

    thread_name = "cpuformer-engine"

    def __init__(self, max_queue: int) -> None:
        self.max_queue = int(max_queue)
        self._waiting: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._stop = False

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def submit(self, req) -> None:
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(req)
            self._cv.notify()

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)


class GenerationEngine(_Engine):
    thread_name = "cpuformer-generation"

    def __init__(self, model, max_batch: int = 8, capacity: int = 512, max_queue: int = 64) -> None:
        self.model = model
        self.batch = _core._DecoderBatch(model._core, int(max_batch), int(capacity))
        self.slots = int(max_batch)
        self.capacity = int(capacity)
        super().__init__(max_queue)
        self.eos = set(int(e) for e in (model._core.eos_token_ids or []))
        self.vocab_size = int(model._core.vocab_size)
        self._active = {}  # slot -> request (engine thread only)
        self.steps = 0  # decode steps run (for tests and the benchmark)
        self.served = 0  # requests finished (eos, stop string or length)
        self.cancelled = 0  # requests dropped because their client went away
        self.step_delay = 0.0  # seconds slept after each step (tests: a slow model)
        self._running = threading.Event()
        self._running.set()
        self._start()

    # ---- asyncio side ----------------------------------------------------------------------------------
    def cancel(self, req: GenerationRequest) -> None:
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    def pause(self) -> None:
        """Stop admitting and stepping (requests keep queueing) until resume()."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()
        with self._cv:
            self._cv.notify()

    @property
    def active_count(self) -> int:
        return len(self._active)

    # ---- engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if not self._turn():
                    break
            except Exception:  # never reached by design; keep the thread alive whatever happens
                log.exception("generation engine: unexpected error")
                for slot, req in list(self._active.items()):
                    req.fail(500, "internal error in the generation engine")
                    del self._active[slot]
        for req in list(self._active.values()) + list(self._waiting):
            req.fail(503, "the server is shutting down", "server_error")

    def _turn(self) -> bool:
        admit = []
        with self._cv:
            while not self._stop and (not self._running.is_set() or (not self._waiting and not self._active)):
                self._cv.wait()
            if self._stop:
                return False
            free = [s for s in range(self.slots) if s not in self._active]
            while free and self._waiting:
                req = self._waiting.popleft()
                if req.cancelled:
                    req.done = True
                    self.cancelled += 1
                    continue
                if req.expired():
                    req.fail(408, "the request timed out while waiting for a slot", "timeout", "timeout")
                    continue
                admit.append((free.pop(0), req))
        for slot, req in admit:
            try:
                logits = self.batch.prefill(slot, req.prompt_ids, req.max_tokens)
                self._active[slot] = req
                self._advance(slot, req, logits)
            except Exception as exc:  # this request only
                self._active.pop(slot, None)
                log.warning("generation request failed at prefill: %s", exc)
                req.fail(400 if isinstance(exc, ValueError) else 500, f"generation failed: {exc}",
                         "invalid_request_error" if isinstance(exc, ValueError) else "server_error")
        for slot, req in list(self._active.items()):
            if req.done or req.cancelled:
                self.cancelled += not req.done
                req.done = True
                del self._active[slot]
            elif req.expired():
                req.fail(408, "the request timed out", "timeout", "timeout")
                del self._active[slot]
        if not self._active:
            return True
        slots = sorted(self._active)
        try:
            logits = self.batch.step(slots, [self._active[s].last for s in slots])
        except Exception as exc:  # a step error cannot be pinned on one request: fail the step's requests
            log.exception("generation step failed")
            for s in slots:
                self._active.pop(s).fail(500, f"generation failed: {exc}")
            return True
        self.steps += 1
        if self.step_delay:
            time.sleep(self.step_delay)
        for row, s in enumerate(slots):
            req = self._active[s]
            try:
                self._advance(s, req, logits[row])
            except Exception as exc:
                log.warning("generation request failed: %s", exc)
                req.fail(500, f"generation failed: {exc}")
                self._active.pop(s, None)
        return True

    def _advance(self, slot: int, req: GenerationRequest, logits) -> None:
        """Sample the next token of req, send its text, retire it if it is finished."""
        tok = int(req.sampler.next(logits))
        req.generated.append(tok)
        req.last = tok
        if tok in self.eos:
            self._retire(slot, req, "stop")
            return
        req._emit(req.text.push(tok))
        if req.text.stopped:
            self._retire(slot, req, "stop")
        elif len(req.generated) >= req.max_tokens:
            self._retire(slot, req, "length")

    def _retire(self, slot: int, req: GenerationRequest, reason: str) -> None:
        req.finish(reason)
        self._active.pop(slot, None)
        self.served += 1


class EmbeddingRequest(_Request):
    """Texts to embed. Events: ("done", embeddings (N, D) float32, prompt_tokens) or ("error", ...)."""

    def __init__(self, loop, texts: List[str], timeout: Optional[float] = None) -> None:
        super().__init__(loop, timeout)
        self.texts = texts

    def complete(self, embeddings: np.ndarray, tokens: int) -> None:
        if not self.done:
            self.done = True
            self._post(("done", embeddings, tokens))


class EmbeddingEngine(_Engine):
    thread_name = "cpuformer-embeddings"

    def __init__(self, encoder, batch_size: int = 32, max_queue: int = 64) -> None:
        super().__init__(max_queue)
        self.encoder = encoder
        self.batch_size = int(batch_size)
        self.batches = 0
        self._start()

    def cancel(self, req: EmbeddingRequest) -> None:
        req.cancelled = True

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting:
                    self._cv.wait()
                if self._stop:
                    break
                jobs, n = [], 0
                while self._waiting and (not jobs or n + len(self._waiting[0].texts) <= self.batch_size):
                    req = self._waiting.popleft()
                    if req.cancelled:
                        req.done = True
                        continue
                    if req.expired():
                        req.fail(408, "the request timed out while waiting", "timeout", "timeout")
                        continue
                    jobs.append(req)
                    n += len(req.texts)
            if not jobs:
                continue
            try:
                self._encode(jobs)
            except Exception:
                for req in jobs:  # find the one that failed: each alone
                    try:
                        self._encode([req])
                    except Exception as exc:
                        log.warning("embedding request failed: %s", exc)
                        req.fail(400 if isinstance(exc, (ValueError, TypeError)) else 500,
                                 f"embedding failed: {exc}",
                                 "invalid_request_error" if isinstance(exc, (ValueError, TypeError)) else "server_error")
        for req in list(self._waiting):
            req.fail(503, "the server is shutting down")

    def _encode(self, jobs: List[EmbeddingRequest]) -> None:
        texts = [t for req in jobs for t in req.texts]
        emb = self.encoder.encode(texts, batch_size=self.batch_size)
        enc = self.encoder.tokenizer(texts, truncation=True, max_length=self.encoder.max_seq_length)
        counts = [len(ids) for ids in enc["input_ids"]]
        self.batches += 1
        start = 0
        for req in jobs:
            k = len(req.texts)
            req.complete(emb[start:start + k], int(sum(counts[start:start + k])))
            start += k
