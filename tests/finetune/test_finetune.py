"""Fine-tuning pretrained models (issue 17): the Trainer-compatible surface of from_pretrained's models, task losses
against transformers, LoRA files against PEFT, MNRL against sentence-transformers, exact resume, save_pretrained and
the finetune job. Tiny random models; torch / transformers / peft / sentence-transformers are test-only references."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ft_testlib import H, rand_ids, rel_max, small_batch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cpuformer.models import SentenceEncoder, from_pretrained  # noqa: E402
from cpuformer.nn import init, lora  # noqa: E402
from cpuformer.train import (AdamW, CausalLMLoss, CrossEntropyLoss, MultipleNegativesRankingLoss,  # noqa: E402
                             QuestionAnsweringLoss, Trainer, shift_tokens_right, task_loss)


def test_requires_grad_semantics(ft_bert_seqcls):
    """A trainable load starts frozen (no gradient buffers); requires_grad gives one; the optimizer keeps moments
    only for parameters that require gradients and leaves frozen ones untouched."""
    model = from_pretrained(ft_bert_seqcls[0], trainable=True)
    params = dict(model.named_parameters())
    assert all(p.grad is None and not p.requires_grad for p in params.values())
    model.requires_grad_(True)
    for name, p in params.items():
        if name.startswith("bert.embeddings."):
            p.requires_grad = False
    assert params["bert.embeddings.word_embeddings.weight"].grad is None
    assert params["classifier.weight"].grad.shape == params["classifier.weight"].shape
    opt = AdamW(model, lr=1e-2)
    assert not any(k.startswith("bert.embeddings.") for k in opt.exp_avg)
    assert "classifier.weight" in opt.exp_avg
    frozen = params["bert.embeddings.word_embeddings.weight"].data.copy()
    head = params["classifier.weight"].data.copy()
    model.train()
    ids, mask = small_batch()
    out = model(ids, mask)
    model.backward(np.ones_like(out))
    opt.step()
    assert np.array_equal(params["bert.embeddings.word_embeddings.weight"].data, frozen)
    assert not np.array_equal(params["classifier.weight"].data, head)
    assert set(model.state_dict()) == {n for n, p in params.items() if p.requires_grad}


def test_new_task_head_is_reported_and_trainable(ft_bert, capsys):
    model = from_pretrained(ft_bert[0], task="text-classification", num_labels=5)
    assert model.new_parameters == ["classifier.weight", "classifier.bias"]
    assert "newly initialized" in capsys.readouterr().err
    assert model(*small_batch()).shape == (4, 5)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"classifier.weight", "classifier.bias"}  # a mapped base: only the head is a parameter
    ref = transformers.BertForSequenceClassification.from_pretrained(ft_bert[0], num_labels=5).eval()
    assert ref.classifier.bias.detach().abs().max() == 0  # transformers' init: zero bias, as ours


def _seqcls_trainer(model, **kw):
    return Trainer(model, task_loss(model), AdamW(model, lr=kw.pop("lr", 1e-3)), quiet=True, progress=False, **kw)


def test_full_finetune_decreases_loss(ft_bert_seqcls):
    model = from_pretrained(ft_bert_seqcls[0], trainable=True).requires_grad_(True)
    ids, mask = small_batch(1, B=8)
    y = np.arange(8) % 3
    init.manual_seed(0)
    tr = _seqcls_trainer(model, lr=3e-3)
    hist = tr.fit(x=[ids, mask], y=y, epochs=8, batch_size=8, shuffle=False)
    losses = [r["loss"] for r in hist if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]


def test_task_losses_equal_transformers(ft_llama, ft_bert_qa, ft_t5):
    """Causal LM (shift inside), QA (clamped positions) and seq2seq (shift_tokens_right) losses equal the loss
    transformers computes from labels."""
    ids, _ = small_batch(2)
    labels = ids.copy()
    labels[0, :2] = -100
    model = from_pretrained(ft_llama[0])
    loss, _, _ = CausalLMLoss()(model(ids), labels)
    ref = ft_llama[1](input_ids=torch.tensor(ids), labels=torch.tensor(labels)).loss.item()
    assert abs(loss - ref) < 1e-5 * max(1, abs(ref))
    qa = from_pretrained(ft_bert_qa[0])
    pos = np.array([[1, 3], [0, 50], [6, 6], [2, 4]])  # 50: beyond the sequence, clamped and ignored
    loss, grads, _ = QuestionAnsweringLoss()(qa(ids), pos)
    ref = ft_bert_qa[1](input_ids=torch.tensor(ids), start_positions=torch.tensor(pos[:, 0]),
                        end_positions=torch.tensor(pos[:, 1])).loss.item()
    assert abs(loss - ref) < 1e-5 and len(grads) == 2
    t5 = from_pretrained(ft_t5[0])
    tgt = rand_ids(3, (4, 5), 3, 100)
    tgt[1, 3:] = -100
    dec = shift_tokens_right(tgt, t5._core.pad_token_id, t5._core.decoder_start_token_id)
    loss, _, _ = CrossEntropyLoss()(t5(ids, None, dec), tgt)
    ref = ft_t5[1](input_ids=torch.tensor(ids), labels=torch.tensor(tgt)).loss.item()
    assert abs(loss - ref) < 1e-5 * max(1, abs(ref))


def _randomize_adapters(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, p in lora.lora_parameters(model):
        p.data[...] = rng.standard_normal(p.shape).astype(np.float32) * 0.2


def test_lora_saved_loads_in_peft_with_new_head(ft_bert, tmp_path):
    """A new head + LoRA on a memory-mapped base, a few training steps, save_lora: PEFT loads it on transformers'
    model of the base directory and gives our logits."""
    peft = pytest.importorskip("peft")
    model = from_pretrained(ft_bert[0], task="text-classification", num_labels=2, verbose=False)
    modules = lora.add_lora(model, r=4, alpha=8, target_modules=["query", "value"])
    assert len(modules) == 4
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {m + s for m in modules for s in (".lora_A.weight", ".lora_B.weight")} | {"classifier.weight", "classifier.bias"}
    ids, mask = small_batch(4, B=6)
    init.manual_seed(0)
    _seqcls_trainer(model, lr=1e-2).fit(x=[ids, mask], y=np.arange(6) % 2, epochs=3, batch_size=6)
    model.eval()
    lora.save_lora(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["modules_to_save"] == ["classifier"]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(ft_bert[0], num_labels=2).eval()
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()
    ref = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.detach().numpy()
    assert rel_max(model(ids, mask), ref) < 1e-4


@pytest.mark.parametrize("name", ["ft_llama", "ft_gpt2"])
def test_peft_saved_adapter_loads(request, name, tmp_path):
    peft = pytest.importorskip("peft")
    path, hf = request.getfixturevalue(name)
    base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    targets = lora.DEFAULT_TARGETS["gpt2" if name == "ft_gpt2" else "llama"]
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                   fan_in_fan_out=name == "ft_gpt2"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(str(tmp_path))
    pm.eval()
    ids, _ = small_batch(5)
    ref = pm(input_ids=torch.tensor(ids)).logits.detach().numpy()
    model = from_pretrained(path)
    lora.load_lora(model, tmp_path)
    assert rel_max(model(ids), ref) < 1e-4
    # and back: save_lora -> PEFT loads the same adapters
    lora.save_lora(model, tmp_path / "again")
    base2 = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    pm2 = peft.PeftModel.from_pretrained(base2, str(tmp_path / "again")).eval()
    assert rel_max(pm2(input_ids=torch.tensor(ids)).logits.detach().numpy(), ref) < 1e-5


def test_merge_lora_and_save_pretrained(ft_llama, tmp_path):
    """save_pretrained folds the adapters into a copy (the model keeps them); from_pretrained(saved) and
    transformers give the adapted model's logits; merge_lora in place gives them too."""
    model = from_pretrained(ft_llama[0], trainable=True)
    lora.add_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    _randomize_adapters(model)
    ids, _ = small_batch(6)
    adapted = model(ids)
    model.save_pretrained(tmp_path)
    assert lora.lora_parameters(model)  # still there
    assert rel_max(from_pretrained(tmp_path)(ids), adapted) < 1e-5
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert rel_max(ref(input_ids=torch.tensor(ids)).logits.detach().numpy(), adapted) < 1e-4
    lora.merge_lora(model)
    assert not lora.lora_parameters(model)
    assert rel_max(model(ids), adapted) < 1e-5
    mapped = from_pretrained(ft_llama[0])
    lora.add_lora(mapped, r=2, alpha=4)
    with pytest.raises(ValueError, match="trainable=True"):
        mapped.save_pretrained(tmp_path / "no")


