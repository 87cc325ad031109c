"""LoRA on pretrained models (:func:`cpuformer.models.from_pretrained`), with PEFT's layout and files.

``add_lora(model, r=8, alpha=16, target_modules=["query", "value"])`` adds adapters ``y += (alpha / r) B A x`` to
every Linear whose module name matches (a list: PEFT's rule, the name equals a target or ends with "." + target; a
string: a regular expression the whole name must match), initialised as PEFT does (A uniform, B zero), and freezes
everything else except ``modules_to_save`` (default: the task head the load created, as PEFT keeps a new
classifier trainable). The base may be a memory-mapped or 16-bit load: it then stays frozen and costs no gradient
memory. ``dropout=p`` is PEFT's ``lora_dropout``: in training-mode forwards (with ``model.train_dropout``) each
adapter sees ``dropout(x)`` (inverted dropout, the base product sees ``x``); its masks follow from the step's
dropout seed (drawn from :mod:`cpuformer.nn.init`'s generator, which checkpoints save), so a resumed run is exact;
eval mode, inference and merging never drop. ``merge_lora`` folds the adapters into the weights (needs
``trainable=True``); ``save_lora`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained`` loads, and ``load_lora`` reads such a directory (saved by PEFT or by
``save_lora``) back.
"""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional, Sequence, Union

import numpy as np

from ..io import atomic_write_bytes, load_safetensors, save_safetensors

__all__ = ["add_lora", "merge_lora", "save_lora", "load_lora", "lora_parameters", "DEFAULT_TARGETS"]

# PEFT's default target_modules per model type (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
DEFAULT_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
                   "distilbert": ["q_lin", "v_lin"], "mpnet": ["q", "v"], "vit": ["query", "value"],
                   "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
                   "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
                   "bart": ["q_proj", "v_proj"], "marian": ["q_proj", "v_proj"], "t5": ["q", "v"]}
_TASK_TYPE = {"sequence-classification": "SEQ_CLS", "token-classification": "TOKEN_CLS",
              "question-answering": "QUESTION_ANS", "causal-lm": "CAUSAL_LM", "seq2seq-lm": "SEQ_2_SEQ_LM",
              "base": "FEATURE_EXTRACTION"}
_PEFT_PREFIX = "base_model.model."
_HEAD_MODULES = ("classifier.", "pre_classifier.", "qa_outputs.", "score.")


def _pretrained(model):
    inner = getattr(model, "model", None)  # a SentenceEncoder: its encoder
    if not hasattr(model, "_core") and inner is not None and hasattr(inner, "_core"):
        return inner
    if not hasattr(model, "_core"):
        raise TypeError(f"LoRA needs a model from cpuformer.models.from_pretrained, got {type(model).__name__}")
    return model


def _dropout(p) -> float:
    """A dropout probability in [0, 1) (as float32 too: the core's), else ValueError naming ``dropout``."""
    try:
        value = float(p)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(p, bool) or not (0.0 <= value < 1.0) or not np.float32(value) < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")
    return value


def add_lora(model, r: int = 8, alpha: float = 16, dropout: float = 0.0,
             target_modules: Union[None, str, Sequence[str]] = None, modules_to_save: Optional[Sequence[str]] = None,
             seed: int = 0) -> List[str]:
    """Add LoRA adapters and make them (and ``modules_to_save``) the only trainable parameters; returns the adapted
    module names. ``dropout``: PEFT's ``lora_dropout`` on each adapter's input, training mode only (module
    docstring). ``target_modules``: a list of names (PEFT's rule), a regex string, or None for PEFT's default for
    the model type. ``modules_to_save``: module names (or name prefixes) whose parameters stay trainable; None = the
    task head the load created (``model.new_parameters``), ``[]`` = adapters only."""
    m = _pretrained(model)
    dropout = _dropout(dropout)
    if isinstance(r, bool) or int(r) < 1:
        raise ValueError(f"r must be >= 1, got {r!r}")
    if m.lora_config:
        raise ValueError("the model already has LoRA adapters")
    if target_modules is None:
        if m.model_type not in DEFAULT_TARGETS:
            raise ValueError(f"no default LoRA target modules for {m.model_type!r}: pass target_modules")
        target_modules = DEFAULT_TARGETS[m.model_type]
    regex = isinstance(target_modules, str)
    targets = [target_modules] if regex else [str(t) for t in target_modules]
    modules = list(m._core.add_lora(targets, regex, int(r), float(alpha), int(seed), dropout))
    m._changed()
    if modules_to_save is None:
        new = m.new_parameters
        modules_to_save = sorted({n.rsplit(".", 1)[0] for n in new})
    keep = [str(s) for s in modules_to_save]
    for name, p in m.named_parameters():
        adapter = name.endswith((".lora_A.weight", ".lora_B.weight"))
        saved = any(name == k or name.startswith(k + ".") for k in keep)
        p.requires_grad = adapter or saved
    # "modules" is in the order the core added them: adapter i's masks come from lora_dropout_seed(step seed, i)
    m.lora_config = {"r": int(r), "lora_alpha": float(alpha), "lora_dropout": dropout,
                     "target_modules": target_modules if regex else targets, "modules": modules,
                     "modules_to_save": keep}
    return modules


def lora_parameters(model):
    """(name, parameter) of the adapters."""
    m = _pretrained(model)
    return [(n, p) for n, p in m.named_parameters() if n.endswith((".lora_A.weight", ".lora_B.weight"))]


