"""Decoder-only checkpoints (GPT-2, Llama incl. llama3 RoPE scaling with GQA and tied embeddings, Mistral with a sliding
window, Qwen2, Qwen3, Gemma) loaded with cpuformer.models.from_pretrained against transformers: logits on a
left-padded batch (positions cumsum(mask)-1, as generate numbers them), padded rows equal to the rows run alone,
greedy generation identical to transformers' generate, stop at eos, 16-bit and sharded copies of a Llama directory,
and a llama3 config.json in the older (rope_theta + rope_scaling) form."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_testlib import (DECODERS, _llama_cfg, check_rel, edit_config, gen_positions, half_copy,  # noqa: E402
                        left_padded, load, rand_ids, randomize, rel_err, to_np)

B, T = 3, 13
LENGTHS = [13, 10, 6]
PAD = 0  # filler id under the mask (the llama-family pad id; gpt2 has none)
NEW = 24


def _inputs(hf_model, seed=0, lengths=LENGTHS, T=T):
    ids = rand_ids(seed, (len(lengths), T), 3, hf_model.config.vocab_size - 1)  # no bos/eos/pad ids in the prompt
    return left_padded(ids, lengths, PAD)


def _torch_logits(hf_model, ids, mask=None):
    kw = {"input_ids": torch.tensor(ids)}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
        kw["position_ids"] = torch.tensor(gen_positions(mask))
    with torch.no_grad():
        return to_np(hf_model(**kw).logits)


@pytest.mark.parametrize("hf", DECODERS, indirect=True)
def test_decoder_logits_parity(hf):
    path, hf_model = hf
    ours = load(path)
    ids, mask = _inputs(hf_model)
    got = ours(ids, attention_mask=mask)
    ref = _torch_logits(hf_model, ids, mask)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == ref.shape
    keep = mask.astype(bool)  # left-pad query rows are fully masked: unspecified
    check_rel(got[keep], ref[keep], "left-padded batch")
    full = rand_ids(1, (2, T), 3, hf_model.config.vocab_size)
    check_rel(ours(full), _torch_logits(hf_model, full), "no mask")


@pytest.mark.parametrize("hf", DECODERS, indirect=True)
def test_decoder_left_padded_rows_equal_the_rows_run_alone(hf):
    path, hf_model = hf
    ours = load(path)
    ids, mask = _inputs(hf_model, seed=2)
    batch = ours(ids, attention_mask=mask)
    for b, n in enumerate(LENGTHS):
        alone = ours(ids[b:b + 1, T - n:])
        err = rel_err(alone, batch[b:b + 1, T - n:])
        assert err <= 1e-5, f"row {b}: rel err {err:.3g}"


def _hf_generate(hf_model, ids, mask=None, **kw):
    args = dict(max_new_tokens=NEW, do_sample=False, num_beams=1, **kw)
    if mask is not None:
        args["attention_mask"] = torch.tensor(mask)
    with torch.no_grad():
        return hf_model.generate(torch.tensor(ids), **args).numpy()


def _check_generated(got, want, what):
    got = np.asarray(got)
    assert got.dtype == np.int64, f"{what}: dtype {got.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}\n{got}\n{want}"
    np.testing.assert_array_equal(got, want, err_msg=what)


def _prompts_eos_does_not_stop(hf_model, lengths, T):
    """Left-padded prompts (searched over a few seeds, deterministically) for which the model's own eos does not fire
    within NEW greedy tokens in transformers, and transformers' output for them."""
    for seed in range(100, 140):
        ids, mask = _inputs(hf_model, seed=seed, lengths=lengths, T=T)
        want = _hf_generate(hf_model, ids, mask, pad_token_id=PAD)
        if want.shape[1] == T + NEW:
            return ids, mask, want
    pytest.fail("fixture: the model's eos fires early for every prompt tried")


