"""Write small tokenizer.json files of every kind (WordPiece/BERT, byte-level BPE, Metaspace BPE with byte
fallback, Unigram, WordLevel) as seeds for the tokenizer fuzz target: python make_tokenizer_seeds.py DIR.
Needs the `tokenizers` package (a test-only dependency)."""
import os
import sys

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

TEXT = ["The quick brown fox jumps over the lazy dog.", "Café naïve 中文 😀!", "Hello, world!  Two  spaces.",
        "Ein Mann mit einem orangefarbenen Hut.", "Un homme avec un chapeau orange."] * 20


def main(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    bert = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    bert.normalizer = normalizers.BertNormalizer(lowercase=True)
    bert.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    bert.train_from_iterator(TEXT, trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials, show_progress=False))
    bert.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                        special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    bert.decoder = decoders.WordPiece()
    gpt2 = Tokenizer(models.BPE())
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    gpt2.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    gpt2.post_processor = processors.ByteLevel(trim_offsets=False)
    gpt2.decoder = decoders.ByteLevel()
    llama = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    llama.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    llama.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    llama.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.NFKC()
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.train_from_iterator(TEXT, trainers.UnigramTrainer(vocab_size=100, special_tokens=["<pad>", "</s>", "<unk>"],
                                                              unk_token="<unk>", show_progress=False))
    unigram.decoder = decoders.Metaspace()
    word = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    for name, tok in [("bert", bert), ("gpt2", gpt2), ("llama", llama), ("unigram", unigram), ("wordlevel", word)]:
        with open(os.path.join(folder, f"{name}.json"), "w", encoding="utf-8") as f:
            f.write(tok.to_str())


if __name__ == "__main__":
    main(sys.argv[1])