def test_save_pretrained_round_trip_new_head(ft_bert, tmp_path):
    model = from_pretrained(ft_bert[0], trainable=True, task="text-classification", num_labels=2, verbose=False)
    model.requires_grad_(True)
    ids, mask = small_batch(7, B=6)
    init.manual_seed(0)
    _seqcls_trainer(model, lr=1e-2).fit(x=[ids, mask], y=np.arange(6) % 2, epochs=2, batch_size=6)
    model.eval()
    model.save_pretrained(tmp_path, labels=["neg", "pos"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"] and cfg["id2label"] == {"0": "neg", "1": "pos"}
    again = from_pretrained(tmp_path)
    assert again.new_parameters == []
    assert np.array_equal(again(ids, mask), model(ids, mask))
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert rel_max(ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.detach().numpy(),
                model(ids, mask)) < 1e-4


def test_recompute_gives_the_same_gradients(ft_bert_seqcls):
    model = from_pretrained(ft_bert_seqcls[0], trainable=True).requires_grad_(True).train()
    ids, mask = small_batch(8)
    grads = []
    for recompute in (False, True):
        model.gradient_checkpointing = recompute
        model.zero_grad()
        init.manual_seed(3)  # the same dropout masks
        out = model(ids, mask)
        model.backward(np.ones_like(out))
        grads.append({n: p.grad.copy() for n, p in model.named_parameters()})
    assert all(np.array_equal(grads[0][n], grads[1][n]) for n in grads[0])


@pytest.mark.parametrize("fixture", ["ft_bert_seqcls", "ft_llama", "ft_t5"])
def test_work_buffers_kept_between_steps_change_nothing(request, fixture):
    """A thread's training state keeps its saved activations and work buffers from step to step (grown, never
    shrunk): a step after a larger one (longer rows, more of them, dropout on) gives bitwise the gradients and
    outputs a fresh model gives."""
    path = request.getfixturevalue(fixture)[0]
    seq2seq = fixture == "ft_t5"

    def step(model, B, T, seed):
        ids, mask = small_batch(seed, B=B, T=T)
        args = (ids, mask) + ((ids[:, ::-1].copy(),) if seq2seq else ())
        model.zero_grad()
        init.manual_seed(seed)
        out = model(*args)
        model.backward(np.cos(np.arange(out.size, dtype=np.float32)).reshape(out.shape))
        return out, {n: p.grad.copy() for n, p in model.named_parameters()}

    used = from_pretrained(path, trainable=True).requires_grad_(True).train()
    used.train_dropout = True
    step(used, 6, 11, 1)
    used.train_dropout = False
    for fresh_each in range(2):
        fresh = from_pretrained(path, trainable=True).requires_grad_(True).train()
        fresh.train_dropout = used.train_dropout = bool(fresh_each)
        out_a, grads_a = step(used, 3, 5, 2 + fresh_each)
        out_b, grads_b = step(fresh, 3, 5, 2 + fresh_each)
        assert np.array_equal(out_a, out_b)
        assert all(np.array_equal(grads_a[n], grads_b[n]) for n in grads_b)


def test_zero_grad_clears_every_gradient_across_threads(tmp_path):
    """zero_grad splits all the gradients' elements between the threads (spans cut inside and across tensors): every
    element of every gradient is zero afterwards, with 1 and 2 threads, on a model big enough to be split."""
    import cpuformer
    cfg = transformers.BertConfig(vocab_size=6001, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=200, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path, safe_serialization=True)
    model = from_pretrained(str(tmp_path), trainable=True).requires_grad_(True).train()
    params = dict(model.named_parameters())
    assert sum(p.grad.size for p in params.values()) > 2 * (1 << 18)
    ids, mask = small_batch(3, B=3, T=9)
    before = cpuformer.get_num_threads()
    try:
        for threads in (1, 2):
            cpuformer.set_num_threads(threads)
            for p in params.values():
                p.grad[...] = 1.5  # every element nonzero, not only those a backward reaches
            out = model(ids, mask)
            model.backward(np.ones_like(out))
            model.zero_grad()
            assert all(not p.grad.any() for p in params.values())
    finally:
        cpuformer.set_num_threads(before)


def _lora_run(path, out_dir, steps, resume=False, lora_dropout=0.0):
    init.manual_seed(0)
    model = from_pretrained(path, task="text-classification", num_labels=2, verbose=False)
    lora.add_lora(model, r=2, alpha=4, dropout=lora_dropout, seed=1)
    ids, mask = small_batch(9, B=12)
    tr = _seqcls_trainer(model, lr=1e-2, output_dir=str(out_dir), save_every=2)
    tr.fit(x=[ids, mask], y=np.arange(12) % 2, epochs=10, batch_size=4, max_steps=steps,
           resume_from="latest" if resume else None)
    return model, [r["loss"] for r in tr.history if "loss" in r]


@pytest.mark.parametrize("lora_dropout", [0.0, 0.3])
def test_lora_resume_is_exact(tmp_path, ft_bert, lora_dropout):
    """A LoRA fine-tune (frozen mapped base, dropout on, LoRA dropout off and on) stopped at step 4 and resumed from
    its checkpoint equals the uninterrupted run bitwise; the checkpoint holds only the adapters and the head."""
    d = tmp_path / "dropout_bert"
    import shutil
    shutil.copytree(ft_bert[0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    (d / "config.json").write_text(json.dumps(cfg))
    full, full_losses = _lora_run(str(d), tmp_path / "a", 7, lora_dropout=lora_dropout)
    _lora_run(str(d), tmp_path / "b", 4, lora_dropout=lora_dropout)
    resumed, losses = _lora_run(str(d), tmp_path / "b", 7, resume=True, lora_dropout=lora_dropout)
    assert losses == full_losses
    if lora_dropout:  # the LoRA dropout is in effect: the run differs from one without it
        assert _lora_run(str(d), tmp_path / "c", 7)[1] != full_losses
    a, b = full.state_dict(), resumed.state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    from cpuformer.io import load_safetensors
    saved, _ = load_safetensors(str(tmp_path / "b" / "checkpoint-7" / "model.safetensors"))
    assert set(saved) == set(a) and all(("lora_" in k) or k.startswith("classifier.") for k in saved)


def test_mnrl_matches_sentence_transformers(ft_bert_tok):
    st_mod = pytest.importorskip("sentence_transformers")
    enc = SentenceEncoder.from_pretrained(ft_bert_tok, trainable=True).requires_grad_(True).train()
    enc.model.train_dropout = False
    anchors, positives = H.SENTENCES[:3], H.SENTENCES[3:6]
    b = enc.tokenizer(anchors + positives, padding=True, truncation=True, max_length=24, return_tensors="np")
    emb = enc(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    loss, grad, n = MultipleNegativesRankingLoss()(emb, np.zeros(3))
    enc.backward(grad)
    st = st_mod.SentenceTransformer(ft_bert_tok, device="cpu")
    st.train()
    from sentence_transformers.sentence_transformer import losses as st_losses
    ref_loss = st_losses.MultipleNegativesRankingLoss(st)
    ref = ref_loss([st.tokenize(anchors), st.tokenize(positives)], None)
    ref.backward()
    assert abs(loss - ref.item()) < 1e-5 and n == 3
    theirs = dict(st[0].auto_model.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in theirs.values() if p.grad is not None)
    for name, p in enc.named_parameters():
        tg = theirs[name].grad
        if tg is None:  # the pooler: not on the path
            assert not np.any(p.grad)
            continue
        tg = tg.numpy()
        tol = 1e-5 * scale if name.endswith("key.bias") else 1e-4 * max(np.abs(tg).max(), 1e-6 * scale)
        assert np.abs(p.grad - tg).max() <= tol, name


def _cli(*args, cwd):
    # The installed package (this interpreter's), as a user runs it: never the source folder, which has no _core.
    return subprocess.run([sys.executable, "-m", "cpuformer", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_finetune_job_classify_lora(ft_bert_tok, tmp_path):
    rows = [f"{s}\t{'pos' if i % 2 else 'neg'}" for i, s in enumerate(H.SENTENCES * 2)]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    r = _cli("finetune", ft_bert_tok, "--task", "classify", "--train", "train.tsv", "--steps", "3",
             "--batch-size", "4", "--lora", "2", "--lora-dropout", "0.1", "--output-dir", str(out), "--quiet",
             "--threads", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    model = from_pretrained(out)
    assert model.head == "sequence-classification" and model.id2label == {0: "neg", 1: "pos"}
    assert model.tokenizer is not None and (out / "lora" / "adapter_config.json").is_file()
    assert json.loads((out / "lora" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    assert (out / "checkpoint-3").is_dir()
    r = _cli("finetune", ft_bert_tok, "--task", "classify", "--train", "train.tsv", "--steps", "4",
             "--batch-size", "4", "--lora", "2", "--lora-dropout", "0.1", "--output-dir", str(out), "--resume",
             "--threads", "1", cwd=tmp_path)
    assert r.returncode == 0 and "resumed from checkpoint-3" in r.stdout, r.stderr
    r = _cli("finetune", ft_bert_tok, "--task", "classify", "--train", "train.tsv", "--steps", "1", "--lora", "2",
             "--lora-dropout", "1", cwd=tmp_path)
    assert r.returncode == 2 and "--lora-dropout" in r.stderr
    r = _cli("finetune", ft_bert_tok, "--task", "lm", "--train", "train.tsv", "--steps", "1", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "causal-lm" in r.stderr


def test_finetune_job_embed(ft_bert_tok, tmp_path):
    pairs = [f"{a}\t{b}" for a, b in zip(H.SENTENCES, H.SENTENCES[1:] + H.SENTENCES[:1])]
    (tmp_path / "pairs.tsv").write_text("\n".join(pairs) + "\n")
    out = tmp_path / "emb"
    r = _cli("finetune", ft_bert_tok, "--task", "embed", "--train", "pairs.tsv", "--steps", "2", "--batch-size", "3",
             "--output-dir", str(out), "--quiet", "--recompute", "--threads", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    enc = SentenceEncoder.from_pretrained(out)
    assert enc.encode(["the cat sat"]).shape == (1, 32)
