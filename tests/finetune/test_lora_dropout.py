"""LoRA dropout (PEFT's lora_dropout, issue 17): y = base(x) + scale * B A dropout(x) in training-mode forwards only.

The masks come from the core: adapter i of a model (in the order add_lora returns) drops element (row, column) of its
(rows, in) input in the step seeded s when not _core.lora_dropout_mask(_core.lora_dropout_seed(s, i), rows, in, p)
[row, column]; a training-mode call draws s from cpuformer.nn.init's generator. The tests rebuild those masks and
check the model against a NumPy float64 reference of one adapted Linear and against PEFT's torch model (train mode,
its dropout modules replaced by the same masks) for adapters in every layer; torch / transformers / peft are
test-only references."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ft_testlib import rand_ids, rel_max, small_batch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cpuformer import _core  # noqa: E402
from cpuformer.models import from_pretrained  # noqa: E402
from cpuformer.nn import init, lora  # noqa: E402
from cpuformer.train import AdamW, Trainer, task_loss  # noqa: E402


def _randomize_adapters(model, seed=0, std=0.3):
    rng = np.random.default_rng(seed)
    for _, p in lora.lora_parameters(model):
        p.data[...] = rng.standard_normal(p.shape).astype(np.float32) * std


def _train_forward(model, *args, step=0):
    """A training-mode call whose dropout seed is the one init.manual_seed(step) gives first; returns (out, seed)."""
    init.manual_seed(step)
    seed = init.next_seed()
    init.manual_seed(step)
    return model(*args), seed


def _keep(model, module, seed, rows, cols):
    """The mask (rows, cols) of `module`'s adapter in the training step seeded `seed`."""
    lc = model.lora_config
    index = lc["modules"].index(module)
    return _core.lora_dropout_mask(_core.lora_dropout_seed(seed, index), rows, cols, lc["lora_dropout"])


# ------------------------------------------------------------------------------------------------------------ (a)

def test_forward_and_gradients_equal_numpy_reference(ft_bert_seqcls):
    """LoRA on the classifier (its input, the pooler's output, is known from an eval forward): the training forward is
    base + scale * (m x / (1 - p)) A^T B^T in float64; grad A, grad B, and the input gradient (seen through the
    trainable pooler's weight gradient) equal the reference with the same mask; finite differences agree."""
    p, r, alpha = 0.4, 3, 6.0
    model = from_pretrained(ft_bert_seqcls[0], trainable=True, verbose=False)
    lora.add_lora(model, r=r, alpha=alpha, dropout=p, target_modules=["classifier"],
                  modules_to_save=["bert.pooler.dense"])
    _randomize_adapters(model, 1)
    ids, mask = small_batch(2, B=6)
    views = {n: v[0] for n, v in model._views().items()}
    f64 = {n: np.asarray(v, np.float64) for n, v in views.items()}
    W, b = f64["classifier.weight"], f64["classifier.bias"]
    A, Bm = f64["classifier.lora_A.weight"], f64["classifier.lora_B.weight"]
    Wp, bp = f64["bert.pooler.dense.weight"], f64["bert.pooler.dense.bias"]
    h0 = np.asarray(model.hidden_states(ids, mask), np.float64)[:, 0]
    pooled = np.tanh(h0 @ Wp.T + bp)
    scale = alpha / r

    model.train()
    out, seed = _train_forward(model, ids, mask, step=7)
    keep = _keep(model, "classifier", seed, *pooled.shape)
    assert 0 < (~keep).sum() < keep.size  # some dropped, some kept
    xd = keep * pooled / (1 - p)
    ref = pooled @ W.T + b + scale * (xd @ A.T) @ Bm.T
    assert rel_max(out, ref) < 1e-5
    undropped = pooled @ W.T + b + scale * (pooled @ A.T) @ Bm.T
    assert rel_max(out, undropped) > 1e-2  # the reference is not blind to the mask

    dout = np.random.default_rng(3).standard_normal(out.shape)
    model.zero_grad()
    model.backward(dout.astype(np.float32))
    grads = {n: np.asarray(v[1], np.float64) for n, v in model._views().items() if v[1] is not None}
    assert set(grads) == {"classifier.lora_A.weight", "classifier.lora_B.weight", "bert.pooler.dense.weight",
                          "bert.pooler.dense.bias"}
    u = dout @ Bm
    dpooled = dout @ W + keep / (1 - p) * (scale * u @ A)
    dz = dpooled * (1 - pooled ** 2)
    assert rel_max(grads["classifier.lora_A.weight"], scale * u.T @ xd) < 1e-5
    assert rel_max(grads["classifier.lora_B.weight"], scale * dout.T @ (xd @ A.T)) < 1e-5
    assert rel_max(grads["bert.pooler.dense.weight"], dz.T @ h0) < 1e-5
    assert rel_max(grads["bert.pooler.dense.bias"], dz.sum(0)) < 1e-5

    # finite differences of sum(dout * out) through the core's own forward (same step, same masks)
    def loss():
        return float((np.asarray(_train_forward(model, ids, mask, step=7)[0], np.float64) * dout).sum())

    rng = np.random.default_rng(4)
    for name, eps in (("classifier.lora_A.weight", 1e-2), ("classifier.lora_B.weight", 1e-2),
                      ("bert.pooler.dense.weight", 1e-3)):
        data = views[name]
        for flat in rng.choice(data.size, 4, replace=False):
            idx = np.unravel_index(flat, data.shape)
            v0 = data[idx]
            data[idx] = v0 + eps
            up = loss()
            data[idx] = v0 - eps
            down = loss()
            data[idx] = v0
            fd = (up - down) / (2 * eps)
            assert abs(fd - grads[name][idx]) <= 2e-3 * max(1.0, abs(fd)), (name, idx, fd, grads[name][idx])


