"""Seq2SeqTransformer.translate decodes through the decoder blocks' key/value caches: it must give what re-running
the whole decoder on the target prefix at every step gives (the definition), greedy and beam search."""
from __future__ import annotations

import numpy as np
import pytest

from cpuformer import nn, ops
from cpuformer.models import Seq2SeqTransformer


def _full_greedy(model, src, max_len):
    memory, pad = model._encode(src)
    ys = np.full((src.shape[0], 1), model.bos_id, np.int64)
    done = np.zeros(src.shape[0], bool)
    for _ in range(max_len):
        nxt = np.where(done, model.pad_id, model.decode(ys, memory, pad)[:, -1].argmax(-1))
        done |= nxt == model.eos_id
        ys = np.concatenate([ys, nxt[:, None]], 1)
        if done.all():
            break
    return [model._strip(r[1:]) for r in ys]


def _full_beam(model, src_row, max_len, k, alpha):
    memory, pad = model._encode(src_row)
    beams, finished = [([model.bos_id], 0.0)], []
    pen = lambda n: ((5 + n - 1) / 6) ** alpha  # noqa: E731
    for _ in range(max_len):
        ys = np.array([b[0] for b in beams], np.int64)
        logp = ops.log_softmax(model.decode(ys, np.repeat(memory, len(beams), 0), np.repeat(pad, len(beams), 0))[:, -1])
        cands = []
        for i, (seq, score) in enumerate(beams):
            for t in np.lexsort((np.arange(logp.shape[1]), -logp[i]))[:k]:
                cands.append((seq + [int(t)], score + float(logp[i, t])))
        cands.sort(key=lambda c: -c[1])
        beams = []
        for seq, score in cands:
            if seq[-1] == model.eos_id:
                finished.append((seq, score / pen(len(seq))))
            else:
                beams.append((seq, score))
            if len(beams) == k:
                break
        if not beams or (len(finished) >= k and max(f[1] for f in finished) >
                         max(b[1] / pen(len(b[0])) for b in beams)):
            break
    if not finished:
        finished = [(s, sc / pen(len(s))) for s, sc in beams]
    return model._strip(max(finished, key=lambda f: f[1])[0][1:])


@pytest.mark.parametrize("norm_first", [True, False])
def test_cached_translation_equals_full_recompute(norm_first):
    rng = np.random.default_rng(7)
    nn.init.manual_seed(7)
    model = Seq2SeqTransformer(30, 25, d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                               dim_feedforward=40, dropout=0.0, max_len=40, eos_id=3, norm_first=norm_first).eval()
    for p in model.parameters():  # spread the logits so that EOS and ties come and go
        p.data[...] += 0.3 * rng.standard_normal(p.data.shape).astype(np.float32)
    src = rng.integers(4, 30, (4, 9))
    src[1, 6:] = 0  # padding
    src[3, 2:] = 0
    assert model.translate(src, max_len=12) == _full_greedy(model, src, 12)
    for i in range(src.shape[0]):
        assert model.translate(src[i:i + 1], max_len=10, beam_size=3)[0] == _full_beam(model, src[i:i + 1], 10, 3, 0.6)
    with pytest.raises(ValueError, match="exceeds max_len"):
        model.translate(src[:1], max_len=60)
