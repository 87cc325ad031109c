"""Memory of from_pretrained: the weights are memory-mapped and used where they lie, never copied. A float32
BERT-sized checkpoint (~180 MB, random numpy written with cpuformer.io.save_safetensors; no transformers needed) is
loaded and run in a child process whose peak RSS may grow by at most 1.1x the file size; a bfloat16 copy maps half
the bytes and owns only the small converted tensors (norms, biases)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cpuformer.io import save_safetensors

H, I, LAYERS, VOCAB, POS = 768, 3072, 6, 4000, 128


def _tensors(seed=0):
    rng = np.random.default_rng(seed)

    def mat(*shape):  # uniform with the variance of N(0, 1/fan_in) (uniform draws are the fast ones)
        a = rng.random(shape, dtype=np.float32)
        a -= 0.5
        a *= np.float32(12 ** 0.5 * shape[-1] ** -0.5)
        return a

    def vec(n, base=0.0):
        return (base + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    t = {"embeddings.word_embeddings.weight": mat(VOCAB, H), "embeddings.position_embeddings.weight": mat(POS, H),
         "embeddings.token_type_embeddings.weight": mat(2, H), "embeddings.LayerNorm.weight": vec(H, 1.0),
         "embeddings.LayerNorm.bias": vec(H)}
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            t[p + name + ".weight"], t[p + name + ".bias"] = mat(H, H), vec(H)
        t[p + "intermediate.dense.weight"], t[p + "intermediate.dense.bias"] = mat(I, H), vec(I)
        t[p + "output.dense.weight"], t[p + "output.dense.bias"] = mat(H, I), vec(H)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + ln + ".weight"], t[p + ln + ".bias"] = vec(H, 1.0), vec(H)
    return t


def _config():
    return {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": VOCAB, "hidden_size": H,
            "num_hidden_layers": LAYERS, "num_attention_heads": 12, "intermediate_size": I,
            "max_position_embeddings": POS, "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
            "pad_token_id": 0}


def _save_bf16(path, tensors):
    """A BF16 safetensors file (numpy has no bfloat16): float32 bits rounded to nearest even, upper halves."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        bits = np.ascontiguousarray(tensors[name], np.float32).view(np.uint32)
        rounded = (bits >> 16) & 1
        rounded += 0x7FFF
        rounded += bits  # finite values: no uint32 overflow
        rounded >>= 16
        half = rounded.astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(half)]}
        blobs.append(half)
        offset += len(half)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for b in blobs:
            f.write(b)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    f32, bf16 = root / "f32", root / "bf16"
    for d in (f32, bf16):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(_config()))
    tensors = _tensors()
    save_safetensors(str(f32 / "model.safetensors"), tensors)
    _save_bf16(str(bf16 / "model.safetensors"), tensors)
    return str(f32), str(bf16)


CHILD = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    import cpuformer.models as M
    ids = np.arange(1, 33, dtype=np.int64).reshape(2, 16)
    np.zeros(4 << 20, np.float32).sum()  # warm the allocator with the largest input-sized temporaries
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = M.from_pretrained(sys.argv[1])
    hidden = model(ids)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "after": after, "finite": bool(np.isfinite(hidden).all()),
                      "shape": list(hidden.shape), **model.memory}))
""")


def _child(directory):
    """Runs CHILD in a grandchild under sh: Linux keeps ru_maxrss across execve, so a Python started straight from
    pytest would report pytest's own peak (torch and all) as its baseline; a process forked by sh starts afresh."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", CHILD, directory],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["before"] < 150e6, f"baseline peak RSS {r['before'] / 1e6:.0f} MB: inherited from the parent?"
    return r


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB and mapped-page accounting")
def test_float32_weights_are_mapped_not_copied(checkpoints):
    f32, _ = checkpoints
    size = os.path.getsize(os.path.join(f32, "model.safetensors"))
    assert 150e6 <= size <= 200e6
    r = _child(f32)
    assert r["finite"] and r["shape"] == [2, 16, H]
    assert r["mapped"] == size and r["owned"] == 0, r
    grew = r["after"] - r["before"]
    assert grew <= 1.1 * size, f"peak RSS grew by {grew / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB and mapped-page accounting")
def test_bfloat16_weights_stay_16_bit(checkpoints):
    f32, bf16 = checkpoints
    f32_size = os.path.getsize(os.path.join(f32, "model.safetensors"))
    size = os.path.getsize(os.path.join(bf16, "model.safetensors"))
    r = _child(bf16)
    assert r["finite"] and r["shape"] == [2, 16, H]
    assert r["mapped"] == size and abs(size - f32_size / 2) <= 0.001 * f32_size, (size, f32_size)
    # only the 1-D tensors (norms, biases: ~60k floats) are converted to float32; the matrices stay 16-bit
    assert r["owned"] <= 0.005 * f32_size, r
    grew = r["after"] - r["before"]
    assert grew <= 1.1 * size + 16e6, f"peak RSS grew by {grew / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