# ------------------------------------------------------------------------------------------------------------ (b)

@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_dropped_fraction_is_p(p):
    """Over 10^6 elements the dropped fraction is p (binomial sd <= 5e-4: the tolerance is over 10 sd, and the seeds
    are fixed), every column and every row too (sd <= 0.016 over 1000: tolerance over 6 sd)."""
    for seed in (0, _core.lora_dropout_seed(123, 4)):
        keep = _core.lora_dropout_mask(seed, 1000, 1000, p)
        assert keep.shape == (1000, 1000) and keep.dtype == np.bool_
        assert abs((~keep).mean() - p) < 5e-3
        assert np.abs((~keep).mean(0) - p).max() < 0.1 and np.abs((~keep).mean(1) - p).max() < 0.1
    assert _core.lora_dropout_mask(5, 100, 100, 0.0).all()
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="p must be in"):
            _core.lora_dropout_mask(5, 3, 3, bad)


# ------------------------------------------------------------------------------------------------------------ (c)

class _Mask(torch.nn.Module):
    """PEFT's lora_dropout with the core's mask of one adapter: x * keep / (1 - p), keep of x's rows."""

    def __init__(self, seed, p):
        super().__init__()
        self.seed, self.p = seed, p

    def forward(self, x):
        cols = x.shape[-1]
        keep = _core.lora_dropout_mask(self.seed, x.numel() // cols, cols, self.p)
        return x * torch.from_numpy(keep.reshape(x.shape) / (1.0 - self.p)).to(x.dtype)


def _peft_with_masks(auto, path, model, adapter_dir, seed):
    """PEFT's model of our saved adapters, float64, train mode, each adapter's dropout replaced by the core's mask
    of that adapter in the step seeded `seed`."""
    peft = pytest.importorskip("peft")
    base = getattr(transformers, auto).from_pretrained(path)
    pm = peft.PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True).double().train()
    suffix = ".lora_A.weight"
    ours = {hf[:-len(suffix)]: n[:-len(suffix)] for n, hf in model.hf_names().items() if n.endswith(suffix)}
    lc = model.lora_config
    found = []
    for name, mod in pm.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer):
            module = ours[name[len("base_model.model."):]]
            index = lc["modules"].index(module)
            mod.lora_dropout["default"] = _Mask(_core.lora_dropout_seed(seed, index), lc["lora_dropout"])
            found.append(module)
    assert sorted(found) == sorted(lc["modules"])
    return pm


_FAMILIES = {  # fixture: targets, transformers' class, adapters
    "ft_bert_seqcls": (["query", "value"], "AutoModelForSequenceClassification", 4),
    "ft_gpt2": (["c_attn", "c_proj"], "AutoModelForCausalLM", 6),  # Conv1D (in, out) weights, fused q|k|v
    "ft_t5": (["q", "v", "wo"], "AutoModelForSeq2SeqLM", 16),  # encoder, decoder self- and cross-attention, FF
}


