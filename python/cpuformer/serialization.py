"""Model files: ``cpuformer.save(model, path)`` / ``cpuformer.load(path)``.

One safetensors file: the parameters under their state-dict names, and in the metadata the model class and its
constructor arguments as JSON, enough to rebuild the architecture. No pickle. The round trip is bit-exact.
"""
from __future__ import annotations

import json

from .io import SafetensorsError, load_safetensors, save_safetensors

__all__ = ["save", "load"]

FORMAT = "cpuformer-model"
VERSION = "1"


def _classes():
    from .models import GPT, BertModel, Seq2SeqTransformer, TransformerClassifier
    return {c.__name__: c for c in (GPT, TransformerClassifier, Seq2SeqTransformer, BertModel)}


def save(model, path: str) -> None:
    """Write ``model`` (a cpuformer model with a ``config``) to ``path`` atomically."""
    config = getattr(model, "config", None)
    if config is None or type(model).__name__ not in _classes():
        raise TypeError(f"save: {type(model).__name__} is not a cpuformer model with a config "
                        f"(one of {sorted(_classes())})")
    meta = {"format": FORMAT, "version": VERSION, "model_class": type(model).__name__, "config": json.dumps(config)}
    save_safetensors(path, {name: p.data for name, p in model.named_parameters()}, meta)


def load(path: str):
    """Rebuild the model saved at ``path`` and load its weights. A file that is not a cpuformer model, an unknown
    class or a config that disagrees with the tensors raises ``ValueError`` naming the problem."""
    tensors, meta = load_safetensors(path)
    if meta.get("format") not in (FORMAT, "cpuformer-checkpoint"):
        raise SafetensorsError(f"{path}: not a cpuformer model file (metadata format {meta.get('format')!r})")
    if meta.get("format") == FORMAT and meta.get("version") != VERSION:
        raise SafetensorsError(f"{path}: model file version {meta.get('version')!r}; this cpuformer reads {VERSION}")
    cls = _classes().get(meta.get("model_class", ""))
    if cls is None:
        raise SafetensorsError(f"{path}: unknown model class {meta.get('model_class')!r}")
    try:
        config = json.loads(meta["config"])
        model = cls(**config)
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{path}: bad model config ({exc})") from None
    try:
        model.load_state_dict(tensors)
    except (KeyError, ValueError) as exc:
        raise SafetensorsError(f"{path}: the tensors do not match the config: {exc}") from None
    model.eval()
    return model
