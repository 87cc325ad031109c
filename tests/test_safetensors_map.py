"""cpuformer.io.open_safetensors / _core.SafetensorsMap: memory-mapped safetensors files and Hugging Face directories.

Files and directories come from the official writers (the ``safetensors`` package, ``transformers``'
save_pretrained; test-only, skipped where absent) and from hand-made bytes for the malformed cases."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cpuformer import _core
from cpuformer.io import open_safetensors


def write_raw(path, header, data=b"", pad=True):
    """A safetensors file from a header (dict, or raw bytes/str) and the data section's bytes."""
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    if pad:
        raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)
    return str(path)


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


# ------------------------------------------------------------------------------------------- the official writer

def torch_bits(t):
    """What our view of a torch tensor should hold: numpy values, or the raw bits where numpy has no such type."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if "float8" in str(t.dtype):
        return t.view(torch.uint8).numpy()
    return t.numpy()


def test_official_file_every_dtype_equals_torch(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(4, 3, generator=g).half(),
        "bf16": torch.randn(2, 7, generator=g).bfloat16(),
        "f64": torch.randn(3, generator=g).double(),
        "i64": torch.arange(-6, 6).reshape(3, 4),
        "i32": torch.arange(5, dtype=torch.int32),
        "i16": torch.arange(-3, 3, dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(2, 2, generator=g, dtype=torch.complex64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    if hasattr(torch, "float8_e4m3fn"):
        tensors["f8"] = torch.randn(6, generator=g).to(torch.float8_e4m3fn)
        tensors["f8b"] = torch.randn(6, generator=g).to(torch.float8_e5m2)
    if hasattr(torch, "uint16"):
        tensors["u16"] = torch.tensor([0, 65535], dtype=torch.uint16)
        tensors["u32"] = torch.tensor([0, 2**32 - 1], dtype=torch.uint32)
        tensors["u64"] = torch.tensor([0, 2**63], dtype=torch.uint64)
    path = tmp_path / "all.safetensors"
    st_torch.save_file(tensors, str(path), metadata={"format": "pt", "note": "é"})
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])

    m = open_safetensors(path)  # a pathlib.Path works
    assert sorted(m.keys()) == sorted(tensors) and len(m) == len(tensors) and list(m) == m.keys()
    assert "f32" in m and "nope" not in m and 3 not in m
    assert m.metadata() == {"format": "pt", "note": "é"}
    assert m.mapped_bytes == path.stat().st_size
    for name, t in tensors.items():
        assert m.dtype(name) == header[name]["dtype"], name
        assert m.shape(name) == tuple(t.shape), name
        view, want = m.tensor(name), torch_bits(t)
        assert view.dtype == want.dtype and view.shape == want.shape, name
        np.testing.assert_array_equal(view, want, err_msg=name)
    assert m.dtype("bf16") == "BF16" and m.tensor("bf16").dtype == np.uint16
    with pytest.raises(KeyError, match="nope"):
        m.tensor("nope")


def test_views_are_read_only_zero_copy_and_keep_the_map_alive(tmp_path):
    path = write_raw(tmp_path / "w.safetensors", {"w": entry("F32", [4, 4], 0, 64)},
                     np.arange(16, dtype="<f4").tobytes())
    m = _core.SafetensorsMap.open(path)
    a, b = m.tensor("w"), m.tensor("w")
    assert np.shares_memory(a, b)
    assert not a.flags.owndata and not a.flags.writeable and a.base is m
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    del m, b
    np.testing.assert_array_equal(a, np.arange(16, dtype=np.float32).reshape(4, 4))  # the mapping is still there


def test_unaligned_and_unpadded_tensors_are_copied(tmp_path):
    # Old writers neither pad the header nor order tensors by size: here the F32 tensor starts at data byte 1.
    header = {"u": entry("U8", [1], 0, 1), "x": entry("F32", [3], 1, 13)}
    values = np.array([1.5, -2.0, 3.25], dtype="<f4")
    path = write_raw(tmp_path / "old.safetensors", header, b"\x07" + values.tobytes())
    m = open_safetensors(path)
    x = m.tensor("x")
    np.testing.assert_array_equal(x, values)
    assert x.flags.owndata and not x.flags.writeable and x.flags.aligned
    assert m.tensor("u")[0] == 7


def test_header_padding_and_trailing_whitespace(tmp_path):
    for tail in (b"        ", b" \n\t\r"):
        raw = json.dumps({"a": entry("I32", [1], 0, 4)}).encode() + tail
        path = write_raw(tmp_path / "p.safetensors", raw, (7).to_bytes(4, "little"), pad=False)
        assert open_safetensors(path).tensor("a")[0] == 7


# ----------------------------------------------------------------------------------- Hugging Face directories

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transformers_sharded_directory_equals_state_dict(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()

    m = open_safetensors(tmp_path)
    state = model.state_dict()
    assert sorted(m.keys()) == sorted(state)
    assert m.mapped_bytes == sum((tmp_path / s).stat().st_size for s in shards)
    assert m.metadata().get("format") == "pt"
    for name, t in state.items():
        assert m.dtype(name) == {"float32": "F32", "bfloat16": "BF16"}[dtype]
        np.testing.assert_array_equal(m.tensor(name), torch_bits(t.contiguous()), err_msg=name)


def test_transformers_single_file_directory(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    model = transformers.BertModel(config)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    m = open_safetensors(str(tmp_path))
    state = model.state_dict()
    assert set(m.keys()) <= set(state) and len(m) > 0
    for name in m.keys():
        np.testing.assert_array_equal(m.tensor(name), state[name].numpy(), err_msg=name)


def shard_dir(tmp_path, weight_map, shards=None):
    """A directory with shards s1 (tensor a) and s2 (tensor b) unless `shards` says otherwise, and an index."""
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    shards = shards or {"s1.safetensors": ["a"], "s2.safetensors": ["b"]}
    for shard, names in shards.items():
        header = {n: entry("F32", [2], 8 * i, 8 * i + 8) for i, n in enumerate(names)}
        write_raw(d / shard, header, np.ones(2 * len(names), "<f4").tobytes())
    index = weight_map if isinstance(weight_map, str) else json.dumps({"metadata": {"total_size": 16},
                                                                       "weight_map": weight_map})
    (d / "model.safetensors.index.json").write_text(index)
    return d


def test_sharded_directory_by_hand(tmp_path):
    d = shard_dir(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})
    m = open_safetensors(d)
    assert m.keys() == ["a", "b"] and m.tensor("b").tolist() == [1.0, 1.0]
    (d / "s3.safetensors").write_bytes(b"junk: not named by the index, so never opened")
    assert len(open_safetensors(d)) == 2
    # model.safetensors is preferred over the index, even a broken one
    (d / "model.safetensors.index.json").write_text("{")
    write_raw(d / "model.safetensors", {"only": entry("U8", [1], 0, 1)}, b"\x01")
    assert open_safetensors(d).keys() == ["only"]


# ---------------------------------------------------------------------------------------------- malformed inputs

def malformed_cases(tmp_path):
    """(name, path, exception, [substrings of the message])."""
    good = write_raw(tmp_path / "good.safetensors", {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 8, 16)},
                     bytes(16))
    raw = open(good, "rb").read()
    cases = []

    def add(name, exc, parts, header=None, data=bytes(16), path=None):
        if path is None:
            path = write_raw(tmp_path / f"{name}.safetensors", header, data)
        cases.append((name, str(path), exc, [str(path)] + parts))

    cut = tmp_path / "truncated.safetensors"
    cut.write_bytes(raw[:-3])
    add("truncated", ValueError, ["tensor 'b'", "outside the data section"], path=cut)
    past = tmp_path / "past.safetensors"
    past.write_bytes((10**6).to_bytes(8, "little") + raw[8:])
    add("header past end", ValueError, ["runs past the end"], path=past)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x00")
    add("too short", ValueError, ["too short"], path=tiny)
    add("bad JSON", ValueError, ["JSON"], header='{"a": {"dtype": "F32",')
    add("not an object", ValueError, ["not a JSON object"], header="[1, 2]")
    add("overlap", ValueError, ["tensors 'a' and 'b' overlap"],
        header={"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)})
    add("unknown dtype", ValueError, ["tensor 'a'", "unsupported dtype 'Q8'"], header={"a": entry("Q8", [2], 0, 2)})
    add("sub-byte dtype", ValueError, ["tensor 'a'", "'F4'", "below a byte"], header={"a": entry("F4", [4], 0, 2)})
    add("byte count", ValueError, ["tensor 'a'", "12 bytes for 2 elements of F32"],
        header={"a": entry("F32", [2], 0, 12)})
    add("offsets out", ValueError, ["tensor 'a'", "outside the data section"], header={"a": entry("U8", [4], 14, 18)})
    add("bad shape", ValueError, ["tensor 'a'", "bad shape"], header={"a": entry("U8", [-1], 0, 1)})
    add("duplicate", ValueError, ["tensor 'a' appears twice"],
        header='{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
               '"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}')
    add("missing file", FileNotFoundError, ["cannot open"], path=tmp_path / "nope.safetensors")
    fifo = tmp_path / "fifo.safetensors"
    if hasattr(os, "mkfifo"):
        os.mkfifo(fifo)  # must not wait for a writer
        add("fifo", ValueError, ["not a regular file"], path=fifo)
    idx = lambda d: str(d / "model.safetensors.index.json")  # noqa: E731
    for name, exc, wm, parts in [
        ("missing shard", FileNotFoundError, {"a": "s1.safetensors", "b": "s9.safetensors"},
         ["shard 's9.safetensors' does not exist"]),
        ("escaping shard", ValueError, {"a": "s1.safetensors", "b": "../s2.safetensors"},
         ["shard '../s2.safetensors'", "tensor 'b'", "not a plain file name"]),
        ("absolute shard", ValueError, {"a": "s1.safetensors", "b": "/etc/passwd"}, ["not a plain file name"]),
        ("backslash shard", ValueError, {"a": "s1.safetensors", "b": "..\\s2.safetensors"}, ["not a plain file name"]),
        ("tensor missing from its shard", ValueError, {"a": "s1.safetensors", "b": "s2.safetensors",
                                                       "c": "s2.safetensors"},
         ["tensor 'c' is not in its shard 's2.safetensors'"]),
        ("bad index JSON", ValueError, '{"weight_map": {', ["JSON"]),
        ("no weight_map", ValueError, '{"metadata": {}}', ["'weight_map' must be an object"]),
    ]:
        sub = tmp_path / name.replace(" ", "_")
        sub.mkdir()
        d = shard_dir(sub, wm)
        cases.append((name, str(d), exc, [idx(d)] + parts))
    sub = tmp_path / "two_shards"
    sub.mkdir()
    d = shard_dir(sub, {"a": "s1.safetensors", "b": "s2.safetensors"},
                  {"s1.safetensors": ["a"], "s2.safetensors": ["b", "a"]})
    cases.append(("tensor in two shards", str(d), ValueError,
                  [idx(d), "shards disagree with the index", "tensor 'a'", "'s2.safetensors'"]))
    sub = tmp_path / "bad_shard"
    sub.mkdir()
    d = shard_dir(sub, {"a": "s1.safetensors", "b": "s2.safetensors"})
    (d / "s2.safetensors").write_bytes(raw[:20])
    cases.append(("broken shard", str(d), ValueError, [str(d / "s2.safetensors"), "runs past the end"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append(("empty directory", str(empty), FileNotFoundError,
                  [f"{empty}: no model.safetensors or model.safetensors.index.json"]))
    return cases


def test_nul_in_path_is_an_error(tmp_path):
    path = write_raw(tmp_path / "a.safetensors", {"a": entry("U8", [1], 0, 1)}, b"\x01")
    with pytest.raises(ValueError, match="NUL byte"):
        open_safetensors(path + "\0.junk")


def test_malformed_inputs_raise_naming_the_file_and_tensor(tmp_path):
    cases = malformed_cases(tmp_path)
    assert len(cases) >= 20
    for name, path, exc, parts in cases:
        with pytest.raises(exc) as info:
            open_safetensors(path)
        assert info.type is exc, name  # FileNotFoundError is no ValueError, nor the reverse
        msg = str(info.value)
        assert msg.startswith(parts[0]), (name, msg)
        for part in parts[1:]:
            assert part in msg, (name, part, msg)


# ------------------------------------------------------------------------------------------------- memory (RSS)

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
def test_opening_a_large_file_reads_only_the_header(tmp_path):
    """A ~200 MB float32 file: opening and viewing it must not raise the peak RSS (only the header is read);
    touching every value raises it by about the file's size (the mapped pages), never by a copy's."""
    n = 50 * 2**20  # floats: 200 MiB
    path = tmp_path / "big.safetensors"
    chunk = np.full(2**18, 0.5, dtype="<f4").tobytes()  # 1 MiB
    with open(path, "wb") as f:
        raw = json.dumps({"w": entry("F32", [n], 0, 4 * n)}).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _ in range(4 * n // len(chunk)):
            f.write(chunk)
    size = path.stat().st_size
    script = textwrap.dedent(f"""
        import json, resource
        import numpy as np
        from cpuformer.io import open_safetensors
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        before = peak()
        m = open_safetensors({str(path)!r})
        w = m.tensor("w")
        opened = peak()
        total = float(w.sum(dtype=np.float64))
        touched = peak()
        print(json.dumps([before, opened, touched, total, w.shape[0], bool(w.flags.owndata)]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    before, opened, touched, total, count, owndata = json.loads(out.stdout.strip().splitlines()[-1])
    assert count == n and not owndata and total == 0.5 * n
    assert opened - before < 0.05 * size, f"open raised the peak RSS by {(opened - before) / 2**20:.1f} MiB"
    assert touched - before < 1.1 * size, f"reading raised the peak RSS by {(touched - before) / 2**20:.1f} MiB"


def test_open_safetensors_is_exported():
    import cpuformer.io

    assert "open_safetensors" in cpuformer.io.__all__
    assert cpuformer.io.open_safetensors.__doc__
