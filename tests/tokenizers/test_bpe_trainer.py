"""cpuformer.train_bpe (cpp/src/bpe_trainer.cpp) against the `tokenizers` library's byte-level BPE trainer (0.23):
the same vocab, merges, added tokens and file layout for the same corpus and settings, and the same encodings."""
from __future__ import annotations

import json
import random

import pytest

import cpuformer

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from _corpus import DATA  # noqa: E402
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared/data not present")


def oracle(vocab_size, min_frequency, special_tokens, files=None, texts=None):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    if files is not None:
        tok.train([str(f) for f in files], trainer)
    else:
        tok.train_from_iterator(texts, trainer)
    return tok


def assert_same(ours_json, ref_tok):
    ours = json.loads(ours_json)
    ref = json.loads(ref_tok.to_str())
    assert ours["model"]["vocab"] == ref["model"]["vocab"]
    assert ours["model"]["merges"] == ref["model"]["merges"]
    assert ours == ref  # the whole file: added tokens, pre-tokenizer, post-processor, decoder, model options


CORPORA = [
    ("tinyshakespeare/input.txt", 300, 1, ()),
    ("tinyshakespeare/input.txt", 1000, 2, ("<pad>", "<unk>", "<bos>", "<eos>")),
    ("tinyshakespeare/input.txt", 5000, 2, ("<|endoftext|>",)),
    ("tinyshakespeare/input.txt", 30000, 1, ("<pad>",)),  # runs out of pairs before 30000
    ("multi30k/train.en", 5000, 1, ("<pad>", "<unk>")),
    ("multi30k/train.de", 1000, 2, ("<s>", "</s>")),
    ("multi30k/train.fr", 5000, 2, ("<pad>", "<unk>", "<bos>", "<eos>")),
    ("multi30k/validation.de", 20000, 3, ("!", "<s>", "<s>", "Ġthe")),  # specials equal to vocab chars, repeats
]


@needs_data
@pytest.mark.parametrize("rel,vocab_size,min_frequency,specials", CORPORA)
def test_same_as_tokenizers_on_corpora(rel, vocab_size, min_frequency, specials):
    path = DATA / rel
    if not path.is_file():
        pytest.skip(f"{rel} not present")
    ref = oracle(vocab_size, min_frequency, specials, files=[path])
    ours = cpuformer.train_bpe(path, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials)
    assert_same(ours, ref)
    # Loaded back by tokenizers: identical encodings to the trainer-made tokenizer.
    loaded = tokenizers.Tokenizer.from_str(ours)
    text = path.read_text(encoding="utf-8")[:30000]
    lines = text.split("\n")[:200]
    assert loaded.encode(text).ids == ref.encode(text).ids
    assert [e.ids for e in loaded.encode_batch(lines)] == [e.ids for e in ref.encode_batch(lines)]
    # And by cpuformer's own Tokenizer.
    mine = cpuformer.Tokenizer.from_str(ours)
    enc = mine.encode(text)
    assert list(enc.ids) == ref.encode(text).ids
    assert mine.decode(enc.ids) == text


@needs_data
def test_several_files_and_bytelevel_bpe_tokenizer():
    files = [DATA / "multi30k" / "validation.en", DATA / "multi30k" / "validation.fr"]
    if not all(f.is_file() for f in files):
        pytest.skip("multi30k not present")
    ours = json.loads(cpuformer.train_bpe(files, vocab_size=2000, min_frequency=2, special_tokens=["<unk>"]))
    ref = tokenizers.ByteLevelBPETokenizer()
    ref.train([str(f) for f in files], vocab_size=2000, min_frequency=2, special_tokens=["<unk>"],
              show_progress=False)
    ref_model = json.loads(ref.to_str())["model"]
    assert ours["model"]["vocab"] == ref_model["vocab"]
    assert ours["model"]["merges"] == ref_model["merges"]


def random_texts(rng, n, alphabet):
    out = []
    for _ in range(n):
        words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(0, 12))]
        seps = [rng.choice([" ", " ", "  ", "\n", ", ", "'s ", "\t"]) for _ in words]
        out.append("".join(w + s for w, s in zip(words, seps)))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_same_as_tokenizers_on_random_texts(seed):
    # Small alphabets and no frequency floor: many equal counts (the tie-break), merges whose result string is
    # already in the vocab, repeated symbols (aaa), and running out of pairs.
    rng = random.Random(seed)
    alphabet = rng.choice(["ab", "abc", "aab", "abcdé", "xy1 2", "ßü€𝔘a"])
    texts = random_texts(rng, rng.randint(1, 60), alphabet)
    vocab_size = rng.choice([256, 260, 300, 400, 2000])
    min_frequency = rng.choice([0, 1, 2])
    specials = rng.choice([(), ("<pad>",), ("a", "<s>", "a")])
    ref = oracle(vocab_size, min_frequency, specials, texts=texts)
    ours = cpuformer.train_bpe(texts=texts, vocab_size=vocab_size, min_frequency=min_frequency,
                               special_tokens=specials)
    assert_same(ours, ref)


