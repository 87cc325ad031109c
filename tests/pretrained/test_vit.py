"""ViT checkpoints (ViTModel, ViTForImageClassification; image 32, patch 8) loaded with
cpuformer.models.from_pretrained against transformers on random pixel_values."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_testlib import VITS, check_rel, load, rel_err, to_np  # noqa: E402


def _pixels(seed=0, n=3):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _torch_out(hf_model, pixels):
    with torch.no_grad():
        out = hf_model(pixel_values=torch.tensor(pixels))
    return to_np(out.logits if hasattr(out, "logits") else out.last_hidden_state)


@pytest.mark.parametrize("hf", VITS, indirect=True)
def test_vit_parity(hf):
    path, hf_model = hf
    pixels = _pixels()
    got = load(path)(pixels)
    ref = _torch_out(hf_model, pixels)
    # ViTModel: (B, (32/8)^2 + 1, H) = (3, 17, 32); classification: (3, num_labels)
    assert ref.shape == ((3, 17, 32) if type(hf_model).__name__ == "ViTModel" else (3, 3))
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    check_rel(got, ref, type(hf_model).__name__)


@pytest.mark.parametrize("hf", VITS, indirect=True)
def test_vit_rows_are_independent(hf):
    path, _ = hf
    ours = load(path)
    pixels = _pixels(1)
    batch = ours(pixels)
    for b in range(len(pixels)):
        err = rel_err(ours(pixels[b:b + 1]), batch[b:b + 1])
        assert err <= 1e-5, f"image {b}: rel err {err:.3g}"


@pytest.mark.parametrize("hf", VITS, indirect=True)
def test_vit_metadata(hf):
    path, hf_model = hf
    ours = load(path)
    with open(os.path.join(path, "config.json")) as f:
        assert ours.config == json.load(f)
    assert ours.architecture == type(hf_model).__name__
    assert ours.tokenizer is None
