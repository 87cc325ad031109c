"""Nothing lost: saved files get ordinary permissions, and the trainer's checkpoints survive a kill at any moment.

A run is killed at every filesystem step of its checkpoint writes (and, in child processes, at random moments and
by SIGKILL); the next start with ``resume_from="latest"`` must never fail and must finish with exactly the losses,
history and weights of an uninterrupted run. ``CPUFORMER_FUZZ_LONG=1`` runs longer, denser variants.
"""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from cpuformer.io import atomic_write_bytes, save_safetensors

LONG = os.environ.get("CPUFORMER_FUZZ_LONG", "") not in ("", "0")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ------------------------------------------------------------------------------------------------ permissions

@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                        (0o002, 0o664, 0o775)])
def test_saved_files_get_the_permissions_open_would_give(tmp_path, umask, file_mode, dir_mode):
    from cpuformer.train import Trainer
    old = os.umask(umask)
    try:
        save_safetensors(str(tmp_path / "m.safetensors"), {"w": np.ones(3, np.float32)})
        atomic_write_bytes(str(tmp_path / "new" / "t.json"), [b"{}"])
        model, ds = tiny_gpt()
        ckpt = Trainer(model, quiet=True).save_checkpoint(str(tmp_path / "ckpt"))
    finally:
        os.umask(old)
    assert _mode(tmp_path / "m.safetensors") == file_mode
    assert _mode(tmp_path / "new" / "t.json") == file_mode
    assert _mode(tmp_path / "new") == dir_mode
    assert _mode(ckpt) == dir_mode
    for name in os.listdir(ckpt):
        assert _mode(os.path.join(ckpt, name)) == file_mode, name


def test_overwriting_keeps_the_file_mode(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_safetensors(path, {"w": np.ones(3, np.float32)})
    os.chmod(path, 0o640)
    save_safetensors(path, {"w": np.zeros(3, np.float32)})  # as open(path, "wb") would: the mode stays
    assert _mode(path) == 0o640
    assert [n for n in os.listdir(tmp_path)] == ["m.safetensors"]


# ------------------------------------------------------------------------------------------------ helpers

def tiny_gpt(dropout=0.1, seed=0):
    import cpuformer.nn as nn
    from cpuformer.data import CharTokenizer, LanguageModelDataset
    from cpuformer.models import GPT
    nn.init.manual_seed(seed)
    text = "the quick brown fox jumps over the lazy dog. " * 40
    tok = CharTokenizer.from_corpus([text])
    model = GPT(tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=dropout)
    return model, LanguageModelDataset(tok.encode(text), 16)
