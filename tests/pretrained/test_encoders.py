"""Encoder checkpoints (BERT, RoBERTa, XLM-R, DistilBERT, MPNet; base models and task heads) loaded with
cpuformer.models.from_pretrained against the transformers model that wrote the directory: float32 parity on a
right-padded batch, padded rows equal to the rows run alone, and 16-bit copies of a BERT directory."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_testlib import ENCODERS, check_rel, load, rand_ids, rel_err, right_padded, to_np  # noqa: E402

B, T = 3, 13
LENGTHS = [13, 9, 4]


def _kind(name):
    return name.split("_")[1]  # model, seqcls, tokcls, qa, mlm


def _inputs(name, hf_model, seed=0):
    cfg = hf_model.config
    ids = rand_ids(seed, (B, T), 3, cfg.vocab_size)  # no special ids (pad 0/1) inside the text
    ids, mask = right_padded(ids, LENGTHS, cfg.pad_token_id)
    types = None
    if name.startswith("bert"):
        types = np.zeros_like(ids)
        types[:, 6:] = 1  # a second segment
        types *= mask
    return ids, mask, types


def _has_pooler(hf_model):
    return getattr(hf_model, "pooler", None) is not None


def _torch_outputs(name, hf_model, ids, mask, types):
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if types is not None:
        kw["token_type_ids"] = torch.tensor(types)
    with torch.no_grad():
        out = hf_model(**kw)
    kind = _kind(name)
    if kind == "model":
        res = {"hidden": to_np(out.last_hidden_state)}
        if _has_pooler(hf_model):
            res["pooler"] = to_np(out.pooler_output)
        return res
    if kind == "qa":
        return {"start": to_np(out.start_logits), "end": to_np(out.end_logits)}
    return {"logits": to_np(out.logits)}


def _our_outputs(name, ours, ids, mask, types, pooler):
    kw = {} if mask is None else {"attention_mask": mask}
    if types is not None:
        kw["token_type_ids"] = types
    out = ours(ids, **kw)
    kind = _kind(name)
    if kind == "model":
        res = {"hidden": out}
        if pooler:
            res["pooler"] = ours.pooler_output(ids, **kw)
        return res
    if kind == "qa":
        assert isinstance(out, tuple) and len(out) == 2, "QA models return (start_logits, end_logits)"
        return {"start": out[0], "end": out[1]}
    return {"logits": out}


# outputs with a position axis are compared at real tokens only (pad positions' values are unspecified)
_PER_TOKEN = {"hidden", "start", "end"}


def _per_token(name, key):
    return key in _PER_TOKEN or (key == "logits" and _kind(name) in ("tokcls", "mlm"))


@pytest.mark.parametrize("hf", ENCODERS, indirect=True)
def test_encoder_parity_on_a_right_padded_batch(hf, request):
    name = request.node.callspec.params["hf"]
    path, hf_model = hf
    ids, mask, types = _inputs(name, hf_model)
    ref = _torch_outputs(name, hf_model, ids, mask, types)
    ours = _our_outputs(name, load(path), ids, mask, types, "pooler" in ref)
    keep = mask.astype(bool)
    for key, expected in ref.items():
        got = ours[key]
        assert isinstance(got, np.ndarray) and got.dtype == np.float32, f"{key}: {type(got)}"
        assert got.shape == expected.shape, f"{name} {key}: shape {got.shape} != {expected.shape}"
        if _per_token(name, key):
            got, expected = got[keep], expected[keep]
        check_rel(got, expected, f"{name} {key}")


@pytest.mark.parametrize("hf", ENCODERS, indirect=True)
def test_encoder_padded_rows_equal_the_rows_run_alone(hf, request):
    name = request.node.callspec.params["hf"]
    path, hf_model = hf
    ids, mask, types = _inputs(name, hf_model, seed=1)
    ours = load(path)
    pooler = _has_pooler(hf_model) and _kind(name) == "model"
    batch = _our_outputs(name, ours, ids, mask, types, pooler)
    for b, n in enumerate(LENGTHS):
        alone = _our_outputs(name, ours, ids[b:b + 1, :n], None, None if types is None else types[b:b + 1, :n],
                             pooler)
        for key, got in alone.items():
            want = batch[key][b:b + 1, :n] if _per_token(name, key) else batch[key][b:b + 1]
            err = rel_err(got, want)
            assert got.shape == want.shape and err <= 1e-5, f"{name} {key} row {b}: rel err {err:.3g}"


@pytest.mark.parametrize("hf", ENCODERS, indirect=True)
def test_encoder_metadata(hf, request):
    path, hf_model = hf
    ours = load(path)
    with open(os.path.join(path, "config.json")) as f:
        assert ours.config == json.load(f)
    assert ours.architecture == type(hf_model).__name__
    assert ours.tokenizer is None  # no tokenizer.json in these directories


def test_bert_default_mask_and_token_types_and_list_inputs(bert_model):
    path, hf_model = bert_model
    ours = load(path)
    ids = rand_ids(3, (2, 7), 3, hf_model.config.vocab_size)
    with torch.no_grad():
        ref = to_np(hf_model(input_ids=torch.tensor(ids)).last_hidden_state)
    check_rel(ours(ids), ref, "no mask, no token types")
    np.testing.assert_array_equal(ours(ids.tolist()), ours(ids))
    np.testing.assert_array_equal(ours(ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids)),
                                  ours(ids))


def test_bert_16bit_copies(half_bert):
    """A float16 / bfloat16 directory: kept 16-bit (computed in float32) or converted at load, both match the float32
    torch model of the rounded weights."""
    path, ref_model, dtype = half_bert
    ids, mask, types = _inputs("bert_model", ref_model, seed=2)
    ref = _torch_outputs("bert_model", ref_model, ids, mask, types)
    keep = mask.astype(bool)
    for kw in ({}, {"dtype": "float32"}):
        ours = load(path, **kw)
        hidden = ours(ids, attention_mask=mask, token_type_ids=types)
        assert hidden.dtype == np.float32
        check_rel(hidden[keep], ref["hidden"][keep], f"{dtype} {kw} hidden")
        check_rel(ours.pooler_output(ids, attention_mask=mask, token_type_ids=types), ref["pooler"],
                  f"{dtype} {kw} pooler")
