"""Transformer layers: cpuformer beside PyTorch (torch.nn.functional.scaled_dot_product_attention,
torch.nn.Linear/FFN, torch.nn.TransformerEncoderLayer), measured in one run.

Usage: python benchmarks/bench_layers.py [--threads 2] [--quick]
Rows: attention forward and forward+backward for (B=8,T=128,C=256,H=4), (B=4,T=512,C=512,H=8),
(B=1,T=2048,C=768,H=12), causal and not; the feed-forward; a whole encoder layer forward+backward; and the peak
memory (RSS growth in a fresh process) of the encoder layer's forward+backward. Times are milliseconds; ratio =
cpuformer / torch (below 1 is faster).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--quick", action="store_true", help="first configuration only, fewer rounds")
args = parser.parse_args()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS is not used in the timed paths

import numpy as np  # noqa: E402

import cpuformer  # noqa: E402
import cpuformer.nn as cnn  # noqa: E402
from cpuformer import ops  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import statistics  # noqa: E402

from _timing import compare_rounds, paired_ratio, threads_line  # noqa: E402

try:
    import torch
except ImportError:
    sys.exit("bench_layers.py compares against torch: pip install torch==2.13.0")

torch.set_num_threads(args.threads)
cpuformer.set_num_threads(args.threads)
rng = np.random.default_rng(0)
ROUNDS = 3 if args.quick else 7
CONFIGS = [(8, 128, 256, 4), (4, 512, 512, 8), (1, 2048, 768, 12)]
if args.quick:
    CONFIGS = CONFIGS[:1]

print(f"cpuformer {cpuformer.__version__} ({cpuformer.build_info()['simd']}), torch {torch.__version__}")
print(threads_line(args.threads))
rows = []


cpu_rows = []


def measure_cpu(name, ours, theirs):
    """Single-thread CPU time (process_time) of both, interleaved rounds: other tenants taking the cores do not
    enter it, so these ratios hold still where the 2-thread wall-clock rows swing."""
    cpuformer.set_num_threads(1)
    torch.set_num_threads(1)
    try:
        t = compare_rounds({"ours": ours, "torch": theirs}, rounds=ROUNDS, pause=0.05, clock=time.process_time)
    finally:
        cpuformer.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    cpu_rows.append((name, statistics.median(t["ours"]) * 1e3, statistics.median(t["torch"]) * 1e3,
                     paired_ratio(t, "ours", "torch")))


def ours_step(layer, x, g):
    """One forward+backward of a cpuformer layer."""
    def step():
        layer(x)
        return layer.backward(g)
    return step


def torch_step(module, x, g):
    """One forward+backward of a torch module, the input requiring grad (as ours returns d_input)."""
    xg = x.clone().requires_grad_(True)

    def step():
        xg.grad = None
        module(xg).backward(g)
    return step


def measure(name, ours, theirs):
    """Interleaved rounds of both; the row shows each side's median time and the median of the per-round
    ratios (see _timing.paired_ratio)."""
    t = compare_rounds({"ours": ours, "torch": theirs}, rounds=ROUNDS)
    t_ours, t_torch = statistics.median(t["ours"]), statistics.median(t["torch"])
    ratio = paired_ratio(t, "ours", "torch")
    rows.append((name, t_ours * 1e3, t_torch * 1e3, ratio))
    print(f"{name:<52}{t_ours * 1e3:>11.2f}{t_torch * 1e3:>11.2f}{ratio:>8.2f}", flush=True)


print(f"{'case':<52}{'cpuformer':>11}{'torch':>11}{'ratio':>8}")
print("-" * 82)

# ---- attention kernels -------------------------------------------------------------------------------------------
for B, T, C, H in CONFIGS:
    D = C // H
    q, k, v, g = (rng.standard_normal((B, T, C)).astype(np.float32) for _ in range(4))
    qt, kt, vt, gt = (torch.from_numpy(a).view(B, T, H, D).transpose(1, 2).contiguous() for a in (q, k, v, g))
    qg, kg, vg = (x.clone().requires_grad_(True) for x in (qt, kt, vt))
    for causal in (False, True):
        tag = f"B={B} T={T} C={C} H={H}{' causal' if causal else ''}"

        def ours_fwd():
            return ops.attention(q, k, v, H, is_causal=causal)

        def torch_fwd():
            with torch.no_grad():
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

        measure(f"attention fwd {tag}", ours_fwd, torch_fwd)

        def ours_fb():
            out, lse = ops.attention(q, k, v, H, is_causal=causal, need_lse=True)
            return ops.attention_backward(g, q, k, v, out, lse, H, is_causal=causal)

        def torch_fb():
            for x in (qg, kg, vg):
                x.grad = None
            torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=causal).backward(gt)

        measure(f"attention fwd+bwd {tag}", ours_fb, torch_fb)

# ---- feed-forward and encoder layer ------------------------------------------------------------------------------
LAYER_CONFIGS = [(8, 128, 256, 4, 1024), (4, 512, 512, 8, 2048)]
if args.quick:
    LAYER_CONFIGS = LAYER_CONFIGS[:1]
for B, T, C, H, F in LAYER_CONFIGS:
    x = rng.standard_normal((B, T, C)).astype(np.float32)
    g = rng.standard_normal((B, T, C)).astype(np.float32)
    xt, gt = torch.from_numpy(x), torch.from_numpy(g)

    ff_t = torch.nn.Sequential(torch.nn.Linear(C, F), torch.nn.GELU(), torch.nn.Linear(F, C))
    ff_o = cnn.FeedForward(C, F, activation="gelu")
    sd = ff_t.state_dict()
    ff_o.load_state_dict({"linear1.weight": sd["0.weight"], "linear1.bias": sd["0.bias"],
                          "linear2.weight": sd["2.weight"], "linear2.bias": sd["2.bias"]})
    ff_ours, ff_torch = ours_step(ff_o, x, g), torch_step(ff_t, xt, gt)
    measure(f"feed-forward fwd+bwd B={B} T={T} C={C} F={F} gelu", ff_ours, ff_torch)

    enc_t = torch.nn.TransformerEncoderLayer(C, H, F, dropout=0.0, batch_first=True)
    enc_o = cnn.TransformerEncoderLayer(C, H, F, dropout=0.0)
    enc_o.load_state_dict(enc_t.state_dict())

    def enc_ours_fwd():
        return enc_o(x)

    def enc_torch_fwd():
        with torch.no_grad():
            return enc_t(xt)

    enc_t.eval()
    enc_o.eval()
    measure(f"encoder layer fwd (eval) B={B} T={T} C={C} H={H}", enc_ours_fwd, enc_torch_fwd)
    # inference deployments: weights packed once (cpuformer.freeze) against torch's no-grad fast path
    enc_frozen = cnn.freeze(enc_o)
    # the same products (AMX tiles split once, from 128 rows, where float32 weights may take the AVX-512 kernel)
    ref_o = enc_o(x)
    assert np.abs(enc_frozen(x) - ref_o).max() <= 1e-5 * np.abs(ref_o).max()
    measure(f"encoder layer fwd (eval, frozen) B={B} T={T} C={C} H={H}", lambda: enc_frozen(x), enc_torch_fwd)
    enc_t.train()
    enc_o.train()
    enc_ours, enc_torch = ours_step(enc_o, x, g), torch_step(enc_t, xt, gt)
    measure(f"encoder layer fwd+bwd B={B} T={T} C={C} H={H}", enc_ours, enc_torch)
    if (B, T) == LAYER_CONFIGS[0][:2]:  # calibration: torch against a copy of itself, measured the same way
        measure(f"calibration: torch vs torch, encoder fwd+bwd B={B} T={T}",
                torch_step(copy.deepcopy(enc_t), xt, gt), enc_torch)

    measure_cpu(f"feed-forward fwd+bwd B={B} T={T} C={C} F={F} gelu", ff_ours, ff_torch)
    measure_cpu(f"encoder layer fwd+bwd B={B} T={T} C={C} H={H}", enc_ours, enc_torch)
    enc_t.eval()
    enc_o.eval()
    measure_cpu(f"encoder layer fwd (eval) B={B} T={T} C={C} H={H}", enc_ours_fwd, enc_torch_fwd)
    measure_cpu(f"encoder layer fwd (eval, frozen) B={B} T={T} C={C} H={H}", lambda: enc_frozen(x), enc_torch_fwd)
    enc_t.train()
    enc_o.train()

# ---- peak memory: RSS growth of one forward+backward over the RSS after import and setup, sampled every 0.5 ms -----
MEM = r"""
import json, sys, numpy as np
sys.path.insert(0, sys.argv[8])
from _timing import peak_rss_growth_mib
lib, B, T, C, H, F, threads = sys.argv[1], *map(int, sys.argv[2:8])
x = np.random.default_rng(0).standard_normal((B, T, C)).astype(np.float32)
if lib == "torch":
    import torch
    torch.set_num_threads(threads)
    layer = torch.nn.TransformerEncoderLayer(C, H, F, dropout=0.0, batch_first=True)
    xt = torch.from_numpy(x).requires_grad_(True)
    step = lambda: layer(xt).backward(torch.ones_like(xt))
