"""Fine-tuning of Hugging Face models loaded by :func:`cpuformer.models.from_pretrained` (issue 17).

A model loaded with ``trainable=True`` (every tensor copied into writable float32 parameters) or with ``task=``
(a new head) or with LoRA adapters (:mod:`cpuformer.nn.lora`) is a :class:`~cpuformer.train.Trainer` model:

* ``named_parameters()`` / ``parameters()``: :class:`PretrainedParameter` objects over the C++ core's buffers, in
  the checkpoint's names. ``p.data`` is a writable float32 view; ``p.grad`` is a view of the gradient, or None
  while the parameter is frozen. ``p.requires_grad = flag`` (or ``model.requires_grad_(flag)``) gives or frees the
  gradient buffer: a frozen parameter costs no gradient memory, no weight-gradient GEMM and (the optimizers skip
  parameters without ``requires_grad``) no optimizer moments. A trainable load starts with every parameter frozen
  except new heads and adapters; call ``model.requires_grad_(True)`` for full fine-tuning.
* ``train()`` / ``eval()``: in training mode calling the model runs the core's training forward (dropout as the
  config says, and the LoRA adapters' ``lora_dropout``, unless ``model.train_dropout = False``; each call draws its
  dropout seed from :mod:`cpuformer.nn.init`'s generator, which the Trainer's checkpoints save, so a resumed run is
  exact) and keeps what ``backward(grad_output)`` needs, one state per thread. ``model.gradient_checkpointing =
  True`` recomputes each block's activations in backward (less memory, bitwise the same gradients). In eval mode
  calls are inference.
* ``state_dict()`` holds what training changes: the parameters that require gradients (LoRA adapters, new heads,
  and the base weights when they are trained). The Trainer's checkpoints store it; with a frozen base they are
  small, and resuming needs the same base directory. ``load_state_dict`` copies such a dict back.
* ``save_pretrained(dir)``: a Hugging Face directory (float32 ``model.safetensors`` in the checkpoint's names,
  LoRA merged into a copy, ``config.json`` with the task head's architecture and labels, tokenizer and generation
  files copied) that :func:`from_pretrained`, the C++ runtime and ``transformers`` load.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np

from .. import _core, ops
from ..io import atomic_write_bytes, save_safetensors
from ..nn import init

__all__ = ["PretrainedParameter", "Trainable", "FAMILY_CLASS", "BASE_PREFIX", "head_architecture"]

# model_type -> transformers' class-name stem and the base model's attribute name (base_model_prefix)
FAMILY_CLASS = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "distilbert": "DistilBert",
                "mpnet": "MPNet", "vit": "ViT"}
BASE_PREFIX = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "distilbert": "distilbert",
               "mpnet": "mpnet", "vit": "vit", "gpt2": "transformer"}
_HEAD_SUFFIX = {"sequence-classification": "ForSequenceClassification",
                "token-classification": "ForTokenClassification", "question-answering": "ForQuestionAnswering",
                "image-classification": "ForImageClassification", "masked-lm": "ForMaskedLM"}
_HEAD_MODULES = ("classifier.", "pre_classifier.", "qa_outputs.", "lm_head.", "cls.")
# files of a model directory that are not weights: copied by save_pretrained
_COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
               "vocab.json", "merges.txt", "spiece.model", "source.spm", "target.spm", "sentencepiece.bpe.model",
               "generation_config.json", "modules.json", "sentence_bert_config.json",
               "config_sentence_transformers.json", "chat_template.jinja")


def head_architecture(model_type: str, architecture: str, head: str) -> str:
    """The transformers class name of ``head`` on this family (the checkpoint's own when it already has it)."""
    if head == "base" or not architecture.endswith("Model") or head not in _HEAD_SUFFIX:
        return architecture
    stem = FAMILY_CLASS.get(model_type) or architecture[:-len("Model")]
    return stem + _HEAD_SUFFIX[head]


class PretrainedParameter:
    """One parameter of a pretrained model: ``data`` (writable float32 view of the core's buffer), ``grad`` (a view
    of its gradient, or None while frozen) and ``requires_grad`` (settable)."""

    __slots__ = ("name", "_model")

    def __init__(self, model: "Trainable", name: str) -> None:
        self.name, self._model = name, model

    @property
    def data(self) -> np.ndarray:
        return self._model._views()[self.name][0]

    @property
    def grad(self) -> Optional[np.ndarray]:
        return self._model._views()[self.name][1]

    @property
    def requires_grad(self) -> bool:
        return self.grad is not None

    @requires_grad.setter
    def requires_grad(self, flag: bool) -> None:
        self._model._set_requires_grad(self.name, bool(flag))

    @property
    def shape(self):
        return self.data.shape

    def __repr__(self) -> str:
        return f"PretrainedParameter({self.name!r}, shape={self.shape}, requires_grad={self.requires_grad})"


class Trainable:
    """The fine-tuning surface shared by the pretrained wrappers (see the module docstring). Subclasses keep
    ``_core`` (the C++ model), ``config``, ``directory``, ``tokenizer``."""

    training = False
    train_dropout = True          # training-mode forwards apply the config's dropout and LoRA's
    gradient_checkpointing = False  # recompute each block's activations in backward
    trainable = False             # loaded with trainable=True
    lora_config: Optional[dict] = None  # set by cpuformer.nn.lora.add_lora / load_lora

    # -- parameters -----------------------------------------------------------------------------------------------
    def _views(self) -> Dict[str, tuple]:
        cache = self.__dict__.get("_view_cache")
        if cache is None:
            cache = OrderedDict((n, (d, g)) for n, d, g in self._core.parameters() if n != "final_logits_bias")
            self.__dict__["_view_cache"] = cache
        return cache

    def _changed(self) -> None:
        self.__dict__["_view_cache"] = None

    def _set_requires_grad(self, name: str, flag: bool) -> None:
        self._core.set_requires_grad(name, flag)
        self._changed()

    @property
    def new_parameters(self) -> List[str]:
        """The head weights this load created (``task=``): not in the checkpoint, initialised at random."""
        return list(self._core.new_parameters())

    def named_parameters(self):
        """``(name, PretrainedParameter)`` for every parameter (frozen ones too), in the checkpoint's names."""
        return [(n, PretrainedParameter(self, n)) for n in self._views()]

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(d.size for d, g in self._views().values() if g is not None or not trainable_only)

    def requires_grad_(self, flag: bool = True):
        """Every parameter requires a gradient (True) or none does (False)."""
        for n in list(self._views()):
            self._core.set_requires_grad(n, bool(flag))
        self._changed()
        return self

    def zero_grad(self) -> None:
        self._core.zero_grad()

    # -- modes ----------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    # -- training forward / backward ------------------------------------------------------------------------------
    def _tls(self):
        tls = self.__dict__.get("_thread")
        if tls is None:
            tls = self.__dict__.setdefault("_thread", threading.local())
        return tls

    def _train_forward(self, ids=None, mask=None, types=None, dec=None, pixels=None):
        tls = self._tls()
        state = getattr(tls, "state", None)
        if state is None:
            state = tls.state = _core._TrainState()
        seed = init.next_seed()  # drawn every step, dropout or not: the generator's sequence does not depend on it
        out = self._core.train_forward(state, ids, mask, types, dec, pixels, dropout=bool(self.train_dropout),
                                       seed=seed, recompute=bool(self.gradient_checkpointing))
        if pixels is not None:
            B = pixels.shape[0]
            shape = (B, -1) if self.head == "image-classification" else (B, -1, self.hidden_size)
        else:
            B, T = ids.shape
            if self.head == "sequence-classification":
                shape = (B, -1)
            elif dec is not None:
                shape = (B, dec.shape[1], -1)
            else:
                shape = (B, T, -1)
        out = out.reshape(shape)
        tls.shape = out.shape
        if self.head == "question-answering":
            return np.ascontiguousarray(out[..., 0]), np.ascontiguousarray(out[..., 1])
        return out

    def backward(self, grad_output) -> None:
        """Accumulate the parameters' gradients of d(loss)/d(output) for this thread's latest training forward
        (QA: a (start, end) pair)."""
        if isinstance(grad_output, (tuple, list)):
            grad_output = np.stack([np.asarray(g, np.float32) for g in grad_output], -1)
        g = np.ascontiguousarray(grad_output, np.float32)
        tls = self._tls()
        shape = getattr(tls, "shape", None)
        if shape is None or getattr(tls, "state", None) is None:
            raise RuntimeError("backward: no training-mode forward in this thread (call model.train() first)")
        if g.size != int(np.prod(shape)):
            raise ValueError(f"backward: grad_output must have the output's shape {tuple(shape)}, got {g.shape}")
        self._core.train_backward(tls.state, g.reshape(-1))

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """The parameters that training changes (those requiring gradients: adapters, new heads, trained base
        weights), by name; the views themselves. A frozen base is not included: it is the directory on disk."""
        return OrderedDict((n, d) for n, (d, g) in self._views().items() if g is not None)

    def checkpoint_state_dict(self):
        """What the Trainer's checkpoints store: :meth:`state_dict`."""
        return self.state_dict()

    def load_state_dict(self, state_dict, strict: bool = True):
        """Copy arrays in by name (any parameter, frozen or not). ``strict``: every key must be a parameter and
        every parameter of :meth:`state_dict` must be given."""
        views = self._views()
        unexpected = [k for k in state_dict if k not in views]
        missing = [k for k in self.state_dict() if k not in state_dict]
        if strict and (unexpected or missing):
            raise KeyError(f"load_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        for k, v in state_dict.items():
            if k in views:
                arr = np.asarray(v, np.float32)
                if arr.shape != views[k][0].shape:
                    raise ValueError(f"load_state_dict: {k} has shape {arr.shape}, expected {views[k][0].shape}")
        for k, v in state_dict.items():
            if k in views:
                views[k][0][...] = np.asarray(v, np.float32)
        return missing, unexpected

    # -- saving ---------------------------------------------------------------------------------------------------
    def hf_names(self) -> Dict[str, str]:
        """Our parameter name -> the name transformers' class of this head gives it (a base checkpoint given a task
        head gets the base model's prefix, e.g. ``bert.``, on its base tensors)."""
        names = list(self._views())
        prefix = BASE_PREFIX.get(self.model_type)
        arch = self.architecture or ""
        add = (prefix is not None and self.head != "base" and arch.endswith("Model")
               and not arch.endswith("LMHeadModel") and not any(n.startswith(prefix + ".") for n in names))
        if self.model_type == "gpt2" and not any(n.startswith("transformer.") for n in names):
            add = True  # GPT2LMHeadModel's transformer.* (older checkpoints store h.0... without it)
        out = {}
        for n in names:
            out[n] = f"{prefix}.{n}" if add and not n.startswith(_HEAD_MODULES) else n
        return out

    def merged_tensors(self) -> "OrderedDict[str, np.ndarray]":
        """Every tensor by our name, float32 copies, LoRA adapters folded into their weights (the model itself is
        not changed)."""
        views = self._views()
        tensors = OrderedDict((n, np.array(d, np.float32)) for n, (d, _) in views.items()
                              if not n.endswith((".lora_A.weight", ".lora_B.weight")))
        if "final_logits_bias" in {n for n, _, _ in self._core.parameters()}:
            tensors["final_logits_bias"] = np.array(
                [d for n, d, _ in self._core.parameters() if n == "final_logits_bias"][0], np.float32)
        lc = self.lora_config
        if lc:
            scale = lc["lora_alpha"] / lc["r"]
            for module in lc["modules"]:
                a = views[module + ".lora_A.weight"][0]
                b = views[module + ".lora_B.weight"][0]
                delta = ops.matmul(b, a, alpha=scale)  # (out, in)
                w = tensors[module + ".weight"]
                if w.shape == delta.shape[::-1] and w.shape != delta.shape:  # GPT-2 Conv1D: (in, out)
                    w += delta.T
                else:
                    w += delta
        return tensors

    def save_pretrained(self, directory, labels: Optional[List[str]] = None) -> str:
        """Write a Hugging Face directory of this (fine-tuned) model: ``model.safetensors`` (float32, LoRA merged in
        a copy), ``config.json`` (architectures set to the head, ``id2label`` / ``label2id`` / ``num_labels``:
        ``labels`` names them), and the source directory's tokenizer, generation config and sentence-transformers
        files. Files are written atomically. Needs a trainable load (``trainable=True``): the base weights of a
        memory-mapped load are not the model's own."""
        if not self.trainable:
            raise ValueError("save_pretrained needs a model loaded with trainable=True (load with "
                             "from_pretrained(dir, trainable=True), or save only the adapters with "
                             "cpuformer.nn.lora.save_lora)")
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        names = self.hf_names()
        tensors = OrderedDict((names.get(n, n), t) for n, t in self.merged_tensors().items())
        save_safetensors(os.path.join(directory, "model.safetensors"), tensors, {"format": "pt"})
        config = json.loads(json.dumps(self.config))
        arch = head_architecture(self.model_type, self.architecture or "", self.head)
        if arch:
            config["architectures"] = [arch]
        # (question answering too: transformers sizes qa_outputs by num_labels, 2)
        if self.head in ("sequence-classification", "token-classification", "image-classification",
                         "question-answering"):
            n = int(self._core.num_labels)
            old = {int(k): v for k, v in (config.get("id2label") or {}).items()}
            names_ = list(labels) if labels is not None else [old.get(i, f"LABEL_{i}") for i in range(n)]
            if len(names_) != n:
                raise ValueError(f"save_pretrained: {len(names_)} label names for {n} labels")
            config["id2label"] = {str(i): str(v) for i, v in enumerate(names_)}
            config["label2id"] = {str(v): i for i, v in enumerate(names_)}
            config["num_labels"] = n
            if n == 1 and self.head == "sequence-classification":
                config["problem_type"] = "regression"
        config["torch_dtype"] = "float32"
        config.pop("dtype", None)
        atomic_write_bytes(os.path.join(directory, "config.json"), [json.dumps(config, indent=2).encode()])
        src = self.directory
        if src and os.path.abspath(src) != os.path.abspath(directory):
            for name in _COPY_FILES:
                path = os.path.join(src, name)
                if os.path.isfile(path):
                    with open(path, "rb") as f:
                        atomic_write_bytes(os.path.join(directory, name), [f.read()])
            for sub in os.listdir(src):  # sentence-transformers modules (1_Pooling, 2_Normalize, ...)
                path = os.path.join(src, sub)
                if os.path.isdir(path) and sub[:1].isdigit() and "_" in sub:
                    shutil.copytree(path, os.path.join(directory, sub), dirs_exist_ok=True)
        return directory
