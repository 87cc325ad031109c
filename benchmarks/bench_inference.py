"""Inference: encoder latency/throughput and GPT-2 generation, cpuformer beside PyTorch eager (transformers'
models; onnxruntime too when installed), measured in one run.

Usage: python benchmarks/bench_inference.py [--threads 2] [--quick]
Rows: a BERT-base-shaped and a MiniLM-shaped encoder (random weights, the same in every library) at batch 1 and 32,
T=128: ms per batch and sequences/s; GPT-2-small-shaped greedy generation of 128 tokens after a 16-token prompt
(transformers with its KV cache). Each row has cpuformer float32, float32 with weights packed once (cpuformer.freeze)
and int8 (cpuformer.quantize_dynamic), PyTorch
eager float32 and int8 (torch.ao.quantization.quantize_dynamic on nn.Linear), and onnxruntime float32; a second table
gives int8's accuracy cost against float32. Needs torch and transformers (test-only dependencies).
"""
from __future__ import annotations

import argparse
import warnings
import os
import sys

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--quick", action="store_true", help="MiniLM at batch 1 and 32 new tokens only (smoke test)")
args = parser.parse_args()
warnings.filterwarnings("ignore")  # torch.ao.quantization prints deprecation notices; the API still works

import numpy as np  # noqa: E402

import cpuformer  # noqa: E402
from cpuformer.models import GPT, BertModel  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _timing import compare, loadavg  # noqa: E402

try:
    import torch
    import transformers
except ImportError:
    sys.exit("bench_inference.py compares against torch + transformers: pip install torch==2.13.0 transformers")
try:
    import onnxruntime  # noqa: F401  (optional: not installed on the development machine)
except ImportError:
    onnxruntime = None



def bert_state(w: dict, n_layers: int) -> dict:
    """transformers' BertModel state dict (numpy) under cpuformer.models.BertModel's names (q, k, v fused)."""
    sd = {"word_embeddings.weight": w["embeddings.word_embeddings.weight"],
          "position_embeddings.weight": w["embeddings.position_embeddings.weight"],
          "token_type_embeddings.weight": w["embeddings.token_type_embeddings.weight"],
          "embeddings_norm.weight": w["embeddings.LayerNorm.weight"],
          "embeddings_norm.bias": w["embeddings.LayerNorm.bias"]}
    for i in range(n_layers):
        h, o = f"encoder.layer.{i}.", f"layers.{i}."
        for part in ("weight", "bias"):
            sd[o + f"self_attn.in_proj_{part}"] = np.concatenate(
                [w[h + f"attention.self.{n}.{part}"] for n in ("query", "key", "value")])
        pairs = {"self_attn.out_proj": "attention.output.dense", "norm1": "attention.output.LayerNorm",
                 "linear1": "intermediate.dense", "linear2": "output.dense", "norm2": "output.LayerNorm"}
        for ours, theirs in pairs.items():
            for part in ("weight", "bias"):
                sd[f"{o}{ours}.{part}"] = w[f"{h}{theirs}.{part}"]
    return sd


