"""Encoder-decoder checkpoints (Marian with swish, scaled embeddings, sinusoidal positions and a non-zero
final_logits_bias; BART; T5 v1.0 relu tied; T5 v1.1 gated-gelu untied) loaded with cpuformer.models.from_pretrained
against transformers: logits for given decoder_input_ids on a right-padded source batch, padded rows equal to the
rows run alone, and greedy (num_beams=1) and beam-search (num_beams=4) generation identical to transformers'
generate, with each directory's generation_config.json rules (forced eos, Marian's banned pad)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_testlib import SEQ2SEQ, check_rel, load, rand_ids, rel_err, right_padded, to_np  # noqa: E402

B, S, TD = 2, 11, 7
LENGTHS = [11, 6]


def _source(hf_model, seed=0):
    cfg = hf_model.config
    specials = {cfg.pad_token_id, cfg.eos_token_id, cfg.decoder_start_token_id, getattr(cfg, "bos_token_id", None)}
    hi = cfg.vocab_size - 1 if cfg.pad_token_id == cfg.vocab_size - 1 else cfg.vocab_size
    ids = rand_ids(seed, (B, S), max(s for s in specials if s is not None and s < 10) + 1, hi)
    ids, mask = right_padded(ids, LENGTHS, cfg.pad_token_id)
    for b, n in enumerate(LENGTHS):
        ids[b, n - 1] = cfg.eos_token_id  # tokenizers end the source with eos
    return ids, mask


def _decoder_inputs(hf_model, seed=1):
    cfg = hf_model.config
    dec = rand_ids(seed, (B, TD), 3, cfg.vocab_size - 1)
    dec[:, 0] = cfg.decoder_start_token_id
    return dec


def _torch_logits(hf_model, ids, mask, dec):
    kw = dict(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(dec))
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
    with torch.no_grad():
        return to_np(hf_model(**kw).logits)


@pytest.mark.parametrize("hf", SEQ2SEQ, indirect=True)
def test_seq2seq_logits_parity(hf):
    path, hf_model = hf
    ours = load(path)
    ids, mask = _source(hf_model)
    dec = _decoder_inputs(hf_model)
    got = ours(ids, attention_mask=mask, decoder_input_ids=dec)
    ref = _torch_logits(hf_model, ids, mask, dec)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    check_rel(got, ref, "logits")  # the decoder has no padding: every position counts


@pytest.mark.parametrize("hf", SEQ2SEQ, indirect=True)
def test_seq2seq_padded_rows_equal_the_rows_run_alone(hf):
    path, hf_model = hf
    ours = load(path)
    ids, mask = _source(hf_model, seed=2)
    dec = _decoder_inputs(hf_model, seed=3)
    batch = ours(ids, attention_mask=mask, decoder_input_ids=dec)
    for b, n in enumerate(LENGTHS):
        alone = ours(ids[b:b + 1, :n], decoder_input_ids=dec[b:b + 1])
        err = rel_err(alone, batch[b:b + 1])
        assert err <= 1e-5, f"row {b}: rel err {err:.3g}"


def _hf_generate(hf_model, ids, mask, **kw):
    with torch.no_grad():
        return hf_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, **kw).numpy()


def _check_generated(got, want, what):
    got = np.asarray(got)
    assert got.dtype == np.int64, f"{what}: dtype {got.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}\n{got}\n{want}"
    np.testing.assert_array_equal(got, want, err_msg=what)


@pytest.mark.parametrize("hf", SEQ2SEQ, indirect=True)
def test_seq2seq_greedy_generate_matches_transformers(hf):
    path, hf_model = hf
    ours = load(path)
    ids, mask = _source(hf_model, seed=4)
    want = _hf_generate(hf_model, ids, mask, num_beams=1, max_new_tokens=16)
    assert (want[:, 0] == hf_model.config.decoder_start_token_id).all()
    _check_generated(ours.generate(ids, attention_mask=mask, num_beams=1, max_new_tokens=16), want, "greedy")


@pytest.mark.parametrize("hf", SEQ2SEQ, indirect=True)
def test_seq2seq_beam_search_matches_transformers(hf):
    path, hf_model = hf
    ours = load(path)
    ids, mask = _source(hf_model, seed=5)
    want = _hf_generate(hf_model, ids, mask, num_beams=4, max_new_tokens=12, length_penalty=1.0)
    _check_generated(ours.generate(ids, attention_mask=mask, num_beams=4, max_new_tokens=12, length_penalty=1.0),
                     want, "beam search, 4 beams")


def test_marian_generation_config_rules(marian):
    """generation_config.json bans the pad id (whose logit the fixture made attractive: without the ban transformers
    emits it) and forces eos at the length limit."""
    path, hf_model = marian
    pad, eos = hf_model.config.pad_token_id, hf_model.config.eos_token_id
    with open(os.path.join(path, "generation_config.json")) as f:
        gen = json.load(f)
    assert gen["bad_words_ids"] == [[pad]] and gen["forced_eos_token_id"] == eos
    ids, mask = _source(hf_model, seed=6)
    unbanned = _hf_generate(hf_model, ids, mask, num_beams=1, max_new_tokens=6, bad_words_ids=None)
    assert (unbanned[:, 1:] == pad).any(), "fixture: the ban should matter"
    want = _hf_generate(hf_model, ids, mask, num_beams=1, max_new_tokens=6)
    got = load(path).generate(ids, attention_mask=mask, num_beams=1, max_new_tokens=6)
    _check_generated(got, want, "marian greedy, 6 tokens")
    assert (got[:, 1:] != pad).all() and (got[:, -1] == eos).all()


@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("hf", SEQ2SEQ, indirect=True)
def test_seq2seq_generate_stops_at_eos(hf, num_beams):
    """eos = a token greedy decoding emits mid-sequence (the first new token of a row, from step 2 on, that the row
    had not emitted before): greedy stops there and pads the finished row; beam search completes hypotheses at it
    (it need not win), as transformers does."""
    path, hf_model = hf
    ids, mask = _source(hf_model, seed=4)
    free = _hf_generate(hf_model, ids, mask, num_beams=1, max_new_tokens=16)
    eos = None
    for row in free[:, 1:].tolist():
        eos = next((t for k, t in enumerate(row[:-1]) if k >= 1 and t not in row[:k]), None)
        if eos is not None:
            break
    assert eos is not None, f"fixture: both rows repeat one token: {free}"
    want = _hf_generate(hf_model, ids, mask, num_beams=num_beams, max_new_tokens=16, eos_token_id=eos)
    if num_beams == 1:
        assert (want == eos).any() and want.shape[1] <= free.shape[1]
    got = load(path).generate(ids, attention_mask=mask, num_beams=num_beams, max_new_tokens=16, eos_token_id=eos)
    _check_generated(got, want, f"eos {eos}, {num_beams} beams")


@pytest.mark.parametrize("hf", SEQ2SEQ, indirect=True)
def test_seq2seq_metadata(hf):
    path, hf_model = hf
    ours = load(path)
    with open(os.path.join(path, "config.json")) as f:
        assert ours.config == json.load(f)
    assert ours.architecture == type(hf_model).__name__
