"""Attention heat-maps as PNG files (needs matplotlib: ``pip install cpuformer[plot]``)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["attention_heatmap"]


def attention_heatmap(weights, path: str, query_labels: Optional[Sequence[str]] = None,
                      key_labels: Optional[Sequence[str]] = None, title: Optional[str] = None) -> str:
    """Draw a (T, S) attention matrix (or (heads, T, S): one panel per head) to a PNG file; returns ``path``.
    Rows are queries, columns keys."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("attention_heatmap needs matplotlib: pip install 'cpuformer[plot]'") from exc
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3:
        raise ValueError(f"weights must be (T, S) or (heads, T, S), got shape {w.shape}")
    heads, T, S = w.shape
    if query_labels is not None and len(query_labels) != T or key_labels is not None and len(key_labels) != S:
        raise ValueError(f"labels must have {T} query and {S} key entries")
    fig, axes = plt.subplots(1, heads, figsize=(max(3.0, 0.3 * S + 1.5) * heads, max(3.0, 0.3 * T + 1.2)),
                             squeeze=False)
    for h, ax in enumerate(axes[0]):
        im = ax.imshow(w[h], cmap="viridis", vmin=0.0, vmax=max(1e-9, w[h].max()), aspect="auto")
        if key_labels is not None:
            ax.set_xticks(range(S), labels=list(key_labels), rotation=90, fontsize=8)
        if query_labels is not None:
            ax.set_yticks(range(T), labels=list(query_labels), fontsize=8)
        ax.set_title(f"head {h}" if heads > 1 else (title or "attention"))
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title and heads > 1:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
