"""Evaluation metrics: accuracy, macro precision/recall/F1, perplexity and corpus BLEU."""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Dict, List, Sequence

import numpy as np

__all__ = ["accuracy", "precision_recall_f1", "perplexity", "bleu", "tokenize_13a", "classification_metrics"]


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


# sacreBLEU's default "13a" tokenization (mteval-v13a): punctuation and symbols split off, periods and commas except
# inside numbers, a dash after a digit; then single spaces. Cased (no lower-casing).
_13A = [(re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
        (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
        (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
        (re.compile(r"([0-9])(-)"), r"\1 \2 ")]


def tokenize_13a(text: str) -> List[str]:
    """The tokens sacreBLEU's default tokenizer ("13a", as mteval-v13a.pl) makes of a detokenized sentence."""
    line = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A:
        line = pattern.sub(repl, line)
    return line.split()


def bleu(hypotheses: Sequence, references: Sequence, max_n: int = 4, smooth: str = "exp") -> float:
    """Corpus BLEU (0-100), one reference per hypothesis, computed as sacreBLEU's ``corpus_bleu`` with its defaults:
    sentences (strings) are tokenized with "13a" and stay cased; lists of tokens are used as they are. Uniform
    weights up to ``max_n``-grams and the brevity penalty (Papineni et al.); ``smooth="exp"`` (sacreBLEU's default)
    halves the pseudo-count for each n whose matches are 0, ``"none"`` gives 0 then."""
    if len(hypotheses) != len(references):
        raise ValueError(f"bleu: {len(hypotheses)} hypotheses but {len(references)} references")
    if smooth not in ("exp", "none"):
        raise ValueError(f"bleu: smooth must be 'exp' or 'none', got {smooth!r}")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for h, r in zip(hypotheses, references):
        h, r = (tokenize_13a(x) if isinstance(x, str) else [str(t) for t in x] for x in (h, r))
        hyp_len += len(h)
        ref_len += len(r)
        for n in range(1, max_n + 1):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(0, len(h) - n + 1)
    if hyp_len == 0 or not any(matches):
        return 0.0
    log_precision, pseudo = 0.0, 1.0
    for m, t in zip(matches, totals):
        if t == 0 or (m == 0 and smooth == "none"):
            return 0.0
        if m == 0:
            pseudo *= 2
        log_precision += math.log(m / t if m else 1.0 / (pseudo * t))
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(log_precision / max_n)
