"""Training-step speed and memory: a cpuformer GPT beside the same model in PyTorch eager (fp32, AdamW, same
threads), measured in one run. PyTorch's AdamW is its fused CPU kernel (fused=True; its default on CPU is a slower
per-tensor loop).

Usage: python benchmarks/bench_train.py [--threads 2] [--quick]
Configurations: GPT vocab 4096, T=128, B=8, 4 layers, 4 heads, 256 channels; a Llama-style decoder of the same
size (RMSNorm, rotary, SwiGLU 704, grouped-query attention with 1 key/value head for 4 query heads, no biases,
untied head; PyTorch side written here with torch.nn.functional.scaled_dot_product_attention); GPT-2-small-shaped
(12 layers, 12 heads, 768 channels, vocab 50304, T=64, B=4). Prints ms per training step (forward, cross-entropy, backward,
AdamW), tokens/s, and the peak RSS growth of the first step in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--quick", action="store_true", help="a tiny configuration only (smoke test)")
args = parser.parse_args()

CONFIGS = [dict(name="GPT 4x256, vocab 4096, T=128, B=8", vocab=4096, T=128, B=8, L=4, H=4, C=256),
           dict(name="Llama-style 4x256 (GQA 4:1), vocab 4096, T=128, B=8", vocab=4096, T=128, B=8, L=4, H=4,
                C=256, arch="llama", KVH=1, F=704),
           dict(name="GPT-2 small shape, vocab 50304, T=64, B=4", vocab=50304, T=64, B=4, L=12, H=12, C=768)]
if args.quick:
    CONFIGS = [dict(name="tiny GPT 2x64, vocab 512, T=32, B=4", vocab=512, T=32, B=4, L=2, H=2, C=64),
               dict(name="tiny Llama-style 2x64, vocab 512, T=32, B=4", vocab=512, T=32, B=4, L=2, H=4, C=64,
                    arch="llama", KVH=1, F=192)]

# One script, run in a fresh process per (library, config): builds the model, times steps or measures memory.
STEP = r"""
import json, sys, time
import numpy as np
lib, mode, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = json.loads(sys.argv[4])
V, T, B, L, H, C = (cfg[k] for k in ("vocab", "T", "B", "L", "H", "C"))
rng = np.random.default_rng(0)
x = rng.integers(0, V, size=(B, T))
y = rng.integers(0, V, size=(B, T))
llama = cfg.get("arch") == "llama"
if lib == "torch" and llama:
    import torch
    import torch.nn.functional as tf
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    KVH, F, D = cfg["KVH"], cfg["F"], C // H

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2 = torch.nn.RMSNorm(C, eps=1e-6), torch.nn.RMSNorm(C, eps=1e-6)
            self.q = torch.nn.Linear(C, C, bias=False)
            self.k = torch.nn.Linear(C, KVH * D, bias=False)
            self.v = torch.nn.Linear(C, KVH * D, bias=False)
            self.o = torch.nn.Linear(C, C, bias=False)
            self.gate = torch.nn.Linear(C, F, bias=False)
            self.up = torch.nn.Linear(C, F, bias=False)
            self.down = torch.nn.Linear(F, C, bias=False)

        def forward(self, x, cos, sin):
            def rope(t):  # (B, heads, T, D), half-rotation layout
                a, b = t[..., : D // 2], t[..., D // 2:]
                return t * cos + torch.cat([-b, a], -1) * sin
            h = self.n1(x)
            q = rope(self.q(h).view(B, T, H, D).transpose(1, 2))
            k = rope(self.k(h).view(B, T, KVH, D).transpose(1, 2))
            v = self.v(h).view(B, T, KVH, D).transpose(1, 2)
            a = tf.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.o(a.transpose(1, 2).reshape(B, T, C))
            h = self.n2(x)
            return x + self.down(tf.silu(self.gate(h)) * self.up(h))

    class TorchLlama(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(V, C)
            self.blocks = torch.nn.ModuleList(Block() for _ in range(L))
            self.norm = torch.nn.RMSNorm(C, eps=1e-6)
            self.head = torch.nn.Linear(C, V, bias=False)
            inv = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
            ang = torch.arange(T).float()[:, None] * inv
            self.cos, self.sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

        def forward(self, ids):
            h = self.wte(ids)
            for blk in self.blocks:
                h = blk(h, self.cos, self.sin)
            return self.head(self.norm(h))

    model = TorchLlama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # torch's fastest AdamW on CPU
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        logits = model(xt)
        loss = tf.cross_entropy(logits.reshape(-1, V), yt.reshape(-1))
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
elif lib == "torch":
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    class TorchGPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(V, C)
            self.wpe = torch.nn.Embedding(T, C)
            self.blocks = torch.nn.ModuleList(torch.nn.TransformerEncoderLayer(
                C, H, 4 * C, dropout=0.0, activation="gelu", batch_first=True, norm_first=True) for _ in range(L))
            self.ln_f = torch.nn.LayerNorm(C)
            self.mask = torch.nn.Transformer.generate_square_subsequent_mask(T)

        def forward(self, ids):
            h = self.wte(ids) + self.wpe.weight[: ids.shape[1]]
            for blk in self.blocks:
                h = blk(h, src_mask=self.mask, is_causal=True)
            return self.ln_f(h) @ self.wte.weight.T  # tied head

    model = TorchGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # torch's fastest AdamW on CPU
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        logits = model(xt)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), yt.reshape(-1))
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
else:
    import cpuformer
    from cpuformer.models import GPT
    from cpuformer.train import AdamW, CrossEntropyLoss
    cpuformer.set_num_threads(threads)
    if llama:
        model = GPT(V, T, L, H, C, norm="rms_norm", positional="rotary", activation="silu", gated=True, bias=False,
                    tie_weights=False, n_kv_head=cfg["KVH"], d_ff=cfg["F"], layer_norm_eps=1e-6)
    else:
        model = GPT(V, T, L, H, C)
    opt = AdamW(model, lr=1e-4)
    loss_fn = CrossEntropyLoss()

    def step():
        logits = model(x)
        loss, grad, _ = loss_fn(logits, y)
        model.backward(grad)
        opt.step()
        model.zero_grad()

