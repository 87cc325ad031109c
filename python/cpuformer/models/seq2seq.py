"""Seq2SeqTransformer: encoder-decoder with source/target embeddings and a generator head; greedy and beam search
decoding with the encoder run once."""
from __future__ import annotations

import math
from typing import List

import numpy as np

from .. import ops
from ..nn import Embedding, Linear, Module, PositionalEncoding, Transformer, init

__all__ = ["Seq2SeqTransformer"]


class Seq2SeqTransformer(Module):
    """``forward(src, tgt_in)`` -> logits (B, T, tgt_vocab_size): sources (B, S) and decoder inputs (B, T) are id
    arrays where ``pad_id`` marks padding; the decoder is causal. ``translate`` decodes greedily or with beam
    search."""

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, d_model: int = 256, nhead: int = 4,
                 num_encoder_layers: int = 3, num_decoder_layers: int = 3, dim_feedforward: int = 1024,
                 dropout: float = 0.1, max_len: int = 256, pad_id: int = 0, bos_id: int = 2, eos_id: int = 3,
                 norm_first: bool = True) -> None:
        super().__init__()
        self.config = dict(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, d_model=d_model, nhead=nhead,
                           num_encoder_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers,
                           dim_feedforward=dim_feedforward, dropout=dropout, max_len=max_len, pad_id=pad_id,
                           bos_id=bos_id, eos_id=eos_id, norm_first=norm_first)
        self.transformer = Transformer(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward,
                                       dropout, "relu", norm_first=norm_first)
        self.src_embedding = Embedding(src_vocab_size, d_model, padding_idx=pad_id)
        self.tgt_embedding = Embedding(tgt_vocab_size, d_model, padding_idx=pad_id)
        for emb, n in ((self.src_embedding, src_vocab_size), (self.tgt_embedding, tgt_vocab_size)):
            emb.weight.data[...] = init.normal((n, d_model), d_model ** -0.5)
            emb.weight.data[pad_id] = 0.0
        self.src_pos = PositionalEncoding(d_model, max_len, dropout)
        self.tgt_pos = PositionalEncoding(d_model, max_len, dropout)
        self.generator = Linear(d_model, tgt_vocab_size)
        self.d_model, self.pad_id, self.bos_id, self.eos_id = d_model, pad_id, bos_id, eos_id
        self.scale = math.sqrt(d_model)

    def encode(self, src):
        """The encoder's output (memory) for source ids (B, S)."""
        return self._encode(src)[0]

    def _encode(self, src):
        """``(memory, source padding mask)``: returned, not kept on the model, so concurrent calls don't mix."""
        src = ops._ids(src, "src")
        if src.ndim != 2:
            raise ValueError(f"src must be (batch, length), got shape {src.shape}")
        pad = src == self.pad_id
        x = self.src_pos(self.src_embedding(src) * self.scale)
        return self.transformer.encoder(x, src_key_padding_mask=pad), pad

    def decode(self, tgt_in, memory, src_pad):
        tgt_in = ops._ids(tgt_in, "tgt_in")
        y = self.tgt_pos(self.tgt_embedding(tgt_in) * self.scale)
        out = self.transformer.decoder(y, memory, tgt_is_causal=True, tgt_key_padding_mask=tgt_in == self.pad_id,
                                       memory_key_padding_mask=src_pad)
        return self.generator(out)

    def forward(self, src, tgt_in):
        memory, pad = self._encode(src)
        return self.decode(tgt_in, memory, pad)

    def backward(self, grad_output):
        d_tgt, d_memory = self.transformer.decoder.backward(self.generator.backward(grad_output))
        self.tgt_embedding.backward(self.tgt_pos.backward(d_tgt) * self.scale)
        self.src_embedding.backward(self.src_pos.backward(self.transformer.encoder.backward(d_memory)) * self.scale)
        return None

    # -- decoding -------------------------------------------------------------------------------------------------
    def translate(self, src, max_len: int = 60, beam_size: int = 1, length_penalty: float = 0.6) -> List[List[int]]:
        """Decode each source row (B, S): greedy when ``beam_size == 1``, else beam search with GNMT length
        penalty. Returns token-id lists without BOS/EOS. The encoder runs once per call."""
        max_len = ops._int_arg(max_len, "max_len", 0)
        beam_size = ops._int_arg(beam_size, "beam_size", 1)
        if beam_size >= self.config["tgt_vocab_size"]:
            raise ValueError(f"beam_size must be smaller than the target vocabulary ({self.config['tgt_vocab_size']}), "
                             f"got {beam_size}")
        length_penalty = ops._finite_scalar(length_penalty, "length_penalty")
        if abs(length_penalty) > 10:  # ((5 + length) / 6) ** alpha: past this it only overflows or underflows
            raise ValueError(f"length_penalty must be in [-10, 10], got {length_penalty}")
        was_training = self.training
        self.eval()
        try:
            src = ops._ids(src, "src")
            memory, pad = self._encode(src)
            if beam_size == 1:
                return self._greedy(memory, pad, max_len)
            return [self._beam(memory[i:i + 1], pad[i:i + 1], max_len, beam_size, length_penalty)
                    for i in range(src.shape[0])]
        finally:
            self.train(was_training)

    def _new_caches(self, batch: int, max_len: int):
        capacity = max(1, min(max_len, self.config["max_len"]))
        return [layer.new_cache(batch, capacity) for layer in self.transformer.decoder.layers]

    def _step(self, tok: np.ndarray, pos: int, caches, crosses, pad) -> np.ndarray:
        """One decoder step: token ``tok[b]`` of each row at position ``pos`` through the decoder blocks' key/value
        caches (the C++ block's decode step); the generator's logits (n, V). A padding token (a finished row) is
        not appended to its cache, which attends as the full decoder's target padding mask does."""
        if pos + 1 > self.config["max_len"]:
            raise ValueError(f"translate: target length {pos + 1} exceeds max_len {self.config['max_len']}")
        x = self.tgt_embedding.weight.data[tok][:, None] * self.scale + self.tgt_pos.rows(pos, pos + 1)[None]
        fresh = (tok != self.pad_id).astype(np.int64)
        for layer, cache, cross in zip(self.transformer.decoder.layers, caches, crosses):
            x = layer.decode(x, cache, new_tokens=fresh, cross=cross, memory_key_padding_mask=pad)
        if self.transformer.decoder.norm is not None:
            x = self.transformer.decoder.norm(x)
        return self.generator(x[:, 0])

    def _greedy(self, memory, pad, max_len):
        B = memory.shape[0]
        crosses = [layer.cross_cache(memory) for layer in self.transformer.decoder.layers]
        caches = self._new_caches(B, max_len)
        ys = np.full((B, 1), self.bos_id, np.int64)
        done = np.zeros(B, bool)
        for step in range(max_len):
            logits = self._step(ys[:, -1], step, caches, crosses, pad)
            nxt = np.where(done, self.pad_id, logits.argmax(-1))
            done |= nxt == self.eos_id
            ys = np.concatenate([ys, nxt[:, None]], axis=1)
            if done.all():
                break
        return [self._strip(row[1:]) for row in ys]

    def _strip(self, ids) -> List[int]:
        out = []
        for t in ids:
            if t in (self.eos_id, self.pad_id):
                break
            out.append(int(t))
        return out

    def _beam(self, memory, pad, max_len, beam_size, alpha) -> List[int]:
        """Beam search over one source row: each beam's beam_size best tokens, sorted by score (stable: beam order,
        then token order), the best beam_size unfinished kept; one ending in EOS is finished with its score divided
        by ((5 + length) / 6) ** alpha. Beams share the key/value caches through reordering."""
        base = [layer.cross_cache(memory) for layer in self.transformer.decoder.layers]
        caches = self._new_caches(1, max_len)
        beams = [([self.bos_id], 0.0, 0)]
        finished = []
        crosses, cross_rows = None, 0

        def penalty(length):
            return ((5 + length - 1) / 6) ** alpha

        for step in range(max_len):
            n = len(beams)
            if n != cross_rows:  # the memory repeated for n beams
                crosses = [c.copy() for c in base]
                for c in crosses:
                    c.reorder(np.zeros(n, np.int64))
                cross_rows, mpad = n, np.repeat(pad, n, 0)
            tok = np.array([b[0][-1] for b in beams], np.int64)
            logp = ops.log_softmax(self._step(tok, step, caches, crosses, mpad))
            candidates = []
            for i, (seq, score, _) in enumerate(beams):
                top = np.lexsort((np.arange(logp.shape[1]), -logp[i]))[:beam_size]  # ties: lower id first
                candidates += [(seq + [int(t)], score + float(logp[i, t]), i) for t in top]
            candidates.sort(key=lambda c: -c[1])
            beams = []
            for cand in candidates:
                if cand[0][-1] == self.eos_id:
                    finished.append((cand[0], cand[1] / penalty(len(cand[0]))))
                else:
                    beams.append(cand)
                if len(beams) == beam_size:
                    break
            if not beams or (len(finished) >= beam_size and max(f[1] for f in finished) >
                             max(b[1] / penalty(len(b[0])) for b in beams)):
                break
            parents = np.array([b[2] for b in beams], np.int64)
            for c in caches:
                c.reorder(parents)
        if not finished:
            finished = [(seq, score / penalty(len(seq))) for seq, score, _ in beams]
        best = max(finished, key=lambda f: f[1])[0]
        return self._strip(best[1:])
