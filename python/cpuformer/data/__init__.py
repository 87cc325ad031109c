"""Data: tokenizers, readers, padding, datasets and batching."""
from __future__ import annotations

from .readers import ReadReport, read_parallel, read_text, read_tsv
from .sequences import (IGNORE_INDEX, ArrayDataset, LanguageModelDataset, Seq2SeqDataset,
                        SequenceClassificationDataset, batch_indices, pad_sequences)
from .tokenizers import CharTokenizer, Tokenizer, WordTokenizer, load_tokenizer

__all__ = ["CharTokenizer", "WordTokenizer", "Tokenizer", "load_tokenizer", "read_text", "read_tsv", "read_parallel",
           "ReadReport", "pad_sequences", "batch_indices", "IGNORE_INDEX", "ArrayDataset",
           "SequenceClassificationDataset", "LanguageModelDataset", "Seq2SeqDataset"]
