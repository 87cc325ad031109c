"""Evaluation metrics: accuracy, macro precision/recall/F1, perplexity and corpus BLEU."""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Dict, List, Sequence

import numpy as np

__all__ = ["accuracy", "precision_recall_f1", "perplexity", "bleu", "classification_metrics"]


def accuracy(predictions, targets) -> float:
    p, t = np.asarray(predictions), np.asarray(targets)
    if p.shape != t.shape or p.size == 0:
        raise ValueError(f"accuracy: predictions {p.shape} and targets {t.shape} must be equal, non-empty shapes")
    return float((p == t).mean())


def precision_recall_f1(predictions, targets, num_classes: int = None) -> Dict[str, float]:
    """Macro-averaged precision, recall and F1 over the classes present in targets or predictions (a class with
    no predicted or no true samples contributes 0 to the corresponding average, as scikit-learn's zero_division=0)."""
    p, t = np.asarray(predictions), np.asarray(targets)
    classes = range(num_classes) if num_classes else sorted(set(p.tolist()) | set(t.tolist()))
    precisions, recalls, f1s = [], [], []
    for c in classes:
        tp = int(((p == c) & (t == c)).sum())
        fp = int(((p == c) & (t != c)).sum())
        fn = int(((p != c) & (t == c)).sum())
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        precisions.append(prec)
        recalls.append(rec)
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return {"precision": float(np.mean(precisions)), "recall": float(np.mean(recalls)), "f1": float(np.mean(f1s))}


def classification_metrics(predictions, targets) -> Dict[str, float]:
    out = {"accuracy": accuracy(predictions, targets)}
    out.update(precision_recall_f1(predictions, targets))
    return out


def perplexity(mean_loss_nats: float) -> float:
    return float(math.exp(min(mean_loss_nats, 700.0)))


_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def _tokens(text) -> List[str]:
    return _TOKEN_RE.findall(text) if isinstance(text, str) else [str(t) for t in text]


def bleu(hypotheses: Sequence, references: Sequence, max_n: int = 4) -> float:
    """Corpus BLEU (0-100) with uniform weights up to ``max_n``-grams and the brevity penalty (Papineni et al.),
    one reference per hypothesis. Strings are split into words and punctuation; lists of tokens are used as is.
    Uses ``sacrebleu`` when it is installed (its default 13a tokenisation), for comparable figures."""
    if len(hypotheses) != len(references):
        raise ValueError(f"bleu: {len(hypotheses)} hypotheses but {len(references)} references")
    if all(isinstance(h, str) for h in hypotheses) and all(isinstance(r, str) for r in references):
        try:
            import sacrebleu  # optional
            return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)
        except ImportError:
            pass
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for h, r in zip(hypotheses, references):
        h, r = _tokens(h), _tokens(r)
        hyp_len += len(h)
        ref_len += len(r)
        for n in range(1, max_n + 1):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(0, len(h) - n + 1)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(log_precision)