def test_texts_and_files_are_sequences_as_in_tokenizers(tmp_path):
    # A file is fed line by line (each with its line ending); a text is one sequence.
    content = "a  \n\n  b c\r\nhello   world \n\n\nend"
    f = tmp_path / "c.txt"
    f.write_bytes(content.encode("utf-8"))
    assert_same(cpuformer.train_bpe(f, vocab_size=300, min_frequency=1, special_tokens=()),
                oracle(300, 1, (), files=[f]))
    assert_same(cpuformer.train_bpe(texts=[content], vocab_size=300, min_frequency=1, special_tokens=()),
                oracle(300, 1, (), texts=[content]))


def test_small_vocab_and_empty_input(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    out = json.loads(cpuformer.train_bpe(empty, vocab_size=10, special_tokens=("<pad>", "<unk>")))
    vocab = out["model"]["vocab"]
    assert len(vocab) == 258 and vocab["<pad>"] == 0 and vocab["<unk>"] == 1 and vocab["!"] == 2
    assert out["model"]["merges"] == []
    assert [t["content"] for t in out["added_tokens"]] == ["<pad>", "<unk>"]
    assert_same(cpuformer.train_bpe(texts=["hello hello"], vocab_size=0, special_tokens=()),
                oracle(0, 2, (), texts=["hello hello"]))


def test_path_written_atomically(tmp_path):
    target = tmp_path / "tokenizer.json"
    target.write_text("old")
    text = cpuformer.train_bpe(texts=["the cat sat on the mat"] * 3, vocab_size=270, min_frequency=2,
                               special_tokens=["<pad>"], path=target)
    assert target.read_text(encoding="utf-8") == text
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
    tok = tokenizers.Tokenizer.from_file(str(target))
    assert tok.encode("the cat").tokens == ["the", "Ġcat"]
    assert cpuformer.Tokenizer.from_file(target).encode("the cat").tokens == ["the", "Ġcat"]


def test_errors(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt"):
        cpuformer.train_bpe(bad)
    with pytest.raises(FileNotFoundError):
        cpuformer.train_bpe(tmp_path / "missing.txt")
    with pytest.raises(ValueError):
        cpuformer.train_bpe()
    with pytest.raises(TypeError):
        cpuformer.train_bpe(texts="one string")
    with pytest.raises(TypeError):
        cpuformer.train_bpe(texts=[b"bytes"])
    with pytest.raises(TypeError):
        cpuformer.train_bpe([123])
    with pytest.raises(ValueError, match="surrogate"):
        cpuformer.train_bpe(texts=["a\ud800b"])
    with pytest.raises(ValueError):
        cpuformer.train_bpe(texts=["a"], vocab_size=-1)
    with pytest.raises(TypeError):
        cpuformer.train_bpe(texts=["a"], vocab_size=3.5)
    with pytest.raises(TypeError):
        cpuformer.train_bpe(texts=["a"], min_frequency=True)
    with pytest.raises(ValueError):
        cpuformer.train_bpe(texts=["a"], min_frequency=-2)
    with pytest.raises(ValueError):
        cpuformer.train_bpe(texts=["a"], special_tokens=[""])
    with pytest.raises(TypeError):
        cpuformer.train_bpe(texts=["a"], special_tokens="<pad>")
    for opt in ("limit_alphabet", "continuing_subword_prefix", "end_of_word_suffix"):
        with pytest.raises(ValueError, match=opt):
            cpuformer.train_bpe(texts=["a"], **{opt: 10 if opt == "limit_alphabet" else "##"})
    with pytest.raises(ValueError, match="latin1.txt"):  # the core's own check
        cpuformer._core._bpe_train([str(bad)], [], 300, 1, [])


def test_special_tokens_needing_json_escapes():
    specials = ['<"\\\n\x01>', "été", "\u2028", "<s>"]
    texts = ['he said "hi"\n\x01 été\u2028 ok'] * 4
    ours = cpuformer.train_bpe(texts=texts, vocab_size=300, min_frequency=1, special_tokens=specials)
    ref = oracle(300, 1, specials, texts=texts)
    assert_same(ours, ref)
    s = texts[0] + specials[0] + "<s>"
    assert tokenizers.Tokenizer.from_str(ours).encode(s).ids == ref.encode(s).ids
    assert list(cpuformer.Tokenizer.from_str(ours).encode(s).ids) == ref.encode(s).ids