def gpt2_state(w: dict, n_layers: int) -> dict:
    """transformers' GPT2LMHeadModel state dict (numpy) under cpuformer.models.GPT's names (Conv1D weights are
    stored (in, out): transposed to Linear's (out, in))."""
    w = {k.removeprefix("transformer."): v for k, v in w.items()}
    sd = {k: w[k] for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(n_layers):
        h, o = f"h.{i}.", f"blocks.{i}."
        for ours, theirs in (("self_attn.in_proj", "attn.c_attn"), ("self_attn.out_proj", "attn.c_proj"),
                             ("linear1", "mlp.c_fc"), ("linear2", "mlp.c_proj")):
            sd[o + ours + ("_weight" if ours.endswith("in_proj") else ".weight")] = \
                np.ascontiguousarray(w[h + theirs + ".weight"].T)
            sd[o + ours + ("_bias" if ours.endswith("in_proj") else ".bias")] = w[h + theirs + ".bias"]
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            for part in ("weight", "bias"):
                sd[f"{o}{ours}.{part}"] = w[f"{h}{theirs}.{part}"]
    return sd


def bert_onnx_session(state: dict, shape: dict, eps: float, threads: int):
    """The same encoder as an ONNX graph built with onnx.helper from our state dict (opset 17, ir_version 10: torch
    2.13's exporter fails on these layers here), run by onnxruntime with ``threads`` intra-op threads."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    H, L, heads = shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"]
    D = H // heads
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], **attrs))
        return name

    def linear(x, w, b, name):  # x @ w.T + b
        return node("Add", [node("MatMul", [x, const(name + ".wT", w.T)], name + ".mm"), const(name + ".b", b)], name)

    def layer_norm(x, w, b, name):
        return node("LayerNormalization", [x, const(name + ".g", w), const(name + ".beta", b)], name, axis=-1,
                    epsilon=eps)

    x = node("Gather", [const("word", state["word_embeddings.weight"]), "input_ids"], "emb_word")
    x = node("Add", [x, node("Gather", [const("pos", state["position_embeddings.weight"]), "position_ids"], "emb_pos")],
             "emb_sum")
    x = node("Add", [x, const("type0", state["token_type_embeddings.weight"][0])], "emb_all")
    x = layer_norm(x, state["embeddings_norm.weight"], state["embeddings_norm.bias"], "emb_ln")
    const("split", np.array([H, H, H], np.int64))
    const("heads_shape", np.array([0, 0, heads, D], np.int64))
    const("merge_shape", np.array([0, 0, H], np.int64))
    const("scale", np.array(1.0 / np.sqrt(D), np.float32))
    const("half", np.array(0.5, np.float32))
    const("one", np.array(1.0, np.float32))
    const("rsqrt2", np.array(1.0 / np.sqrt(2.0), np.float32))
    for i in range(L):
        p, n = f"layers.{i}.", f"l{i}"
        qkv = linear(x, state[p + "self_attn.in_proj_weight"], state[p + "self_attn.in_proj_bias"], n + ".qkv")
        nodes.append(helper.make_node("Split", [qkv, "split"], [n + ".q", n + ".k", n + ".v"], axis=-1))
        q = node("Transpose", [node("Reshape", [n + ".q", "heads_shape"], n + ".qr")], n + ".qt", perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [n + ".k", "heads_shape"], n + ".kr")], n + ".kt", perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [n + ".v", "heads_shape"], n + ".vr")], n + ".vt", perm=[0, 2, 1, 3])
        s_ = node("Mul", [node("MatMul", [q, k], n + ".qk"), "scale"], n + ".s")
        a = node("MatMul", [node("Softmax", [s_], n + ".p", axis=-1), v], n + ".pv")
        a = node("Reshape", [node("Transpose", [a], n + ".at", perm=[0, 2, 1, 3]), "merge_shape"], n + ".am")
        a = linear(a, state[p + "self_attn.out_proj.weight"], state[p + "self_attn.out_proj.bias"], n + ".o")
        x = layer_norm(node("Add", [x, a], n + ".r1"), state[p + "norm1.weight"], state[p + "norm1.bias"], n + ".ln1")
        u = linear(x, state[p + "linear1.weight"], state[p + "linear1.bias"], n + ".fc1")
        erf = node("Erf", [node("Mul", [u, "rsqrt2"], n + ".us")], n + ".erf")
        g = node("Mul", [node("Mul", [u, "half"], n + ".uh"), node("Add", [erf, "one"], n + ".e1")], n + ".gelu")
        f = linear(g, state[p + "linear2.weight"], state[p + "linear2.bias"], n + ".fc2")
        x = layer_norm(node("Add", [x, f], n + ".r2"), state[p + "norm2.weight"], state[p + "norm2.bias"], n + ".ln2")
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"]))
    graph = helper.make_graph(
        nodes, "bert", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"]),
                        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["T"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["B", "T", H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


torch.set_num_threads(args.threads)
cpuformer.set_num_threads(args.threads)
torch.manual_seed(0)
print(f"cpuformer {cpuformer.__version__} ({cpuformer.build_info()['simd']}), torch {torch.__version__}, "
      f"transformers {transformers.__version__}, onnxruntime "
      f"{'not installed' if onnxruntime is None else onnxruntime.__version__}; threads {args.threads}; "
      f"loadavg {loadavg()}")
HEADER = (f"{'case':<36}{'cpf fp32':>9}{'frozen':>9}{'int8':>9}{'torch':>8}{'tch int8':>9}{'ort':>8}"
          f"{'fp32/torch':>11}{'fp32/ort':>9}{'frozen/ort':>11}{'int8/tch8':>10}{'int8/fp32':>10}")
print(HEADER)
print("-" * len(HEADER))
ACCURACY = []


def torch_int8(module):
    """PyTorch's own dynamic int8 quantization of nn.Linear (fbgemm/x86 engine), or None where unavailable."""
    try:
        from torch.ao.quantization import quantize_dynamic
        return quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)
    except Exception as exc:  # noqa: BLE001 - an optional comparison column
        print(f"(torch int8 unavailable: {exc})")
        return None