@pytest.mark.parametrize("name", list(_FAMILIES))
def test_every_layer_has_its_mask_against_peft(request, name, tmp_path):
    """Adapters in every layer, p = 0.5: our training forward and the adapters' gradients equal PEFT's train-mode
    model (float64) whose dropouts apply the masks the core documents, each adapter its own (masks of different
    adapters and of different steps differ); another step's masks do not match; the same step again gives bitwise
    the same output and gradients."""
    p = 0.5
    targets, auto, count = _FAMILIES[name]
    path = request.getfixturevalue(name)[0]
    model = from_pretrained(path, verbose=False)
    modules = lora.add_lora(model, r=4, alpha=8, dropout=p, target_modules=targets, modules_to_save=[])
    assert len(modules) == count
    _randomize_adapters(model, 2)
    lora.save_lora(model, tmp_path / "ad")
    ids, mask = small_batch(5)
    args = (ids, mask) if name != "ft_t5" else (ids, mask, rand_ids(7, (4, 5), 3, 100))
    kwargs = dict(input_ids=torch.tensor(args[0]), attention_mask=torch.tensor(args[1]))
    if name == "ft_t5":
        kwargs["decoder_input_ids"] = torch.tensor(args[2])
    model.train()
    out, seed = _train_forward(model, *args, step=11)
    dout = np.random.default_rng(6).standard_normal(out.shape)
    model.zero_grad()
    model.backward(dout.astype(np.float32))
    grads = {n: p_.grad.copy() for n, p_ in lora.lora_parameters(model)}

    other = _train_forward(model, *args, step=12)[1]
    widths = {m: model._views()[m + ".lora_A.weight"][0].shape[1] for m in modules}
    masks = {m: _keep(model, m, seed, ids.size, widths[m]) for m in modules}
    for i, m in enumerate(modules):
        assert not np.array_equal(masks[m], _keep(model, m, other, ids.size, widths[m]))
        for m2 in modules[i + 1:]:
            assert widths[m] != widths[m2] or not np.array_equal(masks[m], masks[m2])

    pm = _peft_with_masks(auto, path, model, tmp_path / "ad", seed)
    logits = pm(**kwargs).logits
    assert rel_max(out, logits.detach().numpy()) < 1e-5
    (logits * torch.from_numpy(dout)).sum().backward()
    hf = {"base_model.model." + h: n for n, h in model.hf_names().items()}
    checked = 0
    for n, prm in pm.named_parameters():
        if "lora_" in n:
            # float32 against float64 through up to four blocks (T5's encoder adapters); a wrong mask is O(1)
            assert rel_max(grads[hf[n.replace(".default.", ".")]], prm.grad.numpy()) < 1e-4, n
            checked += 1
    assert checked == 2 * count
    wrong = _peft_with_masks(auto, path, model, tmp_path / "ad", other)
    assert rel_max(out, wrong(**kwargs).logits.detach().numpy()) > 1e-2

    again, _ = _train_forward(model, *args, step=11)
    model.zero_grad()
    model.backward(dout.astype(np.float32))
    assert np.array_equal(again, out)
    assert all(np.array_equal(p_.grad, grads[n]) for n, p_ in lora.lora_parameters(model))
    assert not np.array_equal(_train_forward(model, *args, step=12)[0], out)


def test_recompute_gives_the_same_gradients(ft_t5):
    """Gradient checkpointing recomputes each block with the same LoRA masks: bitwise the same gradients."""
    model = from_pretrained(ft_t5[0], verbose=False)
    lora.add_lora(model, r=2, alpha=4, dropout=0.3, target_modules=["q", "v", "wi"])
    _randomize_adapters(model, 5)
    ids, mask = small_batch(9)
    dec = rand_ids(10, (4, 5), 3, 100)
    model.train()
    grads = []
    for recompute in (False, True):
        model.gradient_checkpointing = recompute
        model.zero_grad()
        out, _ = _train_forward(model, ids, mask, dec, step=3)
        model.backward(np.ones_like(out))
        grads.append({n: p.grad.copy() for n, p in lora.lora_parameters(model)})
    assert all(np.array_equal(grads[0][n], grads[1][n]) for n in grads[0])


# ------------------------------------------------------------------------------------------------------------ (d)

def test_eval_and_no_train_dropout_equal_p0(ft_llama):
    """Eval mode (inference), train_dropout=False and merge_lora never drop: bitwise what adapters with p = 0 give
    (merge: to float rounding); training mode with dropout differs."""
    ids, _ = small_batch(8)
    outs = {}
    for p in (0.0, 0.6):
        model = from_pretrained(ft_llama[0], trainable=True)
        lora.add_lora(model, r=4, alpha=8, dropout=p, target_modules=["q_proj", "v_proj", "down_proj"])
        _randomize_adapters(model, 3)
        evaluated = model(ids)
        model.train()
        model.train_dropout = False
        plain, _ = _train_forward(model, ids, step=1)
        model.train_dropout = True
        dropped, _ = _train_forward(model, ids, step=1)
        model.eval()
        lora.merge_lora(model)
        outs[p] = evaluated, plain, dropped, model(ids)
    (e0, t0, d0, m0), (e1, t1, d1, m1) = outs[0.0], outs[0.6]
    assert np.array_equal(e0, e1) and np.array_equal(t0, t1) and np.array_equal(d0, t0)
    assert rel_max(d1, t1) > 1e-2
    assert rel_max(m1, e1) < 1e-5 and rel_max(m0, e0) < 1e-5


