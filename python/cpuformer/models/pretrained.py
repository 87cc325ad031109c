"""Hugging Face model directories on local disk (never a download), run by the C++ core.

``from_pretrained(directory)`` reads ``config.json`` (``model_type``, ``architectures``) and the weights as they are
on disk (``model.safetensors``, or ``model.safetensors.index.json`` with its shards; float32, float16 or bfloat16),
memory-mapped and never copied: float32 tensors are used in place and 16-bit Linear weights stay 16-bit, converted
inside the products (``dtype="float32"`` converts them at load instead). The model is assembled once, in C++
(``cpp/src/pretrained.cpp``), the same code the C++ runtime runs.

Families: encoders (bert, roberta, xlm-roberta, distilbert, mpnet) with their ``*Model``,
``*ForSequenceClassification``, ``*ForTokenClassification``, ``*ForQuestionAnswering`` and ``*ForMaskedLM`` heads;
decoders (gpt2, llama, mistral, qwen2, qwen3, gemma) for causal LM logits and generation; encoder-decoders (marian,
bart, t5) for logits, greedy and beam-search generation; ViT. Calling conventions follow ``transformers``: numpy
arrays in, numpy arrays out. Anything the loader does not implement is an error naming it.

``BertModel`` (below) is cpuformer's own trainable BERT-architecture module, which ``cpuformer.save`` writes."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np

from .. import _core, ops
from ..nn import Embedding, LayerNorm, Linear, Module, ModuleList, TransformerEncoderLayer
from .finetuning import Trainable, head_architecture

__all__ = ["BertModel", "PretrainedModel", "EncoderModel", "CausalLM", "Seq2SeqLM", "VisionModel", "SentenceEncoder",
           "from_pretrained", "mean_pool"]

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def mean_pool(hidden: np.ndarray, attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Sentence embeddings: the mean of the hidden states (B, T, H) over the tokens where attention_mask is 1."""
    if attention_mask is None:
        return hidden.mean(axis=1)
    m = np.asarray(attention_mask, np.float32)[..., None]
    return ((hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)).astype(np.float32)


class BertModel(Module):
    """A BERT-family encoder (``transformers.BertModel``'s architecture, inference): word + position + token-type
    embeddings, embedding LayerNorm, post-norm encoder layers, and the pooler. ``model(input_ids,
    attention_mask=None, token_type_ids=None)`` returns the last hidden state (B, T, hidden) as a numpy array
    (attention_mask: 1 = attend, 0 = padding, as Hugging Face); ``pooled(hidden)`` is the pooler output."""

    def __init__(self, vocab_size: int, hidden_size: int = 768, num_hidden_layers: int = 12,
                 num_attention_heads: int = 12, intermediate_size: int = 3072, max_position_embeddings: int = 512,
                 type_vocab_size: int = 2, layer_norm_eps: float = 1e-12, hidden_act: str = "gelu",
                 pooler: bool = True) -> None:
        super().__init__()
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(f"BertModel: unsupported hidden_act {hidden_act!r}")
        self.config = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                           num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                           max_position_embeddings=max_position_embeddings, type_vocab_size=type_vocab_size,
                           layer_norm_eps=layer_norm_eps, hidden_act=hidden_act, pooler=pooler)
        self.word_embeddings = Embedding(vocab_size, hidden_size)
        self.position_embeddings = Embedding(max_position_embeddings, hidden_size)
        self.token_type_embeddings = Embedding(type_vocab_size, hidden_size)
        self.embeddings_norm = LayerNorm(hidden_size, eps=layer_norm_eps)
        self.layers = ModuleList(TransformerEncoderLayer(hidden_size, num_attention_heads, intermediate_size, 0.0,
                                                         _ACTIVATIONS[hidden_act], layer_norm_eps)
                                 for _ in range(num_hidden_layers))
        if pooler:
            self.pooler = Linear(hidden_size, hidden_size)
        self.eval()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
        ids = ops._ids(input_ids, "input_ids")
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
        B, T = ids.shape
        if T > self.config["max_position_embeddings"]:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings "
                             f"{self.config['max_position_embeddings']}")
        types = np.zeros_like(ids) if token_type_ids is None else ops._ids(token_type_ids, "token_type_ids")
        if types.shape != ids.shape:
            raise ValueError(f"token_type_ids must have shape {ids.shape}, got {types.shape}")
        padding = None
        if attention_mask is not None:
            am = np.asarray(attention_mask)
            if am.shape != ids.shape:
                raise ValueError(f"attention_mask must have shape {ids.shape}, got {am.shape}")
            padding = am == 0
        x = (self.word_embeddings(ids) + self.position_embeddings.weight.data[:T] + self.token_type_embeddings(types))
        x = self.embeddings_norm(x)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        return x

    def pooled(self, hidden: np.ndarray) -> np.ndarray:
        """The pooler output: tanh(dense(hidden[:, 0]))."""
        return np.tanh(self.pooler(hidden[:, 0]))


