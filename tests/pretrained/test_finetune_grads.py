"""Fine-tuning's backward through every family from_pretrained loads: the C++ core's train_forward / train_backward
(PretrainedModel::parameters in the checkpoint's names) against transformers + torch autograd on the same tiny random
models, dropout off. Every parameter's gradient within 1e-4 of the largest entry of torch's gradient for it."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from cpuformer import _core

from hf_testlib import rand_ids

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

FAMILIES = ["bert_model", "bert_seqcls", "bert_tokcls", "bert_qa", "bert_mlm", "roberta_seqcls", "roberta_mlm",
            "xlmr_model", "distilbert_seqcls", "distilbert_qa", "mpnet_mlm", "gpt2", "llama", "llama3", "mistral",
            "qwen2", "qwen3", "gemma", "marian", "bart", "t5", "t5v11", "vit_model", "vit_cls"]


def _key_bias(name):
    """Adding a constant to every key leaves softmax unchanged: the key bias's gradient is zero up to rounding."""
    return name.endswith(("key.bias", "k_lin.bias", ".k.bias", "k_proj.bias"))


def _torch_output(model, core, ids, mask, dec, pixels):
    if core.kind == "vision":
        r = model(pixel_values=torch.tensor(pixels))
    elif core.kind == "seq2seq":
        r = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec))
    elif core.kind == "decoder":
        r = model(input_ids=torch.tensor(ids))
    else:
        r = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if getattr(r, "start_logits", None) is not None:
        return torch.stack([r.start_logits, r.end_logits], -1)
    if getattr(r, "logits", None) is not None:
        return r.logits
    return r.last_hidden_state


@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_match_torch_autograd(request, name):
    path, hf_model = request.getfixturevalue(name)
    model = copy.deepcopy(hf_model).float().eval()
    core = _core._PretrainedModel.load(path, "auto", "float32", True)
    names = [n for n, _, _ in core.parameters() if n != "final_logits_bias"]  # a buffer, not a parameter
    for n in names:
        core.set_requires_grad(n, True)
    B, T, V = 3, 7, max(core.vocab_size, 8)
    ids = rand_ids(1, (B, T), 3, V - 3)
    mask = np.ones((B, T), np.int64)
    mask[1, 5:] = 0
    dec = rand_ids(2, (B, 5), 3, V - 3)
    pixels = None
    if core.kind == "vision":
        c = model.config
        pixels = np.random.default_rng(3).standard_normal((2, c.num_channels, c.image_size, c.image_size)).astype(np.float32)
    st = _core._TrainState()
    out = core.train_forward(st, ids, None if core.kind == "decoder" else mask, None,
                             dec if core.kind == "seq2seq" else None, pixels, dropout=False)
    ref = _torch_output(model, core, ids, mask, dec, pixels)
    ref_np = ref.detach().numpy().reshape(-1)
    assert np.abs(out - ref_np).max() <= 1e-4 * np.abs(ref_np).max(), "forward"
    w = np.random.default_rng(4).standard_normal(out.shape).astype(np.float32)
    core.train_backward(st, w)
    (ref.reshape(-1) * torch.tensor(w)).sum().backward()
    theirs = dict(model.named_parameters())
    values = {k: p.detach().numpy().copy() for k, p in theirs.items()}
    scale = max(float(p.grad.abs().max()) for p in theirs.values() if p.grad is not None)
    checked = 0
    for n, data, grad in core.parameters():
        if n == "final_logits_bias":
            assert grad is None
            continue
        match = [k for k in theirs if k == n or k.endswith("." + n) or n.endswith("." + k)]
        if not match:  # transformers renames some families' tensors in memory (ViT): find it by its values
            match = [k for k, v in values.items() if v.size == data.size and np.array_equal(v.reshape(data.shape), data)]
        assert match, f"{n}: no such torch parameter"
        tg = theirs[match[0]].grad
        if tg is None:  # not on the output's path (a *Model's pooler): no gradient
            assert not np.any(grad), n
            checked += 1
            continue
        tg = tg.numpy().reshape(grad.shape)
        tol = 1e-5 * scale if _key_bias(n) else 1e-4 * max(np.abs(tg).max(), 1e-6 * scale)
        assert np.abs(grad - tg).max() <= tol, f"{n}: gradient off by {np.abs(grad - tg).max():.3g} (tol {tol:.3g})"
        checked += 1
    assert checked == len(names)


def test_frozen_parameters_get_no_gradient_and_recompute_is_exact(llama):
    """Only the parameters that require a gradient get one; recomputing each block's activations in backward gives
    the same gradients bitwise; a second backward without a forward is refused."""
    core = _core._PretrainedModel.load(llama[0], "auto", "float32", True)
    names = [n for n, _, _ in core.parameters()]
    wanted = [n for n in names if "mlp" in n or n.endswith("norm.weight")]
    for n in wanted:
        core.set_requires_grad(n, True)
    ids = rand_ids(5, (2, 9), 3, core.vocab_size - 3)
    grads = {}
    for recompute in (False, True):
        core.zero_grad()
        st = _core._TrainState()
        out = core.train_forward(st, ids, dropout=True, seed=7, recompute=recompute)
        core.train_backward(st, np.ones_like(out))
        with pytest.raises(ValueError, match="no train_forward"):
            core.train_backward(st, np.ones_like(out))
        grads[recompute] = {n: None if g is None else g.copy() for n, _, g in core.parameters()}
    for n in names:
        if n in wanted:
            assert np.array_equal(grads[False][n], grads[True][n]), n
            assert np.abs(grads[False][n]).max() > 0, n
        else:
            assert grads[False][n] is None, n


def test_weights_of_a_mapped_model_are_not_parameters(llama):
    """A model loaded without trainable=True keeps its weights in the mapped files: none of them can take a
    gradient (only new heads and LoRA adapters are parameters there), though a training forward still runs."""
    core = _core._PretrainedModel.load(llama[0])
    assert core.parameters() == []
    with pytest.raises(ValueError, match="not loaded trainable"):
        core.set_requires_grad("lm_head.weight", True)
    st = _core._TrainState()
    out = core.train_forward(st, rand_ids(0, (1, 4), 3, 50))
    core.train_backward(st, np.ones_like(out))
