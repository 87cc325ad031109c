"""Training: losses, metrics, optimizers, schedules and the Trainer."""
from __future__ import annotations

from .losses import (CausalLMLoss, CrossEntropyLoss, MSELoss, MultipleNegativesRankingLoss, QuestionAnsweringLoss,
                     shift_tokens_right, task_loss)
from .metrics import accuracy, bleu, classification_metrics, perplexity, precision_recall_f1
from .optim import SGD, AdamW, Schedule, constant, inverse_sqrt, warmup_cosine, warmup_linear
from .trainer import Callback, EarlyStopping, History, Trainer, latest_checkpoint
from .job import SubwordTokenizer, load_job, save_job

__all__ = ["CrossEntropyLoss", "CausalLMLoss", "MSELoss", "MultipleNegativesRankingLoss", "QuestionAnsweringLoss",
           "shift_tokens_right", "task_loss", "accuracy", "bleu", "classification_metrics", "perplexity", "precision_recall_f1",
           "AdamW", "SGD", "Schedule", "constant", "inverse_sqrt", "warmup_cosine", "warmup_linear", "Trainer",
           "Callback", "EarlyStopping", "History", "latest_checkpoint", "load_job", "save_job", "SubwordTokenizer"]