else:
    import cpuformer, cpuformer.nn as nn
    cpuformer.set_num_threads(threads)
    layer = nn.TransformerEncoderLayer(C, H, F, dropout=0.0)
    step = lambda: layer.backward(np.ones_like(layer(x)))
# No warm-up: memory freed by a previous step stays resident for reuse (numpy's malloc, torch's allocator), so the
# peak of a first step above the RSS after setup is the comparable figure (each side's one-time pools included).
print(json.dumps(peak_rss_growth_mib(step)))
"""
for B, T, C, H, F in LAYER_CONFIGS:
    mib = {}
    for lib in ("cpuformer", "torch"):
        out = subprocess.run([sys.executable, "-c", MEM, lib, str(B), str(T), str(C), str(H), str(F),
                              str(args.threads), os.path.dirname(os.path.abspath(__file__))],
                             capture_output=True, text=True, check=True)
        mib[lib] = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append((f"peak RSS growth, encoder fwd+bwd B={B} T={T} C={C}", mib["cpuformer"], mib["torch"],
                 mib["cpuformer"] / mib["torch"]))
    print(f"{rows[-1][0]:<52}{mib['cpuformer']:>9.1f}MB{mib['torch']:>9.1f}MB{rows[-1][3]:>8.2f}", flush=True)
print("single-thread CPU time (1 thread each, process_time; robust to other tenants):")
for name, a, b, r in cpu_rows:
    print(f"{name:<52}{a:>11.2f}{b:>11.2f}{r:>8.2f}")
print(f"times in ms: median over {ROUNDS} interleaved rounds of the best of 3 samples; ratio = median over rounds of "
      "cpuformer / torch; the calibration row times torch against itself the same way (the method's noise)")
