"""Sentiment classification on SST-2 with a small Transformer encoder, trained from scratch on the CPU.

    python examples/sentiment_sst2.py ../shared/data/sst2      # a folder with train.tsv, validation.tsv, test.tsv

The same job as `python -m cpuformer classify`, written out with the library API: tokenize, pad per batch, build
the model, train with AdamW + warm-up/cosine, evaluate, predict.
"""
import os
import sys

import cpuformer.nn as nn
from cpuformer.data import SequenceClassificationDataset, WordTokenizer, read_tsv
from cpuformer.models import TransformerClassifier
from cpuformer.train import AdamW, Trainer, classification_metrics, warmup_cosine

folder = sys.argv[1] if len(sys.argv) > 1 else "data/sst2"
splits = {s: read_tsv(os.path.join(folder, f"{s}.tsv"), label_column=1) for s in ("train", "validation", "test")}
tok = WordTokenizer.from_corpus([text for text, _ in splits["train"]], min_freq=2)
data = {s: SequenceClassificationDataset([tok.encode(t) or [tok.unk_id] for t, _ in rows], [y for _, y in rows],
                                         pad_id=tok.pad_id, max_len=64) for s, rows in splits.items()}

nn.init.manual_seed(0)
model = TransformerClassifier(tok.vocab_size, num_classes=2, d_model=128, nhead=4, num_layers=2, dim_feedforward=256,
                              dropout=0.2, max_len=64)
steps = 4000
trainer = Trainer(model, optimizer=AdamW(model, lr=5e-4), schedule=warmup_cosine(5e-4, 200, steps),
                  max_grad_norm=1.0, metrics=["accuracy", "f1"], eval_every=1000)
trainer.fit(data["train"], data["validation"], epochs=10, max_steps=steps, batch_size=64, bucket=True)
for split in ("validation", "test"):
    m = classification_metrics(trainer.predict(data[split]).argmax(-1), data[split].labels)
    print(f"{split}: accuracy {m['accuracy']:.4f}, macro F1 {m['f1']:.4f}")