def test_dropout_is_validated(ft_bert):
    model = from_pretrained(ft_bert[0])
    for bad in (-0.1, 1.0, 1.5, float("nan"), 0.99999999999, "0.1x", None, True):
        with pytest.raises(ValueError, match="dropout must be a number in \\[0, 1\\)"):
            lora.add_lora(model, r=2, dropout=bad)
    assert model.lora_config is None and not lora.lora_parameters(model)
    with pytest.raises(ValueError, match="dropout must be in"):
        model._core.add_lora(["query"], False, 2, 4.0, 0, 1.0)


# ------------------------------------------------------------------------------------------------------------ (f)

def test_saved_dropout_loads_in_peft_and_back(ft_bert, tmp_path):
    """A new head + LoRA with dropout trained a few steps: adapter_config.json says lora_dropout=p, PEFT loads it and
    gives our eval logits; load_lora reads p back, and the loaded model's training steps draw the same masks."""
    peft = pytest.importorskip("peft")
    p = 0.25
    model = from_pretrained(ft_bert[0], task="text-classification", num_labels=2, verbose=False)
    lora.add_lora(model, r=4, alpha=8, dropout=p, target_modules=["query", "value"])
    ids, mask = small_batch(4, B=6)
    init.manual_seed(0)
    Trainer(model, task_loss(model), AdamW(model, lr=1e-2), quiet=True, progress=False).fit(
        x=[ids, mask], y=np.arange(6) % 2, epochs=3, batch_size=6)
    model.eval()
    lora.save_lora(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["lora_dropout"] == p
    base = transformers.AutoModelForSequenceClassification.from_pretrained(ft_bert[0], num_labels=2).eval()
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()
    assert pm.peft_config["default"].lora_dropout == p
    ref = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.detach().numpy()
    assert rel_max(model(ids, mask), ref) < 1e-4

    again = from_pretrained(ft_bert[0], task="text-classification", num_labels=2, verbose=False)
    lora.load_lora(again, tmp_path / "ad")
    assert again.lora_config["lora_dropout"] == p
    assert np.array_equal(again(ids, mask), model(ids, mask))
    model.train(), again.train()
    assert np.array_equal(_train_forward(again, ids, mask, step=2)[0], _train_forward(model, ids, mask, step=2)[0])

    cfg["lora_dropout"] = 1.5
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lora_dropout must be a number"):
        lora.load_lora(from_pretrained(ft_bert[0]), tmp_path / "ad")


def test_vit_patch_projection_adapter_gets_gradients(tmp_path):
    """An adapter on ViT's patch projection (a frozen mapped base): its gradients are computed, with its dropout, and
    agree with finite differences of the training forward."""
    from ft_testlib import H
    path = H.save(H.build("vit_cls"), tmp_path / "vit")
    model = from_pretrained(path, verbose=False)
    modules = lora.add_lora(model, r=2, alpha=4, dropout=0.2, target_modules=["projection"], modules_to_save=[])
    assert modules == ["vit.embeddings.patch_embeddings.projection"]
    _randomize_adapters(model, 6, std=0.1)
    pixels = np.random.default_rng(7).standard_normal((2, 3, 32, 32)).astype(np.float32)
    model.train()
    out, _ = _train_forward(model, pixels, step=4)
    dout = np.random.default_rng(8).standard_normal(out.shape)
    model.zero_grad()
    model.backward(dout.astype(np.float32))
    (_, a), (_, b) = lora.lora_parameters(model)
    assert np.abs(a.grad).max() > 0 and np.abs(b.grad).max() > 0
    for p_ in (a, b):
        idx = np.unravel_index(int(np.abs(p_.grad).argmax()), p_.shape)
        v0, eps, side = p_.data[idx], 1e-2, []
        for v in (v0 + eps, v0 - eps):
            p_.data[idx] = v
            side.append(float((np.asarray(_train_forward(model, pixels, step=4)[0], np.float64) * dout).sum()))
        p_.data[idx] = v0
        fd = (side[0] - side[1]) / (2 * eps)
        assert abs(fd - p_.grad[idx]) <= 1e-2 * max(1.0, abs(fd)), (fd, p_.grad[idx])