@pytest.mark.parametrize("hf", DECODERS, indirect=True)
def test_greedy_generate_matches_transformers(hf):
    """eos_token_id=None: the model's own (generation_config.json); the prompts are such that it does not fire
    within 24 tokens, so all 24 steps are compared."""
    path, hf_model = hf
    ours = load(path)
    one, _, want = _prompts_eos_does_not_stop(hf_model, [7], 7)
    _check_generated(ours.generate(one, max_new_tokens=NEW), want, "batch of 1")
    two, mask, want = _prompts_eos_does_not_stop(hf_model, [9, 5], 9)
    _check_generated(ours.generate(two, max_new_tokens=NEW, attention_mask=mask, pad_token_id=PAD), want,
                     "left-padded batch of 2")


@pytest.mark.parametrize("hf", DECODERS, indirect=True)
def test_greedy_generate_stops_at_eos(hf):
    """eos = the first token row 0 generates at step >= 4 that it had not generated before: row 0 finishes there and
    is padded with pad_token_id until row 1 finishes or 24 tokens, as transformers does; alone, it stops there."""
    path, hf_model = hf
    ours = load(path)
    two, mask, free = _prompts_eos_does_not_stop(hf_model, [9, 5], 9)
    new0 = list(free[0, 9:])
    k = next((k for k in range(3, NEW - 2) if new0[k] not in new0[:k]), None)
    assert k is not None, f"fixture: row 0 repeats itself from the start: {new0}"
    eos, pad = int(new0[k]), hf_model.config.vocab_size - 2
    want = _hf_generate(hf_model, two, mask, eos_token_id=eos, pad_token_id=pad)
    assert want[0, 9 + k] == eos and (want[0, 9 + k + 1:] == pad).all()
    _check_generated(ours.generate(two, max_new_tokens=NEW, attention_mask=mask, eos_token_id=eos,
                                   pad_token_id=pad), want, f"eos {eos}")
    want1 = _hf_generate(hf_model, two[:1], mask[:1], eos_token_id=eos, pad_token_id=pad)
    assert want1.shape == (1, 9 + k + 1)
    _check_generated(ours.generate(two[:1], max_new_tokens=NEW, attention_mask=mask[:1], eos_token_id=eos,
                                   pad_token_id=pad), want1, "batch of 1")


@pytest.mark.parametrize("hf", DECODERS, indirect=True)
def test_decoder_metadata(hf):
    path, hf_model = hf
    ours = load(path)
    with open(os.path.join(path, "config.json")) as f:
        assert ours.config == json.load(f)
    assert ours.architecture == type(hf_model).__name__
    assert ours.tokenizer is None


def test_sampling_with_top_k_1_is_greedy_and_a_seed_repeats(llama):
    path, hf_model = llama
    ours = load(path)
    two, mask = _inputs(hf_model, seed=5, lengths=[9, 5], T=9)
    greedy = ours.generate(two, max_new_tokens=8, attention_mask=mask, pad_token_id=PAD)
    np.testing.assert_array_equal(
        ours.generate(two, max_new_tokens=8, attention_mask=mask, pad_token_id=PAD, do_sample=True, top_k=1, seed=7),
        greedy)
    a = ours.generate(two, max_new_tokens=8, attention_mask=mask, pad_token_id=PAD, do_sample=True, temperature=1.5,
                      top_p=0.9, seed=11)
    b = ours.generate(two, max_new_tokens=8, attention_mask=mask, pad_token_id=PAD, do_sample=True, temperature=1.5,
                      top_p=0.9, seed=11)
    np.testing.assert_array_equal(a, b)
    assert a.shape == greedy.shape and (a[:, :9] == two).all()


