"""Models for the three classic jobs: classification, language modelling and translation."""
from __future__ import annotations

from .classifier import TransformerClassifier
from .gpt import GPT, sample_next
from .pretrained import (BertModel, CausalLM, EncoderModel, PretrainedModel, Seq2SeqLM, SentenceEncoder, VisionModel,
                         from_pretrained, mean_pool)
from .seq2seq import Seq2SeqTransformer

__all__ = ["TransformerClassifier", "GPT", "Seq2SeqTransformer", "sample_next", "BertModel", "from_pretrained",
           "mean_pool", "PretrainedModel", "EncoderModel", "CausalLM", "Seq2SeqLM", "VisionModel", "SentenceEncoder"]
