"""A character-level GPT on Tiny Shakespeare, then samples from it with the key/value cache.

    python examples/char_lm_shakespeare.py ../shared/data/tinyshakespeare     # train.txt and validation.txt

The same job as `python -m cpuformer lm`, written out with the library API.
"""
import os
import sys

import numpy as np

import cpuformer.nn as nn
from cpuformer.data import CharTokenizer, LanguageModelDataset, read_text
from cpuformer.models import GPT
from cpuformer.train import AdamW, Trainer, warmup_cosine

folder = sys.argv[1] if len(sys.argv) > 1 else "data/tinyshakespeare"
train_text, val_text = (read_text(os.path.join(folder, f)) for f in ("train.txt", "validation.txt"))
tok = CharTokenizer.from_corpus([train_text])
train = LanguageModelDataset(tok.encode(train_text), block_size=128)
val = LanguageModelDataset(tok.encode(val_text), block_size=128)

nn.init.manual_seed(0)
model = GPT(tok.vocab_size, block_size=128, n_layer=4, n_head=6, n_embd=192, dropout=0.1)
steps = 3000
trainer = Trainer(model, optimizer=AdamW(model, lr=2e-3, betas=(0.9, 0.98)), schedule=warmup_cosine(2e-3, 200, steps),
                  max_grad_norm=1.0, metrics=["perplexity"], eval_every=500, output_dir="runs/shakespeare",
                  save_every=500)
trainer.fit(train, val, epochs=100, max_steps=steps, batch_size=32, resume_from="latest")
print(f"validation loss {trainer.evaluate(val)['loss']:.4f} nats/char")
prompt = np.array([tok.encode("ROMEO:")])
print(tok.decode(model.generate(prompt, 400, do_sample=True, temperature=0.8, top_k=40, seed=0)[0]))