if mode == "memory":
    import resource
    sys.path.insert(0, sys.argv[5])
    from _timing import peak_rss_growth_mib
    growth = peak_rss_growth_mib(step)
    # torch allocates gradients and Adam moments inside the first step, cpuformer at setup: the whole process's
    # peak (libraries, weights, gradients, moments, activations) is the comparable figure.
    print(json.dumps([growth, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))
else:
    step()
    step()
    times = []
    for _ in range(int(cfg["reps"])):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps(times))
"""


def run(lib: str, mode: str, cfg: dict):
    out = subprocess.run([sys.executable, "-c", STEP, lib, mode, str(args.threads), json.dumps(cfg),
                          os.path.dirname(os.path.abspath(__file__))], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{lib} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


sys.path.insert(0, os.path.dirname(__file__))
from _timing import loadavg  # noqa: E402

import cpuformer  # noqa: E402

print(f"cpuformer {cpuformer.__version__} ({cpuformer.build_info()['simd']}); threads {args.threads}; "
      f"loadavg {loadavg()}")
print(f"{'configuration':<52}{'cpuformer ms':>13}{'torch ms':>10}{'ratio':>7}{'cpf tok/s':>11}{'torch tok/s':>12}"
      f"{'cpf peak MB':>13}{'torch peak MB':>15}")
for cfg in CONFIGS:
    cfg = dict(cfg, reps=3 if cfg["C"] >= 768 else 6)
    # alternate the libraries over rounds (each round a fresh process) and keep each library's median step
    times = {"cpuformer": [], "torch": []}
    for r in range(2 if args.quick else 3):
        for lib in (("cpuformer", "torch") if r % 2 == 0 else ("torch", "cpuformer")):
            times[lib] += run(lib, "time", cfg)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    mem = {lib: run(lib, "memory", cfg) for lib in ("cpuformer", "torch")}
    tokens = cfg["B"] * cfg["T"]
    print(f"{cfg['name']:<52}{med['cpuformer'] * 1e3:>13.0f}{med['torch'] * 1e3:>10.0f}"
          f"{med['cpuformer'] / med['torch']:>7.2f}{tokens / med['cpuformer']:>11.0f}{tokens / med['torch']:>12.0f}"
          f"{mem['cpuformer'][1]:>13.0f}{mem['torch'][1]:>15.0f}", flush=True)
print("ms per step: median over all timed steps (fresh processes, libraries alternating); peak MB: the process's "
      "peak RSS after one step (libraries, weights, gradients, optimizer state, activations)")