def merge_lora(model) -> None:
    """Fold every adapter into its weight (W += alpha / r * B A) and remove the adapters (needs trainable=True)."""
    m = _pretrained(model)
    m._core.merge_lora()
    m._changed()
    m.lora_config = None


def _fan_in_fan_out(m) -> bool:
    return m.model_type == "gpt2"  # Conv1D weights are (in, out)


def save_lora(model, directory) -> str:
    """Write the adapters as PEFT does: ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight``,
    and the ``modules_to_save`` weights) and ``adapter_config.json``; ``peft.PeftModel.from_pretrained`` loads
    it on the transformers model of the same directory."""
    m = _pretrained(model)
    lc = m.lora_config
    if not lc:
        raise ValueError("save_lora: the model has no LoRA adapters (add_lora or load_lora first)")
    names = m.hf_names()
    views = m._views()
    tensors = {}
    for n, (data, _) in views.items():
        if n.endswith((".lora_A.weight", ".lora_B.weight")):
            tensors[_PEFT_PREFIX + names[n]] = np.array(data, np.float32)
    to_save = set()
    for k in lc["modules_to_save"]:
        for n, (data, _) in views.items():
            if n == k or n.startswith(k + "."):
                tensors[_PEFT_PREFIX + names[n]] = np.array(data, np.float32)
                to_save.add(names[n].split(".")[0] if n.startswith(_HEAD_MODULES) else names[n].rsplit(".", 1)[0])
    # PEFT's SEQ_CLS / TOKEN_CLS / QUESTION_ANS task types expect the head in the file: without a saved head the
    # config says no task type, and PEFT keeps the base model's own head
    task_type = _TASK_TYPE.get(m.head)
    if m.head in ("sequence-classification", "token-classification", "question-answering") and not to_save:
        task_type = None
    os.makedirs(os.fspath(directory), exist_ok=True)
    save_safetensors(os.path.join(directory, "adapter_model.safetensors"), tensors, {"format": "pt"})
    targets = lc["target_modules"]
    config = {"peft_type": "LORA", "task_type": task_type, "r": lc["r"],
              "lora_alpha": lc["lora_alpha"], "lora_dropout": lc.get("lora_dropout", 0.0), "target_modules": targets,
              "bias": "none", "fan_in_fan_out": _fan_in_fan_out(m), "modules_to_save": sorted(to_save) or None,
              "base_model_name_or_path": m.directory, "init_lora_weights": True, "inference_mode": True,
              "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
              "layers_to_transform": None, "layers_pattern": None, "revision": None}
    atomic_write_bytes(os.path.join(directory, "adapter_config.json"), [json.dumps(config, indent=2).encode()])
    return os.fspath(directory)


def load_lora(model, directory, trainable: bool = True) -> List[str]:
    """Add the adapters of a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``, saved
    by PEFT or :func:`save_lora`) to ``model`` with their values; ``modules_to_save`` weights are copied into the
    model; the config's ``lora_dropout`` applies when training on. Returns the adapted module names.
    ``trainable``: the adapters (and saved modules) require gradients."""
    m = _pretrained(model)
    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{directory}: no adapter_config.json (a PEFT adapter directory is expected)")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (LORA)")
    for key, ok in (("use_dora", False), ("bias", "none")):
        if cfg.get(key, ok) not in (ok, None):
            raise ValueError(f"{cfg_path}: {key}={cfg[key]!r} is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{cfg_path}: {key} is not supported")
    if cfg.get("layers_to_transform") is not None:
        raise ValueError(f"{cfg_path}: layers_to_transform is not supported")
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
    try:
        dropout = _dropout(cfg.get("lora_dropout") or 0.0)
    except ValueError as exc:
        raise ValueError(f"{cfg_path}: lora_{exc}") from None
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # rsLoRA's scale alpha / sqrt(r) = (alpha sqrt(r)) / r
    weights_path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{directory}: no adapter_model.safetensors")
    tensors, _ = load_safetensors(weights_path)
    # PEFT's names: base_model.model.<torch module>.lora_A[.default].weight; ours: <checkpoint module>.lora_A.weight
    targets = cfg.get("target_modules")
    saved = cfg.get("modules_to_save") or []
    modules = add_lora(m, r=r, alpha=alpha, dropout=dropout, target_modules=targets, modules_to_save=[])
    names = m.hf_names()
    ours_by_hf = {hf: ours for ours, hf in names.items()}
    views = m._views()
    values = {}
    for key, value in tensors.items():
        k = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        k = k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        k = k.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
        ours = ours_by_hf.get(k, k)
        if ours not in views:
            raise ValueError(f"{weights_path}: {key} matches no parameter of the model (adapted modules: "
                             f"{modules[:3]}...)")
        if tuple(value.shape) != views[ours][0].shape:
            raise ValueError(f"{weights_path}: {key} has shape {tuple(value.shape)}, expected "
                             f"{views[ours][0].shape}")
        values[ours] = value
    missing = [n for n, _ in lora_parameters(m) if n not in values]
    if missing:
        raise ValueError(f"{weights_path}: no values for adapters {missing[:3]}")
    for n, v in values.items():
        views[n][0][...] = np.asarray(v, np.float32)
    keep = sorted({n.rsplit(".", 1)[0] for n in values if not n.endswith((".lora_A.weight", ".lora_B.weight"))})
    m.lora_config["modules_to_save"] = keep
    for name, p in m.named_parameters():
        adapter = name.endswith((".lora_A.weight", ".lora_B.weight"))
        p.requires_grad = bool(trainable) and (adapter or any(name.startswith(k + ".") for k in keep))
    return modules