def row(name, t, batch):
    def ms(key):
        return f"{t[key] * 1e3:>{9 if key != 'torch' and key != 'ort' else 8}.1f}" if key in t else \
            f"{'-':>{9 if key != 'torch' and key != 'ort' else 8}}"

    def ratio(a, b, width):
        return f"{t[a] / t[b]:>{width}.2f}" if a in t and b in t else f"{'-':>{width}}"
    print(f"{name:<36}{ms('ours')}{ms('frozen')}{ms('int8')}{ms('torch')}{ms('torch_int8')}{ms('ort')}"
          f"{ratio('ours', 'torch', 11)}{ratio('ours', 'ort', 9)}{ratio('frozen', 'ort', 11)}"
          f"{ratio('int8', 'torch_int8', 10)}"
          f"{ratio('int8', 'ours', 10)}", flush=True)

ENCODERS = [("MiniLM shape (6x384, 12 heads)", dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                     intermediate_size=1536)),
            ("BERT-base shape (12x768, 12 heads)", dict(hidden_size=768, num_hidden_layers=12,
                                                        num_attention_heads=12, intermediate_size=3072))]
if args.quick:
    ENCODERS = ENCODERS[:1]
rng = np.random.default_rng(0)
for name, shape in ENCODERS:
    cfg = transformers.BertConfig(vocab_size=30522, max_position_embeddings=512, **shape)
    hf = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ours = BertModel(30522, shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"],
                     shape["intermediate_size"], 512, 2, cfg.layer_norm_eps, "gelu", pooler=False)
    ours.load_state_dict(bert_state({k: v.numpy() for k, v in hf.state_dict().items()},
                                    shape["num_hidden_layers"]))
    ort = bert_onnx_session(ours.state_dict(), shape, cfg.layer_norm_eps, args.threads) if onnxruntime else None
    ours.eval()
    ours_int8 = cpuformer.quantize_dynamic(ours)
    ours_frozen = cpuformer.freeze(ours)
    hf_int8 = torch_int8(hf)
    for batch in ((1,) if args.quick else (1, 32)):
        ids = rng.integers(1000, 30000, size=(batch, 128))
        mask = np.ones_like(ids)
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)

        def run_torch():
            with torch.no_grad():
                return hf(input_ids=ids_t, attention_mask=mask_t).last_hidden_state

        ref = run_torch().numpy()
        got = ours(ids, attention_mask=mask)
        # frozen weights run the AMX tiles from 128 rows (split once) where float32 ones may take the AVX-512 kernel
        assert np.abs(ours_frozen(ids, attention_mask=mask) - got).max() <= 1e-5 * np.abs(got).max(), "freeze changed the result"
        assert np.abs(got - ref).max() < 1e-3, "cpuformer and torch disagree"
        def run_ours():
            with cpuformer.no_grad():  # as torch.no_grad() below: nothing kept for a backward
                return ours(ids, attention_mask=mask)

        fns = {"ours": run_ours, "frozen": lambda: ours_frozen(ids, attention_mask=mask),
               "int8": lambda: ours_int8(ids, attention_mask=mask),
               "torch": run_torch}
        if hf_int8 is not None:
            def run_torch_int8():
                with torch.no_grad():
                    return hf_int8(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
            fns["torch_int8"] = run_torch_int8
        if batch == (1 if args.quick else 32):  # accuracy cost of int8, against each library's float32
            q = ours_int8(ids, attention_mask=mask)
            emb, qemb = got.mean(axis=1), q.mean(axis=1)
            cos = (emb * qemb).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(qemb, axis=1)
            acc = [name, np.abs(q - got).max() / np.abs(got).max(), cos.min()]
            if hf_int8 is not None:
                tq = run_torch_int8().numpy()
                temb = tq.mean(axis=1)
                tcos = (emb * temb).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(temb, axis=1)
                acc += [np.abs(tq - ref).max() / np.abs(ref).max(), tcos.min()]
            ACCURACY.append(acc)
        if ort is not None:
            feeds = {"input_ids": ids, "position_ids": np.arange(128, dtype=np.int64)}
            assert np.abs(ort.run(None, feeds)[0] - ref).max() < 1e-3, "onnxruntime and torch disagree"
            fns["ort"] = lambda: ort.run(None, feeds)
        big = batch * shape["hidden_size"] >= 32 * 768
        t = compare(fns, rounds=3, reps=1 if big else 3)
        row(name.split(" (")[0] + f", B={batch}, T=128", t, batch)

new_tokens = 32 if args.quick else 128
cfg = transformers.GPT2Config()
hf = transformers.GPT2LMHeadModel(cfg).eval()
gpt = GPT(cfg.vocab_size, cfg.n_positions, cfg.n_layer, cfg.n_head, cfg.n_embd, 0.0, "learned", True, "gelu_tanh",
          cfg.layer_norm_epsilon)
gpt.load_state_dict(gpt2_state({k: v.numpy() for k, v in hf.state_dict().items()}, cfg.n_layer))
prompt = rng.integers(0, cfg.vocab_size, size=(1, 16))


def gen_torch():
    with torch.no_grad():
        return hf.generate(torch.tensor(prompt), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                           use_cache=True)


assert (gpt.generate(prompt, new_tokens, greedy=True) == gen_torch().numpy()).all(), "different continuations"
gpt.eval()
gpt_int8 = cpuformer.quantize_dynamic(gpt)
gpt_frozen = cpuformer.freeze(gpt)
fns = {"ours": lambda: gpt.generate(prompt, new_tokens, greedy=True),
       "frozen": lambda: gpt_frozen.generate(prompt, new_tokens, greedy=True),
       "int8": lambda: gpt_int8.generate(prompt, new_tokens, greedy=True), "torch": gen_torch}
t = compare(fns, rounds=3, reps=1, min_sample_s=0.0)
row(f"GPT-2 small greedy, {new_tokens} tokens", t, new_tokens)
print("ms: median over rounds (libraries interleaved). cpf fp32 = cpuformer float32; frozen = the same with weights "
      "packed once (cpuformer.freeze); int8 = cpuformer.quantize_dynamic; tch = torch; ort = onnxruntime (float32). "
      "Ratios are time ratios (< 1: the first is faster).")

seq = rng.integers(0, cfg.vocab_size, size=(4, 128))
logits, qlogits = gpt(seq), gpt_int8(seq)
agree = (logits.argmax(-1) == qlogits.argmax(-1)).mean()
print(f"\nint8 accuracy cost against float32 (random weights, so top-1 margins are small: a lower bound on agreement)")
print(f"{'model':<40}{'cpf max rel err':>16}{'cpf min cos':>12}{'torch max rel err':>18}{'torch min cos':>14}")
for acc in ACCURACY:
    extra = f"{acc[3]:>18.4f}{acc[4]:>14.6f}" if len(acc) > 3 else f"{'-':>18}{'-':>14}"
    print(f"{acc[0]:<40}{acc[1]:>16.4f}{acc[2]:>12.6f}{extra}")
print("(hidden states at B=32, T=128: max abs error / max abs value; cosine similarity of mean-pooled embeddings, "
      "worst sequence)")
print(f"GPT-2 small: next-token top-1 agreement int8 vs float32 over 4x128 positions: {agree:.3f}; "
      f"logits max rel err {np.abs(qlogits - logits).max() / np.abs(logits).max():.4f}")