# ------------------------------------------------------------------------------------------ Hugging Face models

def _ids(x, name: str) -> np.ndarray:
    """(B, T) int64, C-contiguous; a 1-D sequence becomes one row."""
    a = np.asarray(x)
    if a.dtype == object or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{name} must hold integer token ids, got dtype {a.dtype}")
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must be (batch, length), got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.int64)


def _mask(x, ids: np.ndarray, name: str = "attention_mask") -> Optional[np.ndarray]:
    if x is None:
        return None
    m = _ids(x, name)
    if m.shape != ids.shape:
        raise ValueError(f"{name} must have the shape of input_ids {ids.shape}, got {m.shape}")
    return m


def _read_json(path: str):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


class PretrainedModel(Trainable):
    """A loaded Hugging Face model directory. ``config`` (config.json as a dict), ``architecture``,
    ``model_type``, ``tokenizer`` (the directory's, or None), ``directory``. In eval mode (the default) calls are
    inference and one model may be called from many threads at once; fine-tuning (``train()``, ``backward``,
    parameters, ``save_pretrained``) is described in :mod:`cpuformer.models.finetuning`."""

    def __init__(self, core, directory: str, config: dict, tokenizer, trainable: bool = False) -> None:
        self._core = core
        self.directory = directory
        self.config = config
        self.tokenizer = tokenizer
        self.trainable = bool(trainable)

    def forward(self, *args, **kwargs):
        return self(*args, **kwargs)

    @property
    def architecture(self) -> str:
        return self._core.architecture

    @property
    def model_type(self) -> str:
        return self._core.model_type

    @property
    def head(self) -> str:
        """"base", "sequence-classification", "token-classification", "question-answering", "masked-lm",
        "causal-lm", "seq2seq-lm" or "image-classification"."""
        return self._core.head

    @property
    def hidden_size(self) -> int:
        return self._core.hidden_size

    @property
    def id2label(self) -> Dict[int, str]:
        raw = self.config.get("id2label") or {}
        return {int(k): v for k, v in raw.items()}

    @property
    def memory(self) -> Dict[str, int]:
        """Bytes of the memory-mapped weight files and of what the model holds in its own memory."""
        return {"mapped": self._core.mapped_bytes, "owned": self._core.owned_bytes}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.architecture or self.model_type!r}, {self.directory!r})"


class EncoderModel(PretrainedModel):
    """BERT, RoBERTa, XLM-R, DistilBERT, MPNet. ``model(input_ids, attention_mask=None, token_type_ids=None)``:
    ``*Model``: the last hidden state (B, T, H); ``*ForSequenceClassification``: logits (B, labels);
    ``*ForTokenClassification``: (B, T, labels); ``*ForQuestionAnswering``: (start_logits, end_logits), each (B, T);
    ``*ForMaskedLM``: (B, T, V)."""

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        ids = _ids(input_ids, "input_ids")
        mask, types = _mask(attention_mask, ids), _mask(token_type_ids, ids, "token_type_ids")
        if self.training:
            return self._train_forward(ids, mask, types)
        out = self._core.head_output(ids, mask, types)
        if self.head == "question-answering":
            return np.ascontiguousarray(out[..., 0]), np.ascontiguousarray(out[..., 1])
        return out

    def hidden_states(self, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
        """The last hidden state (B, T, H), whatever the head."""
        ids = _ids(input_ids, "input_ids")
        return self._core.hidden_states(ids, _mask(attention_mask, ids), _mask(token_type_ids, ids, "token_type_ids"))

    def pooler_output(self, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
        """tanh(dense(hidden[:, 0])) (B, H), for checkpoints with a pooler."""
        ids = _ids(input_ids, "input_ids")
        return self._core.pooler_output(ids, _mask(attention_mask, ids), _mask(token_type_ids, ids, "token_type_ids"))


def _eos(eos_token_id):
    if eos_token_id is None:
        return None
    if isinstance(eos_token_id, (int, np.integer)):
        return [int(eos_token_id)]
    return [int(e) for e in eos_token_id]


def _sampling(do_sample, temperature, top_k, top_p, seed):
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) < 0):
        raise ValueError(f"top_k must be None or >= 0, got {top_k!r}")
    return dict(do_sample=bool(do_sample), temperature=float(temperature), top_k=int(top_k or 0),
                top_p=1.0 if top_p is None else float(top_p),
                seed=int(np.random.SeedSequence().entropy % (1 << 63)) if seed is None else int(seed))


