"""Tiny random Hugging Face model directories for the parity tests of cpuformer.models.from_pretrained.

Every fixture builds a small model with transformers (fixed torch seed), gives the parameters that transformers
initialises to constants (norm weights and biases, biases, final_logits_bias) small random values so that wrong wiring
is visible, scales the weight matrices to O(1) activations (so argmax and beam choices are not near-ties), saves it with
save_pretrained and returns (directory, torch model in eval mode, float32). The fixtures are session-scoped and must
never be mutated by a test (copy.deepcopy before .to()).

transformers, torch and tokenizers are test-only references: without them these tests are skipped.

The test modules import these helpers as ``hf_testlib`` (tests/pretrained/conftest.py registers its fixtures).
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

from testutil import SIMD_PATHS, assert_close, randn, rel_err  # noqa: F401  (re-exported for the test modules)

try:
    import torch
    import transformers
except ImportError:  # the test modules importorskip these themselves
    torch = transformers = None
else:
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

RTOL = 1e-4  # float32 parity: max |ours - torch| / max |torch| per output

# ---------------------------------------------------------------------------------------------------------------------
# helpers shared by the test modules


def randomize(model, skip=()):
    """Matrices ~ N(0, 1/fan_in) (fan_in = last dim, or C*k*k for a conv), 1-D parameters (norm weights, biases,
    Gemma's norm offsets) += N(0, 0.2), and a final_logits_bias buffer ~ N(0, 0.5). Parameters whose name contains one
    of `skip` keep their value (Marian's frozen sinusoidal position table)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in skip):
                continue
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                fan_in = int(np.prod(p.shape[1:])) if p.ndim == 4 else p.shape[-1]
                p.normal_(0.0, fan_in ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("final_logits_bias"):
                b.normal_(0.0, 0.5)
    return model


def to_np(t):
    return t.detach().to(torch.float32).numpy()


def rand_ids(seed, shape, low, high):
    return np.random.default_rng(seed).integers(low, high, size=shape).astype(np.int64)


def right_padded(ids, lengths, pad_id):
    """ids (B,T) with row b cut to lengths[b] and pad_id after it, and the matching attention mask."""
    ids = ids.copy()
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, n:] = pad_id
    return ids, mask


def left_padded(ids, lengths, pad_id):
    """ids (B,T) keeping the last lengths[b] tokens of row b, pad_id before them, and the mask."""
    ids = ids.copy()
    mask = np.zeros_like(ids)
    T = ids.shape[1]
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
        ids[b, :T - n] = pad_id
    return ids, mask


def gen_positions(mask):
    """Position ids as transformers' generate numbers a left-padded batch: cumsum(mask) - 1, pads at 0."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)


def check_rel(actual, expected, what, rtol=RTOL):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


def load(directory, **kw):
    """cpuformer.models.from_pretrained, looked up at call time."""
    import cpuformer.models
    return cpuformer.models.from_pretrained(str(directory), **kw)


def names(*needles):
    """A pytest.raises(match=...) pattern that requires every needle (literal text) somewhere in the message."""
    import re
    return "(?s)" + "".join(f"(?=.*{re.escape(n)})" for n in needles)


# ---------------------------------------------------------------------------------------------------------------------
# builders: each returns a torch model (eval, float32) whose save_pretrained directory the fixture writes

V = 120  # vocabulary of the tiny models
ENC = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
           max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
LLAMA = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _tf():
    return transformers


def _bert_cfg(num_labels=3):
    return _tf().BertConfig(**ENC, type_vocab_size=2, pad_token_id=0, num_labels=num_labels)


def _roberta_cfg(cls="RobertaConfig"):
    # pad 1: position ids count from 2, as in real RoBERTa; max_position_embeddings leaves room for the offset
    return getattr(_tf(), cls)(**ENC, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                               layer_norm_eps=1e-5, num_labels=3)


def _distilbert_cfg(num_labels=3):
    return _tf().DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                  max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, pad_token_id=0,
                                  num_labels=num_labels)


def _mpnet_cfg():
    return _tf().MPNetConfig(**ENC, pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=3)


def _gpt2_cfg():
    return _tf().GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=V - 1, eos_token_id=V - 1)


def _llama_cfg(**kw):
    return _tf().LlamaConfig(**{**LLAMA, **kw})


def _llama3_cfg():
    return _llama_cfg(num_key_value_heads=2, tie_word_embeddings=True,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16})


def _mistral_cfg(sliding_window=4):
    return _tf().MistralConfig(**LLAMA, num_key_value_heads=2, sliding_window=sliding_window)


def _qwen2_cfg():
    return _tf().Qwen2Config(**LLAMA, num_key_value_heads=2)


def _qwen3_cfg():
    return _tf().Qwen3Config(**LLAMA, num_key_value_heads=2, head_dim=16)  # 4 heads x 16 = 64 != hidden 32


def _gemma_cfg():
    return _tf().GemmaConfig(**LLAMA, num_key_value_heads=1, head_dim=16, hidden_act="gelu_pytorch_tanh")


def _marian_cfg():
    return _tf().MarianConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                              decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                              activation_function="swish", scale_embedding=True, max_position_embeddings=64,
                              pad_token_id=V - 1, eos_token_id=0, decoder_start_token_id=V - 1, forced_eos_token_id=0,
                              dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def _bart_cfg():
    return _tf().BartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                            max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                            decoder_start_token_id=2, forced_eos_token_id=2, dropout=0.0, attention_dropout=0.0,
                            activation_dropout=0.0)


def _t5_cfg(v11):
    # 16 buckets / max distance 12: the logarithmic buckets and their clamp are both reached at these lengths
    common = dict(vocab_size=V, d_model=32, num_layers=2, num_heads=4, relative_attention_num_buckets=16,
                  relative_attention_max_distance=12, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                  decoder_start_token_id=0)
    if v11:  # T5 v1.1 / Flan: gated-gelu, untied lm_head, heads x d_kv != d_model
        return _tf().T5Config(**common, d_kv=12, d_ff=40, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return _tf().T5Config(**common, d_kv=8, d_ff=48, feed_forward_proj="relu", tie_word_embeddings=True)


def _vit_cfg():
    return _tf().ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=48, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, num_labels=3)


def _untie_lm_head(model):
    """T5 v1.1 / Flan: a separate lm_head. transformers 5 ties it at construction, so give it its own random
    tensor (save_pretrained then stores both, and loading keeps both since they differ)."""
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * model.config.d_model ** -0.5)
    return model


def _t5v11_hub_config(cfg):
    """Real v1.1 / Flan config.json files say tie_word_embeddings false and have no scale_decoder_outputs (a key
    transformers 5 adds when it saves); write the file as the Hub has it."""
    cfg["tie_word_embeddings"] = False
    cfg.pop("scale_decoder_outputs", None)
    return cfg


def _shrink_embedding(model):
    """Gemma multiplies the (tied) embedding by sqrt(hidden): at O(1) scale the input token dominates the residual
    stream and greedy decoding just repeats it. A smaller embedding lets the layers steer the continuation."""
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(0.25)
    return model


def _favour_pad(model):
    """Marian's generation_config bans the pad id (bad_words_ids). Make the pad logit attractive (+2 in
    final_logits_bias) so that without the ban greedy and beam search would emit it."""
    with torch.no_grad():
        model.final_logits_bias[0, model.config.pad_token_id] = 2.0
    return model


# name -> f(model) -> model, applied before saving
POST_BUILD = {"t5v11": _untie_lm_head, "gemma": _shrink_embedding, "marian": _favour_pad}
CONFIG_EDITS = {"t5v11": _t5v11_hub_config}  # name -> f(config dict) -> config dict, applied to the saved config.json

# name -> (transformers class name, config factory, extra randomize skip list, generation_config overrides)
SPECS = {
    "bert_model": ("BertModel", _bert_cfg, (), None),
    "bert_seqcls": ("BertForSequenceClassification", _bert_cfg, (), None),
    "bert_tokcls": ("BertForTokenClassification", _bert_cfg, (), None),
    "bert_qa": ("BertForQuestionAnswering", lambda: _bert_cfg(num_labels=2), (), None),
    "bert_mlm": ("BertForMaskedLM", _bert_cfg, (), None),
    "roberta_model": ("RobertaModel", _roberta_cfg, (), None),
    "roberta_seqcls": ("RobertaForSequenceClassification", _roberta_cfg, (), None),
    "roberta_mlm": ("RobertaForMaskedLM", _roberta_cfg, (), None),
    "xlmr_model": ("XLMRobertaModel", lambda: _roberta_cfg("XLMRobertaConfig"), (), None),
    "distilbert_model": ("DistilBertModel", _distilbert_cfg, (), None),
    "distilbert_seqcls": ("DistilBertForSequenceClassification", _distilbert_cfg, (), None),
    "distilbert_qa": ("DistilBertForQuestionAnswering", lambda: _distilbert_cfg(num_labels=2), (), None),
    "mpnet_model": ("MPNetModel", _mpnet_cfg, (), None),
    "mpnet_mlm": ("MPNetForMaskedLM", _mpnet_cfg, (), None),
    "gpt2": ("GPT2LMHeadModel", _gpt2_cfg, (), None),
    "llama": ("LlamaForCausalLM", _llama_cfg, (), None),
    "llama3": ("LlamaForCausalLM", _llama3_cfg, (), None),
    "mistral": ("MistralForCausalLM", _mistral_cfg, (), None),
    "qwen2": ("Qwen2ForCausalLM", _qwen2_cfg, (), None),
    "qwen3": ("Qwen3ForCausalLM", _qwen3_cfg, (), None),
    "gemma": ("GemmaForCausalLM", _gemma_cfg, (), None),
    # Marian: pad = decoder start = V-1, eos 0, forced eos, pad banned, beams 4 by default (as opus-mt repos)
    "marian": ("MarianMTModel", _marian_cfg, ("embed_positions",),
               dict(bad_words_ids=[[V - 1]], forced_eos_token_id=0, num_beams=4, max_length=64,
                    decoder_start_token_id=V - 1, eos_token_id=0, pad_token_id=V - 1)),
    "bart": ("BartForConditionalGeneration", _bart_cfg, (), dict(forced_eos_token_id=2, decoder_start_token_id=2,
                                                                 eos_token_id=2, pad_token_id=1, bos_token_id=0)),
    "t5": ("T5ForConditionalGeneration", lambda: _t5_cfg(False), (), None),
    "t5v11": ("T5ForConditionalGeneration", lambda: _t5_cfg(True), (), None),
    "vit_model": ("ViTModel", _vit_cfg, (), None),
    "vit_cls": ("ViTForImageClassification", _vit_cfg, (), None),
}

ENCODERS = [n for n in SPECS if n.split("_")[0] in ("bert", "roberta", "xlmr", "distilbert", "mpnet")]
DECODERS = ["gpt2", "llama", "llama3", "mistral", "qwen2", "qwen3", "gemma"]
SEQ2SEQ = ["marian", "bart", "t5", "t5v11"]
VITS = ["vit_model", "vit_cls"]


def build(name, seed=0):
    """The torch model of SPECS[name]: random, eval mode, float32, eager attention."""
    cls_name, cfg_fn, skip, gen = SPECS[name]
    cfg = cfg_fn()
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg)
    model = randomize(model, skip).to(torch.float32).eval()
    if gen is not None:
        for k, v in gen.items():
            setattr(model.generation_config, k, v)
    if name in POST_BUILD:
        model = POST_BUILD[name](model).eval()
    return model


def edit_config(directory, fn):
    path = os.path.join(str(directory), "config.json")
    with open(path) as f:
        cfg = json.load(f)
    with open(path, "w") as f:
        json.dump(fn(cfg), f, indent=2)


def save(model, path, **kw):
    model.save_pretrained(str(path), **kw)
    return str(path)


def _make_fixture(name):
    @pytest.fixture(scope="session", name=name)
    def _fixture(tmp_path_factory):
        model = build(name)
        path = save(model, tmp_path_factory.mktemp(name))
        if name in CONFIG_EDITS:
            edit_config(path, CONFIG_EDITS[name])
        return path, model
    return _fixture


for _name in SPECS:
    globals()[_name] = _make_fixture(_name)


@pytest.fixture
def hf(request):
    """Indirect access to a (dir, torch model) fixture by name: @pytest.mark.parametrize("hf", [...], indirect=True)."""
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------------------------------------------------
# 16-bit and sharded copies


def half_copy(model, dtype, path):
    half = copy.deepcopy(model).to(dtype)
    half.save_pretrained(str(path))
    # the float32 model of the rounded weights: round the parameters only (a module-wide .to() would also round
    # buffers such as RoPE's inv_freq, which transformers computes in float32 whatever the weights' dtype)
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(dtype).to(torch.float32))
    return str(path), ref


@pytest.fixture(scope="session", params=["float16", "bfloat16"])
def half_llama(request, tmp_path_factory, llama):
    """(dir of a 16-bit copy of the llama fixture, torch float32 model of the same rounded weights, dtype name)."""
    d, ref = half_copy(llama[1], getattr(torch, request.param), tmp_path_factory.mktemp("llama_" + request.param))
    return d, ref, request.param


@pytest.fixture(scope="session", params=["float16", "bfloat16"])
def half_bert(request, tmp_path_factory, bert_model):
    d, ref = half_copy(bert_model[1], getattr(torch, request.param), tmp_path_factory.mktemp("bert_" + request.param))
    return d, ref, request.param


@pytest.fixture(scope="session")
def sharded_llama(tmp_path_factory, llama):
    """The llama fixture saved in ~30 KB shards with model.safetensors.index.json."""
    path = tmp_path_factory.mktemp("llama_sharded")
    save(llama[1], path, max_shard_size="30KB")
    return str(path), llama[1]


# ---------------------------------------------------------------------------------------------------------------------
# tokenizers (only where a test needs text)

SENTENCES = [
    "the cat sat on the mat .",
    "a dog ran in the park and the cat watched .",
    "it is a truly wonderful film , full of heart !",
    "the plot is thin and the acting is worse .",
    "we walked home under a grey sky , talking about nothing .",
    "numbers like 42 and 7 appear here too .",
    "she said the movie was neither good nor bad .",
]


def wordpiece_tokenizer_json(path, vocab_size=V):
    """A tiny BERT-style WordPiece tokenizer (lowercasing, [CLS] .. [SEP]) trained on SENTENCES, saved with
    transformers (tokenizer.json + tokenizer_config.json) so that AutoTokenizer and sentence-transformers load it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    from tokenizers import decoders
    tok.decoder = decoders.WordPiece()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                                model_max_length=64)
    fast.save_pretrained(str(path))
    assert os.path.exists(os.path.join(str(path), "tokenizer.json"))
    return fast


