"""Tiny random Hugging Face directories for the fine-tuning tests, built with the helpers of
tests/pretrained/conftest.py (transformers / torch are test-only references: without them these tests skip)."""
from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("_cpuformer_hf_testlib",
                                               pathlib.Path(__file__).resolve().parent.parent / "pretrained" /
                                               "hf_testlib.py")
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)
torch, transformers = H.torch, H.transformers
rand_ids = H.rand_ids


def small_batch(seed=0, B=4, T=7):
    """Token ids (B, T) and an attention mask with the second row padded after 5 tokens."""
    ids = rand_ids(seed, (B, T), 3, 100)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def rel_max(a, b):
    """max |a - b| over max |b| (in float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _fixture(name, spec):
    @pytest.fixture(scope="session", name=name)
    def _f(tmp_path_factory):
        if torch is None:
            pytest.skip("torch / transformers not installed")
        model = H.build(spec)
        path = H.save(model, tmp_path_factory.mktemp(name))
        return path, model
    return _f


for _name, _spec_name in (("ft_bert", "bert_model"), ("ft_bert_seqcls", "bert_seqcls"), ("ft_gpt2", "gpt2"),
                          ("ft_llama", "llama"), ("ft_t5", "t5"), ("ft_bert_qa", "bert_qa")):
    globals()[_name] = _fixture(_name, _spec_name)


@pytest.fixture(scope="session")
def ft_bert_tok(tmp_path_factory):
    """A BertModel directory with a tiny WordPiece tokenizer (and sentence-transformers files: mean pooling)."""
    if torch is None:
        pytest.skip("torch / transformers not installed")
    base = tmp_path_factory.mktemp("ft_bert_tok_base")
    torch.manual_seed(1)
    cfg = H._bert_cfg()
    cfg._attn_implementation = "eager"
    model = H.randomize(transformers.BertModel(cfg)).eval()
    model.save_pretrained(str(base))
    H.wordpiece_tokenizer_json(base)
    return H.write_st_dir(str(tmp_path_factory.mktemp("ft_bert_st")), str(base), ["mean"])