class CausalLM(PretrainedModel):
    """GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma. ``model(input_ids, attention_mask=None)`` -> logits (B, T, V).
    With padding in ``attention_mask`` (left or right), positions count only real tokens, as ``transformers``'
    ``generate`` numbers them, so a padded row equals the row alone."""

    def __call__(self, input_ids, attention_mask=None) -> np.ndarray:
        ids = _ids(input_ids, "input_ids")
        if self.training:
            return self._train_forward(ids, _mask(attention_mask, ids))
        return self._core.head_output(ids, _mask(attention_mask, ids), None)

    def hidden_states(self, input_ids, attention_mask=None) -> np.ndarray:
        """The final-norm hidden states (B, T, H)."""
        ids = _ids(input_ids, "input_ids")
        return self._core.hidden_states(ids, _mask(attention_mask, ids), None)

    def generate(self, input_ids, max_new_tokens: int = 20, attention_mask=None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id=None, pad_token_id: Optional[int] = None, seed: Optional[int] = None) -> np.ndarray:
        """Continue each row (greedy unless ``do_sample``), with a key/value cache: (B, T + n) int64, the input
        then the new tokens, as ``transformers``' ``generate``. ``eos_token_id``: None = the model's
        (generation_config.json, else config.json), an id or a list, ``[]`` = never stop. Finished rows are padded
        with ``pad_token_id`` (default: the model's, else the eos)."""
        ids = _ids(input_ids, "input_ids")
        return self._core.generate(ids, _mask(attention_mask, ids), int(max_new_tokens),
                                   eos_token_id=_eos(eos_token_id),
                                   pad_token_id=-1 if pad_token_id is None else int(pad_token_id),
                                   **_sampling(do_sample, temperature, top_k, top_p, seed))


class Seq2SeqLM(PretrainedModel):
    """Marian, BART, T5. ``model(input_ids, attention_mask=None, decoder_input_ids=...)`` -> logits
    (B, T_dec, V); ``generate`` runs the encoder once, then greedy or beam search."""

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None) -> np.ndarray:
        ids = _ids(input_ids, "input_ids")
        if decoder_input_ids is None:
            if self.model_type != "bart":
                raise ValueError("decoder_input_ids is required (only BART derives it from input_ids)")
            dec = np.empty_like(ids)  # transformers' shift_tokens_right: the start token, then input_ids[:, :-1]
            dec[:, 0] = self._core.decoder_start_token_id
            dec[:, 1:] = ids[:, :-1]
        else:
            dec = _ids(decoder_input_ids, "decoder_input_ids")
        if self.training:
            return self._train_forward(ids, _mask(attention_mask, ids), None, dec)
        return self._core.seq2seq_logits(ids, _mask(attention_mask, ids), dec)

    def encoder_hidden_states(self, input_ids, attention_mask=None) -> np.ndarray:
        ids = _ids(input_ids, "input_ids")
        return self._core.hidden_states(ids, _mask(attention_mask, ids), None)

    def generate(self, input_ids, max_new_tokens: int = 20, attention_mask=None, num_beams: int = 1,
                 length_penalty: float = 1.0, do_sample: bool = False, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token_id=None,
                 pad_token_id: Optional[int] = None, seed: Optional[int] = None) -> np.ndarray:
        """(B, L) int64 starting with the decoder start token, finished rows padded, as ``transformers``'
        ``generate`` (greedy with ``num_beams=1``, else its beam search; the generation config's forced
        bos/eos, banned words, min length and no-repeat n-gram size apply)."""
        ids = _ids(input_ids, "input_ids")
        return self._core.seq2seq_generate(ids, _mask(attention_mask, ids), int(max_new_tokens), int(num_beams),
                                           float(length_penalty), eos_token_id=_eos(eos_token_id),
                                           pad_token_id=-1 if pad_token_id is None else int(pad_token_id),
                                           **_sampling(do_sample, temperature, top_k, top_p, seed))