def test_llama_16bit_copies(half_llama):
    path, ref_model, dtype = half_llama
    ids, mask = _inputs(ref_model, seed=6)
    ref = _torch_logits(ref_model, ids, mask)
    keep = mask.astype(bool)
    for kw in ({}, {"dtype": "float32"}):
        got = load(path, **kw)(ids, attention_mask=mask)
        assert got.dtype == np.float32
        check_rel(got[keep], ref[keep], f"{dtype} {kw}")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_tied_table_stays_16bit_under_int8_and_packed_heads(llama3, tmp_path, dtype):
    """weights="int8"/"packed" over a 16-bit checkpoint with a tied head: the embedding table stays 16-bit for its
    lookups (exact), the head is prepared from its float conversion a block of rows at a time, so no float32 copy of
    the table is kept; outputs are bitwise those of converting everything to float32 first."""
    path, _ = half_copy(llama3[1], getattr(torch, dtype), tmp_path / dtype)
    ids, mask = _inputs(llama3[1], seed=9)
    V, C = llama3[1].config.vocab_size, llama3[1].config.hidden_size
    for weights in ("int8", "packed"):
        kept, converted = load(path, weights=weights), load(path, weights=weights, dtype="float32")
        np.testing.assert_array_equal(kept(ids, attention_mask=mask), converted(ids, attention_mask=mask))
        np.testing.assert_array_equal(kept.generate(ids[:1, :5], 12), converted.generate(ids[:1, :5], 12))
        # the converted load owns a float32 table (V x C x 4 bytes) that the 16-bit one maps instead
        assert converted.memory["owned"] - kept.memory["owned"] >= V * C * 4, (weights, kept.memory,
                                                                                 converted.memory)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_int8_from_16bit_weights_equals_int8_from_their_float32_copy(tmp_path, dtype):
    """weights="int8" quantizes a 16-bit checkpoint's Linear weights from blocks of converted rows (256K values: no
    float32 copy of a whole weight): bitwise what quantizing a float32 checkpoint of the same (rounded) weights
    gives. A feed-forward of 8224 keeps every MLP weight over two blocks (8224 x 32 and 32 x 8224)."""
    torch.manual_seed(12)
    model = randomize(transformers.LlamaForCausalLM(_llama_cfg(intermediate_size=8224, num_hidden_layers=1))).eval()
    path, ref = half_copy(model, getattr(torch, dtype), tmp_path / dtype)
    ref.save_pretrained(str(tmp_path / "f32"))
    ids, mask = _inputs(model, seed=11)
    half, full = load(path, weights="int8"), load(str(tmp_path / "f32"), weights="int8")
    np.testing.assert_array_equal(half(ids, attention_mask=mask), full(ids, attention_mask=mask))


def test_bf16_activations_option(llama3, tmp_path):
    """activations="bfloat16": the products with 16-bit weights take bf16-rounded activations (PyTorch's bf16
    precision for them), so logits move by about bf16's resolution and no more; refused where no weight stays 16-bit
    (never a silently unchanged model)."""
    path, _ = half_copy(llama3[1], torch.bfloat16, tmp_path / "bf16")
    ids, mask = _inputs(llama3[1], seed=10)
    keep = mask.astype(bool)
    exact, fast = load(path), load(path, activations="bfloat16")
    a, b = exact(ids, attention_mask=mask)[keep], fast(ids, attention_mask=mask)[keep]
    err = np.abs(a - b).max() / np.abs(a).max()
    assert 1e-6 < err < 3e-2, err
    assert fast.generate(ids[:1, :5], 8).shape == (1, 13)
    for bad in (dict(dtype="float32"), dict(weights="int8")):
        with pytest.raises(ValueError, match="bf16 activations"):
            load(path, activations="bfloat16", **bad)
    with pytest.raises(ValueError, match="bf16 activations"):
        load(llama3[0], activations="bfloat16")  # a float32 checkpoint
    with pytest.raises(ValueError, match="activations must be"):
        load(path, activations="float16")


def test_llama_sharded_equals_single_file(sharded_llama, llama):
    path, _ = sharded_llama
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(shards) > 1 and os.path.exists(os.path.join(path, "model.safetensors.index.json")), shards
    ids, mask = _inputs(llama[1], seed=7)
    np.testing.assert_array_equal(load(path)(ids, attention_mask=mask), load(llama[0])(ids, attention_mask=mask))


def test_llama3_legacy_rope_scaling_config(llama3, tmp_path):
    """Hub configs of the transformers 4 era: top-level rope_theta and rope_scaling instead of rope_parameters."""
    path, hf_model = llama3
    legacy = tmp_path / "llama3-legacy"
    shutil.copytree(path, legacy)

    def to_legacy(cfg):
        rope = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = rope
        return cfg
    edit_config(legacy, to_legacy)
    ids, mask = _inputs(hf_model, seed=8)
    keep = mask.astype(bool)
    check_rel(load(legacy)(ids, attention_mask=mask)[keep], _torch_logits(hf_model, ids, mask)[keep], "legacy config")
