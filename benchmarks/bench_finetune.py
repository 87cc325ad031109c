"""Fine-tuning steps of Hugging Face models loaded by cpuformer.models.from_pretrained, beside PyTorch+transformers
and PyTorch+PEFT on the same weights (issue 17).

Usage: python benchmarks/bench_finetune.py [--threads 2] [--rounds 7] [--quick] [--only minilm|lora]
                                           [--decoder-layers 24] [--dropout] [--no-full-ft-memory] [--cache DIR]
Models: random weights at real shapes, built locally with transformers from a config and written with
save_pretrained (safetensors, float32) into --cache (default ~/.cache/cpuformer-bench; nothing is downloaded), reused
by later runs.
Sections:
  minilm  one full fine-tuning step (forward, loss, backward, AdamW update, zero_grad) of a MiniLM-shaped BERT
          sequence classifier (hidden 384, 6 layers, 12 heads, intermediate 1536, vocab 30522, 2 labels; the head is
          in the checkpoint, so both engines start from the same weights), batch 32, T=64, cross-entropy on random
          labels: cpuformer (from_pretrained(dir, trainable=True, task="text-classification", num_labels=2),
          requires_grad_(True), cpuformer.train.AdamW), the same with recompute (gradient_checkpointing), and
          transformers' BertForSequenceClassification with torch.optim.AdamW(fused=True) (transformers'
          Trainer default).
  lora    one LoRA step (r=8, alpha=16, no LoRA dropout, targets q_proj, k_proj, v_proj, o_proj; frozen base,
          adapters trainable) of a Qwen2-0.5B-shaped decoder (hidden 896, --decoder-layers 24, 14 heads, 2 KV heads,
          intermediate 4864, vocab 151936, tied embeddings; float32 weights on disk), batch 4, T=256, causal-LM loss
          (labels = input ids, shifted): cpuformer (from_pretrained(dir, dtype="float32"): the base memory-mapped,
          cpuformer.nn.lora.add_lora, AdamW over the adapters), the same with recompute, and PEFT (get_peft_model
          with the same LoraConfig on transformers' Qwen2ForCausalLM, fused torch AdamW over the adapters); peak RSS
          of each. Then, alone (not interleaved; only if it fits comfortably in memory), the peak RSS of cpuformer
          full fine-tuning of the same decoder (trainable=True, requires_grad_(True)).
A step is exactly the same in every engine: one forward in training mode, the loss, one backward, one AdamW update
(lr 2e-5 full / 1e-4 LoRA, weight decay 0.01, no gradient clipping, no schedule), gradients zeroed. Dropout is off
in both engines unless --dropout (then the config's 0.1 in both: cpuformer train_dropout, transformers' modules in
train()). transformers uses its default attention (sdpa).
Every engine/variant runs in its own fresh subprocess (its RSS is its own; no engine's thread pool or allocator
shares a process with another's); the parent interleaves them round by round (rotating the order, pausing before
each switch; one step per sample, as a step lasts far longer than the timer's resolution; median over rounds: the
protocol of benchmarks/_timing.py and benchmarks/bench_pretrained.py). The first step (a warm-up: first touch of
mapped weights and buffers, thread pools) is not timed. Each table has a calibration row: numpy float32 matmul
GFLOP/s, timed in its own subprocess inside the same rounds, so a drifting machine shows up there.
Memory: peak RSS = peak-RSS (VmHWM) growth over the worker's baseline after its imports, read after the warm-up and the
timed steps (it includes the weights: for cpuformer's memory-mapped base those are file pages, shared with the page
cache, counted once touched). The workers of a section are alive together (the lora section holds about 3 copies
of the 2 GB decoder plus activations); the full fine-tuning memory row runs after they exit.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _timing import loadavg, paired_ratio, peak_rss_kib  # noqa: E402
from bench_pretrained import (CALIB_N, Worker, EMBED_SHAPES, QUICK as PRETRAINED_QUICK, QWEN2_05B, _digest,  # noqa: E402
                              available, build_dir, fmt_ms, kib_to_mib, set_threads, statm_mib)

# ------------------------------------------------------------------------------------------------ configuration

MINILM = dict(EMBED_SHAPES["MiniLM"], num_labels=2)
LORA = dict(r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
QUICK = {
    "minilm": dict(PRETRAINED_QUICK["embed"]["tiny-BERT"], num_labels=2),
    "decoder": dict(PRETRAINED_QUICK["decoder"]),
}
GOALS = {"minilm_time": 0.8, "lora_time": 0.8, "lora_memory": 0.6}


def build_seqcls_dir(cache: str, fields: dict) -> str:
    """A BertForSequenceClassification directory with random weights (seed 0), head included, made once."""
    out = os.path.join(cache, f"bert-seqcls-{_digest([fields, 'float32'])}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import torch
    import transformers
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**fields)).eval()
    tmp = out + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, out)
    print(f"  built bert-seqcls {out} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return out


# ------------------------------------------------------------------------------------ engines (in the workers)

def load_engine(spec: dict):
    """Import the engine's libraries (before the RSS baseline); return (load(), step_of(model, case)), where
    step_of returns a function doing one optimizer step and returning its loss (a float)."""
    eng, section, threads = spec["engine"], spec["section"], spec["threads"]
    lib = eng.split("-")[0]
    if lib == "calib":
        import numpy as np
        n = spec["calib_n"]
        a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
        return (lambda: None), (lambda model, case: (lambda: (a @ a, 0.0)[1]))
    import numpy as np
    dropout = spec["dropout"]
    if lib == "cpf":
        import cpuformer
        from cpuformer.models import from_pretrained
        from cpuformer.nn import init, lora
        from cpuformer.train import AdamW, CausalLMLoss, CrossEntropyLoss
        cpuformer.set_num_threads(threads)
        variant = eng.split("-", 1)[1]  # full, full-recompute, lora, lora-recompute

        def load():
            init.manual_seed(0)
            if section == "minilm":
                m = from_pretrained(spec["dir"], trainable=True, task="text-classification", num_labels=2,
                                    verbose=False)
            elif variant.startswith("full"):
                m = from_pretrained(spec["dir"], dtype="float32", trainable=True)
            else:  # a memory-mapped float32 base, frozen; the adapters are the only parameters
                m = from_pretrained(spec["dir"], dtype="float32")
                lora.add_lora(m, r=LORA["r"], alpha=LORA["alpha"], target_modules=LORA["targets"],
                              modules_to_save=[])
            if variant.startswith("full"):
                m.requires_grad_(True)
            m.gradient_checkpointing = variant.endswith("recompute")
            m.train_dropout = dropout
            m.train()
            m.optimizer = AdamW(m, lr=2e-5 if variant.startswith("full") else 1e-4, weight_decay=0.01)
            return m

        def step_of(m, c):
            ids = np.array(c["ids"], np.int64)
            mask = np.ones_like(ids)
            if section == "minilm":
                types, y, loss_fn = np.zeros_like(ids), np.array(c["labels"], np.int64), CrossEntropyLoss()

                def step():
                    out = m(ids, mask, types)
                    loss, grad, _ = loss_fn(out, y)
                    m.backward(grad)
                    m.optimizer.step()
                    m.zero_grad()
                    return float(loss)
                return step
            loss_fn = CausalLMLoss()

            def step():
                out = m(ids, mask)
                loss, grad, _ = loss_fn(out, ids)  # the gradient overwrites the logits (no second V-sized buffer)
                m.backward(grad)
                m.optimizer.step()
                m.zero_grad()
                return float(loss)
            return step
        return load, step_of
    if lib == "torch":
        import torch
        import transformers
        set_threads(threads, torch_too=True)
        transformers.BertForSequenceClassification, transformers.Qwen2ForCausalLM  # noqa: B018 (lazy imports)
        if section == "lora":
            import peft

        def load():
            torch.manual_seed(0)
            kw = {} if dropout else dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                         classifier_dropout=0.0)
            if section == "minilm":
                m = transformers.BertForSequenceClassification.from_pretrained(spec["dir"], dtype=torch.float32,
                                                                               **kw)
                params = list(m.parameters())
                lr = 2e-5
            else:
                base = transformers.AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.float32)
                base.config.use_cache = False
                m = peft.get_peft_model(base, peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                              lora_dropout=0.0, target_modules=LORA["targets"],
                                                              task_type="CAUSAL_LM"))
                params = [p for p in m.parameters() if p.requires_grad]
                lr = 1e-4
            m.train()
            # fused: torch's fastest AdamW on CPU, and what transformers' Trainer uses by default with torch >= 2.8
            # (optim="adamw_torch_fused"); torch.optim.AdamW's own default on CPU is the per-tensor loop, which
            # took ~150 ms more per MiniLM step here
            m.bench_optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)
            return m

        def step_of(m, c):
            ids = torch.tensor(c["ids"], dtype=torch.int64)
            mask = torch.ones_like(ids)
            opt = m.bench_optimizer
            if section == "minilm":
                types, y = torch.zeros_like(ids), torch.tensor(c["labels"], dtype=torch.int64)

                def step():
                    loss = m(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=y).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    return float(loss.item())
                return step

            def step():
                loss = m(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return float(loss.item())
            return step
        return load, step_of
    raise ValueError(eng)


def worker(spec: dict) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr; the protocol has the original stdout to itself

    def send(obj):
        proto.write(json.dumps(obj) + "\n")

    def peak():
        return kib_to_mib(peak_rss_kib() - base_peak)

    try:
        load, step_of = load_engine(spec)
        gc.collect()
        base_peak, base_now = peak_rss_kib(), statm_mib()
        t0 = time.perf_counter()
        model = load()
        load_s = time.perf_counter() - t0
        gc.collect()
        info = {"load_s": load_s, "peak_load_mib": peak(), "rss_load_mib": statm_mib() - base_now}
        if hasattr(model, "memory"):
            info["memory"] = model.memory
        send({"ok": True, **info})
    except Exception as exc:  # noqa: BLE001
        send({"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
              "trace": traceback.format_exc()[-2000:]})
        return
    fns, last = {}, {}
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "case":
                fn = step_of(model, cmd["case"])
                t0 = time.perf_counter()
                first = fn()  # warm-up step, not timed
                fns[cmd["name"]] = fn
                last[cmd["name"]] = first
                send({"ok": True, "first_loss": first, "first_s": time.perf_counter() - t0,
                      "peak_run_mib": peak()})
            elif cmd["op"] == "time":
                fn = fns[cmd["name"]]
                ts = []
                for _ in range(cmd["reps"]):
                    t0 = time.perf_counter()
                    last[cmd["name"]] = fn()
                    ts.append(time.perf_counter() - t0)
                send({"ok": True, "t": min(ts)})
            elif cmd["op"] == "stats":
                gc.collect()
                send({"ok": True, "last_loss": last.get(cmd["name"]), "peak_run_mib": peak(),
                      "rss_now_mib": statm_mib() - base_now})
            elif cmd["op"] == "quit":
                break
        except Exception as exc:  # noqa: BLE001
            send({"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                  "trace": traceback.format_exc()[-2000:]})


# ------------------------------------------------------------------------------------------------ the parent

def start_workers(engines: list, spec: dict, args) -> list:
    workers = []
    for eng in engines:
        lib = eng.split("-")[0]
        if not available(lib) or (lib == "torch" and spec["section"] == "lora" and not _has("peft")):
            print(f"  {eng}: not installed")
            continue
        w = Worker(dict(spec, engine=eng), args.threads, script=__file__)
        if not w.alive:
            print(f"  {eng}: failed to load: {w.error}")
            w.close()
            continue
        workers.append(w)
    return workers


def _has(mod: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(mod) is not None


def interleave(workers: list, cname: str, case: dict, args):
    """{engine: [time of each round]}, the warm-up replies and the stats after the rounds."""
    first = {}
    for w in workers:
        r = w.ask(op="case", name=cname, case=case)
        if not r.get("ok"):
            print(f"  {w.name}: {cname} failed: {r.get('error')}")
        first[w.name] = r
    times = {w.name: [] for w in workers}
    for r in range(args.rounds):
        order = workers[r % len(workers):] + workers[:r % len(workers)]
        for w in order:
            if not w.alive:
                continue
            time.sleep(args.pause)
            res = w.ask(op="time", name=cname, reps=3 if w.name == "calib" else 1)
            if res.get("ok"):
                times[w.name].append(res["t"])
    stats = {w.name: w.ask(op="stats", name=cname) for w in workers}
    return times, first, stats


def print_table(title: str, times: dict, workers: list, first: dict, stats: dict, base: str = "cpf-full",
                extra_rows=()) -> dict:
    hdr = (f"{'engine':<20}{'median ms':>10}{'min ms':>10}{'ratio':>7}{'rounds':>7}{'peak load':>10}"
           f"{'peak run':>10}{'loss 1st':>10}{'loss last':>10}")
    print(f"\n{title}")
    print(hdr)
    print("-" * len(hdr))
    med = {e: statistics.median(v) for e, v in times.items() if v}
    for w in workers:
        e = w.name
        if e == "calib" or e not in med:
            continue
        ratio = f"{med[e] / med[base]:7.2f}" if base in med else f"{'-':>7}"
        st, fi = stats.get(e, {}), first.get(e, {})
        last = st.get("last_loss")
        print(f"{e:<20}{fmt_ms(med[e])}{fmt_ms(min(times[e]))}{ratio}{len(times[e]):7d}"
              f"{w.info['peak_load_mib']:10.1f}{st.get('peak_run_mib', float('nan')):10.1f}"
              f"{fi.get('first_loss', float('nan')):10.4f}{(last if last is not None else float('nan')):10.4f}")
    for row in extra_rows:
        print(row)
    if "calib" in med:
        gf = [2 * CALIB_N ** 3 / t / 1e9 for t in times["calib"]]
        print(f"{'calibration':<20}{fmt_ms(med['calib'])}{fmt_ms(min(times['calib']))}{'':>7}"
              f"{statistics.median(gf):9.1f} GF/s  (numpy {CALIB_N}^3 float32 matmul, OPENBLAS_NUM_THREADS=threads; "
              f"rounds min {min(gf):.1f} max {max(gf):.1f} GFLOP/s)")
    return med


def goal_line(what: str, ours: str, ref: str, times: dict, med: dict, goal: float) -> None:
    if ours not in med or ref not in med:
        print(f"goal: {what} {ours} / {ref} <= {goal}: not measured")
        return
    r = med[ours] / med[ref]
    paired = paired_ratio(times, ours, ref) if len(times[ours]) == len(times[ref]) else float("nan")
    print(f"goal: {what} {ours} / {ref} <= {goal}: {r:.2f} (ratio of medians; median of per-round ratios "
          f"{paired:.2f}) -> {'met' if r <= goal else 'NOT met'}")


def close_all(workers):
    for w in workers:
        w.close()


def header(args, title):
    print(f"\n=== {title} === threads {args.threads}; loadavg before {loadavg()}", flush=True)


def notes(args):
    return (f"ms per optimizer step (forward, loss, backward, AdamW, zero_grad), median over rounds of one step each "
            f"after one untimed warm-up step; ratio = engine / {{base}} (> 1: cpuformer faster); peak load / peak run: "
            f"peak RSS (VmHWM) growth (MiB) over the worker after its imports, after loading / after the warm-up and timed "
            f"steps; loss 1st: the warm-up step's loss (same weights, so with dropout off the engines should agree), loss last: after "
            f"the timed steps (every engine ran the same 1 + {args.rounds} steps on the same batch, so with dropout off "
            f"these should agree closely too). Dropout "
            f"{'as configured (0.1) in both' if args.dropout else 'off in both'}.")


def section_minilm(args, cache):
    import numpy as np
    fields = QUICK["minilm"] if args.quick else MINILM
    B, T = (4, 16) if args.quick else (32, 64)
    header(args, f"full fine-tuning step, {'tiny' if args.quick else 'MiniLM'}-shaped BERT sequence classifier "
                 f"({fields['num_hidden_layers']}x{fields['hidden_size']}, {fields['num_attention_heads']} heads, "
                 f"vocab {fields['vocab_size']}, 2 labels), batch {B}, T={T}")
    d = build_seqcls_dir(cache, fields)
    spec = {"section": "minilm", "dir": d, "threads": args.threads, "calib_n": CALIB_N, "dropout": args.dropout}
    workers = start_workers(["cpf-full", "cpf-full-recompute", "torch-full", "calib"], spec, args)
    rng = np.random.default_rng(0)
    ids = rng.integers(min(1000, fields["vocab_size"] // 2), fields["vocab_size"] - 1, size=(B, T))
    case = {"ids": ids.tolist(), "labels": rng.integers(0, 2, size=B).tolist()}
    times, first, stats = interleave(workers, "step", case, args)
    med = print_table(f"BERT sequence classifier, batch {B}, T={T}: full fine-tuning step", times, workers, first,
                      stats)
    print(notes(args).format(base="cpf-full"))
    goal_line("MiniLM step time", "cpf-full", "torch-full", times, med, GOALS["minilm_time"])
    close_all(workers)
    print(f"loadavg after: {loadavg()}", flush=True)


def _meminfo_mib(key: str) -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def section_lora(args, cache):
    import numpy as np
    fields = dict(QUICK["decoder"] if args.quick else QWEN2_05B)
    if args.decoder_layers is not None:
        fields["num_hidden_layers"] = args.decoder_layers
    B, T = (2, 32) if args.quick else (4, 256)
    header(args, f"LoRA step (r={LORA['r']}, alpha={LORA['alpha']}, {','.join(LORA['targets'])}), Qwen2-0.5B-shaped "
                 f"decoder ({fields['num_hidden_layers']} layers, hidden {fields['hidden_size']}, vocab "
                 f"{fields['vocab_size']}, tied), float32 weights on disk, batch {B}, T={T}, causal-LM loss")
    d = build_dir(cache, "qwen2", fields, "float32")
    disk = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    print(f"  weights on disk: {disk / 2**20:.1f} MiB ({d})")
    spec = {"section": "lora", "dir": d, "threads": args.threads, "calib_n": CALIB_N, "dropout": args.dropout}
    workers = start_workers(["cpf-lora", "cpf-lora-recompute", "torch-peft", "calib"], spec, args)
    ids = np.random.default_rng(0).integers(0, fields["vocab_size"] - 1, size=(B, T))
    case = {"ids": ids.tolist()}
    times, first, stats = interleave(workers, "step", case, args)
    for w in workers:
        if "memory" in w.info:
            m = w.info["memory"]
            print(f"  {w.name} model.memory: mapped {m['mapped'] / 2**20:.1f} MiB, owned {m['owned'] / 2**20:.1f} MiB")
    lora_peak = stats.get("cpf-lora", {}).get("peak_run_mib")
    close_all(workers)
    # cpuformer full fine-tuning of the same decoder: memory only, alone, if it fits comfortably
    extra = []
    n_params = disk / 4  # float32 on disk, tied embeddings stored once
    est = 16 * n_params / 2**20 + max(0.0, (lora_peak or 0.0) - disk / 2**20)  # weights, grads, 2 moments + acts
    avail = _meminfo_mib("MemAvailable")
    if args.no_full_ft_memory:
        extra.append(f"{'cpf-full':<20} skipped (--no-full-ft-memory)")
    elif not est < 0.6 * avail:
        extra.append(f"{'cpf-full':<20} skipped: estimated {est / 1024:.1f} GiB (16 bytes per parameter + the "
                     f"LoRA run's activations) is not < 0.6 x MemAvailable {avail / 1024:.1f} GiB")
    else:
        print(f"  full fine-tuning memory row, alone: estimated {est / 1024:.1f} GiB, MemAvailable "
              f"{avail / 1024:.1f} GiB", flush=True)
        fw = start_workers(["cpf-full"], spec, args)
        if fw:
            w = fw[0]
            r = w.ask(op="case", name="step", case=case)
            ts = [w.ask(op="time", name="step", reps=1).get("t") for _ in range(2)] if r.get("ok") else []
            st = w.ask(op="stats", name="step")
            if r.get("ok") and st.get("ok"):
                extra.append(f"{'cpf-full (alone)':<20}{'-':>10}{'-':>10}{'-':>7}{'-':>7}"
                             f"{w.info['peak_load_mib']:10.1f}{st['peak_run_mib']:10.1f}{r['first_loss']:10.4f}"
                             f"{st['last_loss']:10.4f}   memory only (3 steps; not interleaved; step times "
                             f"{', '.join(f'{t * 1e3:.0f}' for t in ts if t)} ms)")
            else:
                extra.append(f"{'cpf-full':<20} failed: {r.get('error') or st.get('error')}")
            close_all(fw)
    med = print_table(f"Qwen2-shaped decoder, batch {B}, T={T}: LoRA step (peak RSS in MiB)", times, workers, first,
                      stats, base="cpf-lora", extra_rows=extra)
    print(notes(args).format(base="cpf-lora"))
    goal_line("LoRA step time", "cpf-lora", "torch-peft", times, med, GOALS["lora_time"])
    pa, pb = (stats.get(e, {}).get("peak_run_mib") for e in ("cpf-lora", "torch-peft"))
    if pa is not None and pb:
        print(f"goal: LoRA peak memory cpf-lora / torch-peft <= {GOALS['lora_memory']}: {pa / pb:.2f} "
              f"({pa:.0f} / {pb:.0f} MiB) -> {'met' if pa / pb <= GOALS['lora_memory'] else 'NOT met'}")
    else:
        print(f"goal: LoRA peak memory cpf-lora / torch-peft <= {GOALS['lora_memory']}: not measured")
    print(f"loadavg after: {loadavg()}", flush=True)


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        arg = sys.argv[2]
        with open(arg[1:]) as f:
            spec = json.load(f)
        os.unlink(arg[1:])
        worker(spec)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, --quick 2)")
    parser.add_argument("--pause", type=float, default=None,
                        help="seconds before each switch of engine (default 0.25, --quick 0.1)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 2 rounds (smoke test, < 1 minute)")
    parser.add_argument("--only", choices=["minilm", "lora"])
    parser.add_argument("--decoder-layers", type=int, default=None, help="layers of the Qwen2-shaped decoder (24)")
    parser.add_argument("--dropout", action="store_true",
                        help="train with the config's dropout (0.1) in both engines (default: off in both)")
    parser.add_argument("--no-full-ft-memory", action="store_true",
                        help="skip the cpuformer full fine-tuning memory row of the decoder")
    parser.add_argument("--cache", default=os.environ.get("CPUFORMER_BENCH_CACHE",
                                                          os.path.expanduser("~/.cache/cpuformer-bench")))
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 2 if args.quick else 7
    if args.pause is None:
        args.pause = 0.1 if args.quick else 0.25
    os.makedirs(args.cache, exist_ok=True)
    import warnings
    warnings.filterwarnings("ignore")
    vers = []
    for mod in ("cpuformer", "numpy", "torch", "transformers", "peft"):
        try:
            m = __import__(mod)
            vers.append(f"{mod} {m.__version__}")
        except ImportError:
            vers.append(f"{mod} not installed")
    import cpuformer
    print(", ".join(vers) + f"; cpuformer SIMD {cpuformer.build_info()['simd']}")
    print(f"threads {args.threads} per engine (cpuformer.set_num_threads, torch.set_num_threads + 1 inter-op, "
          f"OMP/MKL_NUM_THREADS; numpy OpenBLAS 1 except the calibration); rounds {args.rounds}; pause {args.pause} s; "
          f"os.cpu_count() {os.cpu_count()}; MemTotal {_meminfo_mib('MemTotal') / 1024:.1f} GiB; "
          f"loadavg {loadavg()}")
    if args.quick:
        print("--quick: tiny shapes and 2 rounds; the figures only show that every engine runs (memory growth of a "
              "tiny model is below the peak RSS's reach after the imports)")
    t0 = time.perf_counter()
    for name, fn in (("minilm", section_minilm), ("lora", section_lora)):
        if args.only in (None, name):
            fn(args, args.cache)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; loadavg at the end {loadavg()}")


if __name__ == "__main__":
    main()