class VisionModel(PretrainedModel):
    """ViT. ``model(pixel_values)`` with pixel_values (B, C, H, W) float32: ``ViTModel`` -> the last hidden state
    (B, 1 + patches, H); ``ViTForImageClassification`` -> logits (B, labels)."""

    def __call__(self, pixel_values) -> np.ndarray:
        if self.training:
            return self._train_forward(pixels=np.ascontiguousarray(pixel_values, dtype=np.float32))
        return self._core.vision_forward(np.ascontiguousarray(pixel_values, dtype=np.float32), False)

    def pooler_output(self, pixel_values) -> np.ndarray:
        return self._core.vision_forward(np.ascontiguousarray(pixel_values, dtype=np.float32), True)


_CLASSES = {"encoder": EncoderModel, "decoder": CausalLM, "seq2seq": Seq2SeqLM, "vision": VisionModel}


def _tokenizer_of(directory: str):
    """The directory's tokenizer (tokenizer.json, or vocab.txt / vocab.json + merges.txt), or None without one."""
    from ..tokenizer import Tokenizer
    try:
        return Tokenizer.from_pretrained(directory)
    except FileNotFoundError:
        return None


def from_pretrained(directory, dtype: Optional[str] = None, weights: str = "float32", trainable: bool = False,
                    task: Optional[str] = None, num_labels: Optional[int] = None, init_seed: int = 0,
                    verbose: bool = True, activations: str = "float32") -> PretrainedModel:
    """Load a Hugging Face model directory (see the module docstring). ``dtype``: None / "auto" keeps the
    weights' on-disk precision (16-bit weights stay 16-bit, computed in float32), "float32" converts at load.
    ``weights``: "float32", "packed" (packed once into the GEMM's panels) or "int8" (dynamic int8 quantization).
    ``activations="bfloat16"`` (16-bit weights kept 16-bit only): the products with those weights take the
    activations rounded to bfloat16, PyTorch's bf16 precision for them (norms, attention and the residual stream
    stay float32); on CPUs with AMX one tile product instead of three, about 1.7x faster prompts and batches.

    Fine-tuning (:mod:`cpuformer.models.finetuning`): ``trainable=True`` copies every tensor into writable float32
    parameters (all frozen until ``requires_grad_``); ``task`` ("text-classification", "token-classification",
    "question-answering", "image-classification") creates the head an encoder / ViT checkpoint lacks, with
    ``num_labels`` labels (default: the config's), initialised as transformers does with ``init_seed``; the new
    weights are listed in ``model.new_parameters`` and, with ``verbose``, reported as transformers reports them."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: not a directory (a Hugging Face model directory is expected)")
    if dtype not in (None, "auto", "float32"):
        raise ValueError(f"dtype must be None, 'auto' or 'float32', got {dtype!r}")
    if activations not in ("float32", "bfloat16"):
        raise ValueError(f"activations must be 'float32' or 'bfloat16', got {activations!r}")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory}: no config.json (a Hugging Face model directory is expected)")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    if (not os.path.isfile(os.path.join(directory, "model.safetensors"))
            and not os.path.isfile(os.path.join(directory, "model.safetensors.index.json"))
            and os.path.isfile(os.path.join(directory, "pytorch_model.bin"))):
        raise ValueError(f"{directory}: only pytorch_model.bin (a pickle); cpuformer reads model.safetensors "
                         "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
    if num_labels is not None and (isinstance(num_labels, bool) or int(num_labels) < 1):
        raise ValueError(f"num_labels must be >= 1, got {num_labels!r}")
    core = _core._PretrainedModel.load(directory, dtype or "auto", weights, bool(trainable), task or "",
                                       int(num_labels or 0), int(init_seed), activations)
    model = _CLASSES[core.kind](core, directory, config, _tokenizer_of(directory), trainable)
    created = model.new_parameters
    for name in created:  # a new head is there to be trained
        core.set_requires_grad(name, True)
    if created:
        import logging
        arch = head_architecture(core.model_type, core.architecture, core.head)
        message = (f"Some weights of {arch} were not initialized from the model checkpoint at {directory} and are "
                   f"newly initialized: {created}\nYou should probably TRAIN this model on a down-stream task to be "
                   "able to use it for predictions and inference.")
        logging.getLogger("cpuformer").warning(message)
        if verbose:
            import sys
            print(message, file=sys.stderr)
    return model


# --------------------------------------------------------------------------------- sentence-transformers dirs

_POOLING_KEYS = (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                 ("pooling_mode_mean_tokens", "mean"), ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
                 ("pooling_mode_weightedmean_tokens", "weightedmean"), ("pooling_mode_lasttoken", "lasttoken"))


class SentenceEncoder:
    """A sentence-transformers directory (``modules.json``: Transformer, Pooling, optional Dense and Normalize)
    run by the C++ core. ``SentenceEncoder.from_pretrained(dir).encode(texts)`` equals sentence-transformers'
    ``encode``: texts stripped (and lower-cased if ``do_lower_case``), truncated to ``max_seq_length``, batched in
    order of length, pooled and normalised as the directory says."""

    def __init__(self, model: EncoderModel, tokenizer, pooling: List[str], normalize: bool,
                 max_seq_length: int, do_lower_case: bool = False, dense: Optional[list] = None) -> None:
        self.model, self.tokenizer, self.pooling = model, tokenizer, pooling
        self.normalize, self.max_seq_length, self.do_lower_case = normalize, max_seq_length, do_lower_case
        self.dense = dense or []

    @classmethod
    def from_pretrained(cls, directory, dtype: Optional[str] = None, weights: str = "float32",
                        trainable: bool = False, activations: str = "float32") -> "SentenceEncoder":
        directory = os.fspath(directory)
        modules_path = os.path.join(directory, "modules.json")
        modules = _read_json(modules_path) if os.path.isfile(modules_path) else [
            {"path": "", "type": "sentence_transformers.models.Transformer"},
            {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if not isinstance(modules, list):
            raise ValueError(f"{modules_path}: expected a list of modules")
        model, pooling, normalize, dense = None, None, False, []
        max_len, lower = None, False
        for mod in sorted(modules, key=lambda m: m.get("idx", 0)):
            kind = str(mod.get("type", "")).rsplit(".", 1)[-1]
            path = os.path.join(directory, mod.get("path", ""))
            if kind == "Transformer":
                model = from_pretrained(path, dtype=dtype, weights=weights, trainable=trainable,
                                        activations=activations)
                if not isinstance(model, EncoderModel):
                    raise ValueError(f"{path}: a sentence encoder needs an encoder model, got {model.model_type!r}")
                for name in ("sentence_bert_config.json", "sentence_roberta_config.json",
                             "sentence_distilbert_config.json", "sentence_xlm-roberta_config.json"):
                    p = os.path.join(path, name)
                    if os.path.isfile(p):
                        sb = _read_json(p)
                        max_len, lower = sb.get("max_seq_length"), bool(sb.get("do_lower_case", False))
                        break
            elif kind == "Pooling":
                p = os.path.join(path, "config.json")
                pc = _read_json(p) if os.path.isfile(p) else {}
                if not pc.get("include_prompt", True):
                    raise ValueError(f"{p}: include_prompt=false is not supported")
                modes = [name for key, name in _POOLING_KEYS if pc.get(key, key == "pooling_mode_mean_tokens")]
                pooling = modes
            elif kind == "Normalize":
                normalize = True
            elif kind == "Dense":
                dense.append(_dense_module(path))
            else:
                raise ValueError(f"{modules_path}: module type {mod.get('type')!r} is not supported "
                                 "(Transformer, Pooling, Dense, Normalize)")
        if model is None:
            raise ValueError(f"{modules_path}: no Transformer module")
        if model.tokenizer is None:
            raise FileNotFoundError(f"{directory}: no tokenizer (tokenizer.json or vocab.txt)")
        if max_len is None:
            max_len = model._core.max_positions or 512
            tc = os.path.join(directory, "tokenizer_config.json")
            if os.path.isfile(tc):
                mml = _read_json(tc).get("model_max_length")
                if isinstance(mml, int) and 0 < mml < max_len:
                    max_len = mml
        return cls(model, model.tokenizer, pooling or ["mean"], normalize, int(max_len), lower, dense)

    # -- fine-tuning (contrastive, e.g. cpuformer.train.MultipleNegativesRankingLoss) ----------------------------
    # The encoder's parameters, modes, state and saving are the EncoderModel's; a training-mode call returns the
    # pooled (not normalised) sentence embeddings (B, D) and backward goes through the pooling into the encoder.

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True):
        if mode and (self.dense or self.pooling not in (["mean"], ["cls"])):
            raise NotImplementedError("training a SentenceEncoder supports mean or cls pooling without Dense "
                                      f"modules (this one: pooling {self.pooling}, {len(self.dense)} Dense)")
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def named_parameters(self):
        return self.model.named_parameters()

    def parameters(self):
        return self.model.parameters()

    def requires_grad_(self, flag: bool = True):
        self.model.requires_grad_(flag)
        return self

    def zero_grad(self) -> None:
        self.model.zero_grad()

    def state_dict(self):
        return self.model.state_dict()

    def checkpoint_state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.model.load_state_dict(state_dict, strict)

    def save_pretrained(self, directory) -> str:
        return self.model.save_pretrained(directory)

    @property
    def config(self):
        return self.model.config

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
        """Pooled embeddings (B, D) of tokenized input (training mode: with what backward needs)."""
        ids = _ids(input_ids, "input_ids")
        mask = np.ones_like(ids) if attention_mask is None else _mask(attention_mask, ids)
        if not self.training:
            hidden = self.model.hidden_states(ids, mask, token_type_ids)
            emb = _core.sentence_pooling(hidden, mask, self.pooling, False)
            for layer in self.dense:
                emb = layer(emb)
            return emb
        hidden = self.model(ids, mask, token_type_ids)
        m = mask.astype(np.float32)[..., None]
        if self.pooling == ["cls"]:
            emb = np.ascontiguousarray(hidden[:, 0])
            self.model._tls().pool = ("cls", hidden.shape, None)
        else:
            count = np.maximum(m.sum(1), 1e-9).astype(np.float32)  # sentence-transformers' clamp
            emb = (hidden * m).sum(1) / count
            self.model._tls().pool = ("mean", hidden.shape, m / count[:, None, :])
        return emb.astype(np.float32)

    forward = __call__

    def backward(self, grad_output) -> None:
        kind, shape, weights = self.model._tls().pool
        g = np.asarray(grad_output, np.float32)
        if kind == "cls":
            dh = np.zeros(shape, np.float32)
            dh[:, 0] = g
        else:
            dh = (g[:, None, :] * weights).astype(np.float32)
        self.model.backward(dh)

    def encode(self, sentences, batch_size: int = 32, normalize_embeddings: Optional[bool] = None) -> np.ndarray:
        """(N, D) float32 embeddings of a list of texts ((D,) for one text). As sentence-transformers: the
        directory's Normalize module always applies; ``normalize_embeddings=True`` normalises besides."""
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if any(not isinstance(t, str) for t in texts):
            raise TypeError("sentences must be str or a list of str")
        normalize = self.normalize or bool(normalize_embeddings)
        # sentence-transformers sorts by length (longest first) so that each batch pads little, then restores order.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        dim = None
        out = None
        for start in range(0, len(texts), int(batch_size)):
            idx = order[start:start + int(batch_size)]
            batch = [texts[i].strip() for i in idx]
            if self.do_lower_case:
                batch = [t.lower() for t in batch]
            enc = self.tokenizer(batch, padding=True, truncation="longest_first", max_length=self.max_seq_length,
                                 return_tensors="np")
            hidden = self.model.hidden_states(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
            emb = _core.sentence_pooling(hidden, enc["attention_mask"], self.pooling, False)
            for layer in self.dense:
                emb = layer(emb)
            if normalize:
                emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12).astype(np.float32)
            if out is None:
                dim = emb.shape[1]
                out = np.empty((len(texts), dim), np.float32)
            out[idx] = emb
        if out is None:
            out = np.zeros((0, self.model.hidden_size * len(self.pooling)), np.float32)
        return out[0] if single else out


def _dense_module(path: str):
    """sentence-transformers' Dense: act(linear(x)) from config.json + model.safetensors."""
    cfg = _read_json(os.path.join(path, "config.json"))
    st = os.path.join(path, "model.safetensors")
    if not os.path.isfile(st):
        raise FileNotFoundError(f"{path}: no model.safetensors for the Dense module")
    from ..io import load_safetensors
    tensors, _ = load_safetensors(st)
    w = np.ascontiguousarray(tensors["linear.weight"], np.float32)
    b = tensors.get("linear.bias")
    act = str(cfg.get("activation_function", "torch.nn.modules.linear.Identity")).rsplit(".", 1)[-1]
    acts = {"Identity": lambda x: x, "Tanh": np.tanh, "ReLU": lambda x: np.maximum(x, 0)}
    if act not in acts:
        raise ValueError(f"{path}/config.json: activation {act!r} is not supported (Identity, Tanh, ReLU)")
    fn = acts[act]

    def apply(x):
        y = ops.linear(np.ascontiguousarray(x, np.float32), w, None if b is None else np.asarray(b, np.float32))
        return np.asarray(fn(y), np.float32)
    return apply
