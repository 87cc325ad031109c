"""English -> French translation on Multi30k with an encoder-decoder Transformer; BLEU with beam search.

    python examples/translate_multi30k.py ../shared/data/multi30k     # {train,validation,test}.{en,fr}

The same job as `python -m cpuformer translate`, written out with the library API.
"""
import os
import sys

import numpy as np

import cpuformer.nn as nn
from cpuformer.data import Seq2SeqDataset, WordTokenizer, pad_sequences, read_parallel
from cpuformer.models import Seq2SeqTransformer
from cpuformer.train import AdamW, CrossEntropyLoss, Trainer, bleu, warmup_cosine

folder = sys.argv[1] if len(sys.argv) > 1 else "data/multi30k"
pairs = {s: read_parallel(os.path.join(folder, f"{s}.en"), os.path.join(folder, f"{s}.fr"))
         for s in ("train", "validation", "test")}
en = WordTokenizer.from_corpus([s for s, _ in pairs["train"]], min_freq=2)
fr = WordTokenizer.from_corpus([t for _, t in pairs["train"]], min_freq=2)
data = {s: Seq2SeqDataset([en.encode(a) for a, _ in p], [fr.encode(b) for _, b in p], fr.pad_id, fr.bos_id,
                          fr.eos_id, max_len=50) for s, p in pairs.items()}

nn.init.manual_seed(0)
model = Seq2SeqTransformer(en.vocab_size, fr.vocab_size, d_model=256, nhead=4, num_encoder_layers=3,
                           num_decoder_layers=3, dim_feedforward=1024, dropout=0.1, max_len=52)
steps = 5000
trainer = Trainer(model, CrossEntropyLoss(label_smoothing=0.1), AdamW(model, lr=7e-4, betas=(0.9, 0.98)),
                  schedule=warmup_cosine(7e-4, 200, steps), max_grad_norm=1.0, eval_every=1000)
trainer.fit(data["train"], data["validation"], epochs=50, max_steps=steps, batch_size=64, bucket=True)

sources = [en.encode(s)[:50] or [en.unk_id] for s, _ in pairs["test"]]
hypotheses = []
for i in range(0, len(sources), 64):
    batch = pad_sequences(sources[i:i + 64], padding="post", value=en.pad_id)
    hypotheses += [fr.decode(ids) for ids in model.translate(batch, max_len=50, beam_size=4)]
references = [" ".join(fr.split(t)) for _, t in pairs["test"]]
print(f"test BLEU {bleu([' '.join(fr.split(h)) for h in hypotheses], references):.2f}")
for (src, ref), hyp in list(zip(pairs["test"], hypotheses))[:3]:
    print(f"{src}\n  -> {hyp}\n  (reference: {ref})")