# ---------------------------------------------------------------------------------------------------------------------
# sentence-transformers directories


def write_st_dir(path, base_dir, pooling, normalize=False, max_seq_length=24, do_lower_case=False):
    """A sentence-transformers directory: the files of `base_dir` (a BertModel directory with a tokenizer),
    modules.json, sentence_bert_config.json, 1_Pooling/config.json with `pooling` (a list of mode names among cls,
    max, mean, mean_sqrt_len, weightedmean, lasttoken) and, if `normalize`, a 2_Normalize module."""
    import shutil
    shutil.copytree(base_dir, path, dirs_exist_ok=True)
    hidden = json.load(open(os.path.join(base_dir, "config.json")))["hidden_size"]
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(path, "2_Normalize"), exist_ok=True)
    json.dump(modules, open(os.path.join(path, "modules.json"), "w"), indent=2)
    json.dump({"max_seq_length": max_seq_length, "do_lower_case": do_lower_case},
              open(os.path.join(path, "sentence_bert_config.json"), "w"))
    os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
    modes = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
             "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
             "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
    pool = {"word_embedding_dimension": hidden, **{v: (k in pooling) for k, v in modes.items()}}
    json.dump(pool, open(os.path.join(path, "1_Pooling", "config.json"), "w"), indent=2)
    return str(path)


@pytest.fixture(scope="session")
def st_base(tmp_path_factory):
    """A BertModel directory (no prefix, as sentence-transformers saves it) with a tiny WordPiece tokenizer."""
    path = tmp_path_factory.mktemp("st_base")
    torch.manual_seed(1)
    cfg = _bert_cfg()
    cfg._attn_implementation = "eager"
    model = randomize(transformers.BertModel(cfg)).eval()
    model.save_pretrained(str(path))
    wordpiece_tokenizer_json(path)
    return str(path)
