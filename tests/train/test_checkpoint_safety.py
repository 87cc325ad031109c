"""Nothing lost: saved files get ordinary permissions, and the trainer's checkpoints survive a kill at any moment.

A run is killed at every filesystem step of its checkpoint writes (and, in child processes, at random moments and
by SIGKILL); the next start with ``resume_from="latest"`` must never fail and must finish with exactly the losses,
history and weights of an uninterrupted run. ``CPUFORMER_FUZZ_LONG=1`` runs longer, denser variants.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import stat
import zlib

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


# The runs the kill tests interrupt: "steps" ends on a save step through max_steps and keeps a single checkpoint
# (the final save replaces the step's checkpoint, and a gap there has nothing older to fall back on); "epochs" ends
# on an epoch boundary with an evaluation, so the final save differs from the loop's save at the same step.
CONFIGS = {
    "steps": dict(max_steps=12, epochs=10, batch_size=4, save_every=3, save_total_limit=1, val=False, accum=1),
    "epochs": dict(max_steps=None, epochs=2, batch_size=16, save_every=7, save_total_limit=2, val=True, accum=1),
    "long": dict(max_steps=30, epochs=10, batch_size=4, save_every=2, save_total_limit=3, val=True, accum=2),
}
TIMING = ("tokens_per_s", "step_time")


def _records(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def train_run(out: str, config: str, resume: bool = False) -> dict:
    """One start of a training script: build the model from scratch, then fit with or without
    ``resume_from="latest"``. Returns what a finished run must agree on, as JSON-able values."""
    import hashlib
    import json
    import cpuformer
    import cpuformer.nn as nn
    from cpuformer.train import AdamW, EarlyStopping, Trainer, latest_checkpoint, warmup_cosine
    c = CONFIGS[config]
    threads = cpuformer.get_num_threads()
    cpuformer.set_num_threads(1)
    try:
        model, ds = tiny_gpt(dropout=0.1, seed=0)
        nn.init.manual_seed(1)  # the dropout stream
        trainer = Trainer(model, optimizer=AdamW(model, lr=3e-3), schedule=warmup_cosine(3e-3, 3, 30), seed=7,
                          quiet=True, output_dir=out, save_every=c["save_every"],
                          save_total_limit=c["save_total_limit"], grad_accum_steps=c["accum"],
                          callbacks=[EarlyStopping(patience=100)])
        trainer.fit(ds, ds if c["val"] else None, epochs=c["epochs"], max_steps=c["max_steps"],
                    batch_size=c["batch_size"], resume_from="latest" if resume else None)
    finally:
        cpuformer.set_num_threads(threads)
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode() + np.ascontiguousarray(p.data).tobytes())
    with open(os.path.join(out, "history.jsonl")) as f:
        history_file = [json.loads(line) for line in f]
    return {"history": _records(trainer.history), "history_file": _records(history_file),
            "weights": digest.hexdigest(), "step": trainer.step,
            "latest": os.path.basename(latest_checkpoint(out) or ""),
            "leftovers": sorted(n for n in os.listdir(out) if ".tmp-" in n)}


_REFERENCE: dict = {}


def reference(config: str, tmp_path_factory) -> dict:
    """The uninterrupted run (once per config and session)."""
    if config not in _REFERENCE:
        _REFERENCE[config] = train_run(str(tmp_path_factory.mktemp("reference")), config)
        assert _REFERENCE[config]["leftovers"] == []
    return _REFERENCE[config]


def assert_same_run(resumed: dict, ref: dict, where: str) -> None:
    assert resumed["history"] == ref["history"], where
    assert resumed["weights"] == ref["weights"], where
    assert resumed["step"] == ref["step"] and resumed["latest"] == ref["latest"], where
    assert resumed["leftovers"] == [], where
    # the history file restarts from the checkpoint's records; a restart with no checkpoint at all begins a new
    # run in the same file, after the killed run's lines
    assert resumed["history_file"][-len(ref["history_file"]):] == ref["history_file"], where


_FS_OPS = ("mkdir", "open", "rename", "replace", "unlink", "rmdir", "fsync")


@contextlib.contextmanager
def fs_hook(before):
    """Call ``before(op, args)`` ahead of every filesystem change (``os.open`` only when it creates), including
    each unlink and rmdir inside ``shutil.rmtree``. Calls made by ``before`` itself are not reported."""
    real = {name: getattr(os, name) for name in _FS_OPS}
    busy = [False]

    def wrap(name):
        fn = real[name]

        def hooked(*args, **kwargs):
            flags = args[1] if len(args) > 1 else kwargs.get("flags", 0)
            if not busy[0] and (name != "open" or flags & os.O_CREAT):
                busy[0] = True
                try:
                    before(name, args)
                finally:
                    busy[0] = False
            return fn(*args, **kwargs)
        return hooked

    for name in _FS_OPS:
        setattr(os, name, wrap(name))
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(os, name, fn)


def _tree_signature(root: str):
    items = []
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        items.append((rel, "/"))
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                items.append((os.path.join(rel, name), zlib.crc32(f.read())))
    return tuple(sorted(items))


def crash_snapshots(out: str, snaps_dir: str, config: str, resume: bool = False):
    """Run ``config`` in ``out``, copying the folder aside just before every filesystem change: each distinct copy
    is what a kill at that moment leaves behind. Returns (result, [(op, copy)])."""
    snaps, seen = [], set()

    def before(op, args):
        if not os.path.isdir(out):
            return
        sig = _tree_signature(out)
        if sig in seen:
            return
        seen.add(sig)
        dst = os.path.join(snaps_dir, f"kill-{len(snaps):04d}")
        shutil.copytree(out, dst, symlinks=True)
        snaps.append((f"before {op} {args[0] if args else ''}", dst))

    with fs_hook(before):
        result = train_run(out, config, resume=resume)
    dst = os.path.join(snaps_dir, "finished")
    shutil.copytree(out, dst, symlinks=True)
    snaps.append(("after the run", dst))
    return result, snaps


# ------------------------------------------------------------------------------------------------ kill at every step

@pytest.mark.parametrize("config", ["steps", "epochs"] + (["long"] if LONG else []))
def test_a_kill_at_any_filesystem_step_loses_nothing(tmp_path, tmp_path_factory, config):
    ref = reference(config, tmp_path_factory)
    result, snaps = crash_snapshots(str(tmp_path / "run"), str(tmp_path), config)
    assert result == ref
    assert len(snaps) > 40
    for where, snap in snaps:
        assert_same_run(train_run(snap, config, resume=True), ref, f"{config}: killed {where} ({snap})")
        shutil.rmtree(snap)


@pytest.mark.skipif(not LONG, reason="CPUFORMER_FUZZ_LONG=1: kills during the resumed run as well")
@pytest.mark.parametrize("config", ["steps", "epochs"])
def test_a_second_kill_while_resuming_loses_nothing(tmp_path, tmp_path_factory, config):
    ref = reference(config, tmp_path_factory)
    _, first = crash_snapshots(str(tmp_path / "run"), str(tmp_path / "first"), config)
    rng = random.Random(0)
    for where, snap in rng.sample(first, min(12, len(first))):
        second_dir = str(tmp_path / ("second-" + os.path.basename(snap)))
        os.makedirs(second_dir)
        result, second = crash_snapshots(snap, second_dir, config, resume=True)
        assert_same_run(result, ref, f"{config}: killed {where}")
        for where2, snap2 in second:
            assert_same_run(train_run(snap2, config, resume=True), ref,
                            f"{config}: killed {where}, then {where2} while resuming")
        shutil.rmtree(second_dir)


# ------------------------------------------------------------------------------------------------ complete or not

def _trainer(out=None, **kw):
    from cpuformer.train import AdamW, Trainer
    model, ds = tiny_gpt()
    return Trainer(model, optimizer=AdamW(model, lr=1e-3), quiet=True, output_dir=out, **kw), ds


def _legacy(ckpt: str) -> str:
    """A checkpoint as versions before the marker wrote it."""
    os.unlink(os.path.join(ckpt, "checkpoint_complete.json"))
    return ckpt


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    from cpuformer.train import latest_checkpoint
    out = str(tmp_path)
    t, ds = _trainer(out, save_total_limit=None)
    for steps in (2, 4, 6, 8):
        t.fit(ds, max_steps=steps, batch_size=4)
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8",
                                       "history.csv", "history.jsonl"]
    assert latest_checkpoint(out).endswith("checkpoint-8")
    # what the old save left when killed while deleting the checkpoint it replaced: only trainer_state.json
    for name in ("model.safetensors", "optimizer.safetensors", "checkpoint_complete.json"):
        os.unlink(os.path.join(out, "checkpoint-8", name))
    assert latest_checkpoint(out).endswith("checkpoint-6")
    # a truncated file: the marker's sizes disagree
    with open(os.path.join(out, "checkpoint-6", "model.safetensors"), "r+b") as f:
        f.truncate(100)
    assert latest_checkpoint(out).endswith("checkpoint-4")
    # a checkpoint from before the marker: complete when all three files are there
    _legacy(os.path.join(out, "checkpoint-4"))
    assert latest_checkpoint(out).endswith("checkpoint-4")
    os.unlink(os.path.join(out, "checkpoint-4", "optimizer.safetensors"))
    assert latest_checkpoint(out).endswith("checkpoint-2")
    os.makedirs(os.path.join(out, "checkpoint-99"))  # an empty folder
    assert latest_checkpoint(out).endswith("checkpoint-2")
    t2, _ = _trainer(out)
    t2.fit(ds, max_steps=3, batch_size=4, resume_from="latest")  # from checkpoint-2
    assert [r["step"] for r in t2.history if "loss" in r] == [1, 2, 3]
    assert latest_checkpoint(str(tmp_path / "nowhere")) is None


@pytest.mark.parametrize("file, damage", [
    ("model", "no"), ("optimizer", "no"), ("state", "no"), ("model", "truncated"), ("state", "garbage"),
    ("marker", "garbage"), ("state", "not an object"), ("state", "without step"), ("optimizer", "legacy, garbage")])
def test_loading_an_incomplete_or_damaged_checkpoint_names_the_folder(tmp_path, file, damage):
    t, ds = _trainer()
    t.fit(ds, max_steps=2, batch_size=4)
    ckpt = t.save_checkpoint(str(tmp_path / "ckpt"))
    target = os.path.join(ckpt, {"model": "model.safetensors", "optimizer": "optimizer.safetensors",
                                 "state": "trainer_state.json", "marker": "checkpoint_complete.json"}[file])
    damage = damage if damage == "no" or damage.startswith("legacy") else f"{damage} {file}"
    if damage == "no":
        os.unlink(target)
    elif damage.startswith("truncated"):
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) // 2)
    elif damage == "garbage state":
        with open(target, "wb") as f:
            f.write(b"\xff{not json")
        _legacy(ckpt)
    elif damage == "garbage marker":
        with open(target, "w") as f:
            f.write("{")
    elif damage == "not an object state":
        with open(target, "w") as f:
            f.write("[1, 2]")
        _legacy(ckpt)
    elif damage == "without step state":
        with open(target, "w") as f:
            f.write('{"format": "cpuformer-trainer-state"}')
        _legacy(ckpt)
    else:
        with open(target, "wb") as f:
            f.write(b"\x10" + b"\0" * 7 + b"{}")
        _legacy(ckpt)
    fresh, _ = _trainer()
    before = [p.data.copy() for _, p in fresh.model.named_parameters()]
    with pytest.raises(ValueError, match="ckpt"):
        fresh.load_checkpoint(ckpt)
    assert fresh.step == 0  # nothing was changed
    assert all((p.data == b).all() for (_, p), b in zip(fresh.model.named_parameters(), before))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fresh.load_checkpoint(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------------ tidying, rotation

def test_leftovers_of_a_killed_run_are_tidied_at_the_next_start(tmp_path):
    import subprocess
    import sys
    out = str(tmp_path)
    t, ds = _trainer(out)
    t.fit(ds, max_steps=2, batch_size=4)
    ckpt2 = os.path.join(out, "checkpoint-2")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        junk = [f"checkpoint-4.tmp-{dead}-0badcafe", f"checkpoint-4.tmp-del-{dead}-0badcafe",
                f"checkpoint-4.tmp-{dead}", f".tmp-{dead}-12345678", ".tmp-k3y_9abc"]
        for name in junk[:3]:
            os.makedirs(os.path.join(out, name))
            with open(os.path.join(out, name, "model.safetensors"), "wb") as f:
                f.write(b"partial")
        for name in junk[3:]:
            with open(os.path.join(out, name), "wb") as f:
                f.write(b"partial")
        # a complete checkpoint-6 a kill left between "old one aside" and "new one in": put in place
        shutil.copytree(ckpt2, os.path.join(out, f"checkpoint-6.tmp-{dead}-aaaaaaaa"))
        # a complete checkpoint-2 next to a complete checkpoint-2: the temporary one goes
        shutil.copytree(ckpt2, os.path.join(out, f"checkpoint-2.tmp-{dead}-bbbbbbbb"))
        # another process, still running, is writing these: left alone
        busy = [f"checkpoint-8.tmp-{live.pid}-cccccccc", f".tmp-{live.pid}-dddddddd"]
        os.makedirs(os.path.join(out, busy[0]))
        open(os.path.join(out, busy[1]), "wb").close()
        _trainer(out)
        assert sorted(os.listdir(out)) == sorted(["checkpoint-2", "checkpoint-6", "history.csv", "history.jsonl"] + busy)
        t3, _ = _trainer(out)
        t3.fit(ds, max_steps=2, batch_size=4, resume_from="latest")  # from checkpoint-6: nothing left to do
        assert t3.step == 2  # (the copy of checkpoint-2 was put in place as checkpoint-6)
    finally:
        live.kill()
        live.wait()
    _trainer(out)  # the writer is gone now
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-6", "history.csv", "history.jsonl"]


def test_rotation_never_deletes_the_newest_complete_checkpoint(tmp_path):
    from cpuformer.train import latest_checkpoint
    out = str(tmp_path)
    t, ds = _trainer(out, save_total_limit=1)
    t.fit(ds, max_steps=2, batch_size=4)
    # a checkpoint-8 the old save left incomplete (killed while replacing it), from a run resumed at step 2
    os.makedirs(os.path.join(out, "checkpoint-8"))
    open(os.path.join(out, "checkpoint-8", "trainer_state.json"), "w").close()
    t.fit(ds, max_steps=4, batch_size=4)
    assert latest_checkpoint(out).endswith("checkpoint-4")  # the old rotation kept checkpoint-8 and deleted 4
    assert sorted(os.listdir(out)) == ["checkpoint-4", "checkpoint-8", "history.csv", "history.jsonl"]
    t.fit(ds, max_steps=8, batch_size=4)  # replaces the incomplete checkpoint-8
    assert sorted(os.listdir(out)) == ["checkpoint-8", "history.csv", "history.jsonl"]
    assert latest_checkpoint(out).endswith("checkpoint-8")
    # keep the two newest complete ones, and the one just saved even when older ones are newer by step
    t2, _ = _trainer(out, save_total_limit=2, save_every=1)
    t2.fit(ds, max_steps=2, batch_size=4)
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-8", "history.csv", "history.jsonl"]


def test_the_final_save_replaces_the_step_s_checkpoint_whole(tmp_path):
    """The end-of-run save of a run that ended on a save step rewrites checkpoint-N: the old one is renamed aside,
    never deleted before the new one is in place."""
    out = str(tmp_path)
    t, ds = _trainer(out, save_every=2)
    events = []

    def before(op, args):
        if op in ("rename", "unlink", "rmdir"):
            events.append((op, os.path.basename(str(args[0])), os.path.basename(str(args[1])) if op == "rename"
                           else ""))

    with fs_hook(before):
        t.fit(ds, max_steps=2, batch_size=4)
    renames = [e for e in events if e[0] == "rename"]
    assert len(renames) == 3  # loop save: tmp -> ckpt; final save: ckpt -> aside, tmp -> ckpt
    assert ".tmp-" in renames[0][1] and renames[0][2] == "checkpoint-2"
    assert renames[1][1] == "checkpoint-2" and ".tmp-del-" in renames[1][2]
    assert ".tmp-" in renames[2][1] and renames[2][2] == "checkpoint-2"
    first_delete = next(i for i, e in enumerate(events) if e[0] in ("unlink", "rmdir"))
    assert first_delete > events.index(renames[2])
    assert sorted(os.listdir(out)) == ["checkpoint-2", "history.csv", "history.jsonl"]


# ------------------------------------------------------------------------------------------------ real processes

CHILD = """
import json, os, sys, time
sys.path.insert(0, {here!r})
import test_checkpoint_safety as T
out, config, mode, result_path = sys.argv[1:5]
crash_at, slow = int(os.environ.get("CRASH_AT", "0")), float(os.environ.get("SLOW_FS", "0"))
ops = []
def before(op, args):
    ops.append([op, os.path.basename(str(args[0])) if args else ""])
    if len(ops) == crash_at:
        os._exit(77)                  # killed just before this filesystem step
    if slow:
        time.sleep(slow)              # so that random kills mostly land inside checkpoint writes
print("ready", flush=True)
with T.fs_hook(before):
    result = T.train_run(out, config, resume=(mode == "resume"))
result["ops"] = ops
with open(result_path, "w") as f:
    json.dump(result, f)
"""


def _start(tmp_path, out, config, mode, crash_at=0, slow=0.0):
    import subprocess
    import sys
    script = tmp_path / "child.py"
    if not script.exists():
        script.write_text(CHILD.format(here=os.path.dirname(os.path.abspath(__file__))))
    result = tmp_path / f"result-{os.urandom(4).hex()}.json"
    env = dict(os.environ, CRASH_AT=str(crash_at), SLOW_FS=str(slow))
    proc = subprocess.Popen([sys.executable, str(script), out, config, mode, str(result)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, result


def _finish(proc, result, what):
    import json
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n{stderr[-3000:]}"
    with open(result) as f:
        return json.load(f)


def test_sigkill_at_random_moments_loses_nothing(tmp_path, tmp_path_factory):
    import time
    config = "steps"
    ref = reference(config, tmp_path_factory)
    seed = int(os.environ.get("CPUFORMER_FUZZ_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    # an uninterrupted child run, slowed at every filesystem step: how long a run lasts once started
    proc, res = _start(tmp_path, str(tmp_path / "whole"), config, "fresh", slow=0.002)
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    whole = _finish(proc, res, "uninterrupted child")
    duration = time.perf_counter() - t0
    whole.pop("ops")
    assert whole == ref
    for trial in range(30 if LONG else 3):
        out = str(tmp_path / f"trial-{trial}")
        kills = []
        for attempt in range(2):  # killed, then killed again while resuming
            proc, res = _start(tmp_path, out, config, "resume" if attempt else "fresh", slow=0.002)
            assert proc.stdout.readline().strip() == "ready"
            delay = rng.uniform(0.0, duration * 1.05)
            time.sleep(delay)
            proc.kill()
            proc.communicate()
            kills.append(f"{delay:.3f}s ({'killed' if proc.returncode < 0 else 'had finished'})")
        proc, res = _start(tmp_path, out, config, "resume")
        where = f"seed {seed} (CPUFORMER_FUZZ_SEED), trial {trial}: SIGKILL after {', then '.join(kills)}"
        resumed = _finish(proc, res, where)
        resumed.pop("ops")
        assert_same_run(resumed, ref, where)
        shutil.rmtree(out)


def test_exit_at_filesystem_steps_of_the_final_save_in_a_child(tmp_path, tmp_path_factory):
    """Real processes killed at chosen filesystem steps (different process ids, so the tidying sees dead
    writers): points of the final save, which replaces checkpoint-12, including the moment between its two
    renames; with CPUFORMER_FUZZ_LONG=1 every step of the final save and a sample of the others."""
    config = "steps"
    ref = reference(config, tmp_path_factory)
    proc, res = _start(tmp_path, str(tmp_path / "count"), config, "fresh")
    ops = _finish(proc, res, "counting child")["ops"]
    final_start = max(i for i, (op, arg) in enumerate(ops) if op == "mkdir" and arg.startswith("checkpoint-"))
    aside = next(i for i, (op, arg) in enumerate(ops) if i > final_start and op == "rename")
    assert ops[aside][1] == "checkpoint-12"
    final = list(range(final_start + 1, len(ops) + 1))  # crash_at is 1-based: killed before ops[crash_at - 1]
    if LONG:
        points = final + random.Random(0).sample(range(1, final_start + 1), min(40, final_start))
    else:
        points = sorted({final[0], aside + 1, aside + 2, final[len(final) // 2], final[-1]})
    for k in points:
        out = str(tmp_path / f"exit-{k}")
        proc, _ = _start(tmp_path, out, config, "fresh", crash_at=k)
        proc.communicate(timeout=300)
        where = f"exit before step {k} of {len(ops)}: {ops[k - 1]}"
        assert proc.returncode == 77, where
        proc, res = _start(tmp_path, out, config, "resume")
        resumed = _finish(proc, res, where)
        resumed.pop("ops")
        assert_same_run(resumed, ref, where)
        shutil.rmtree(out)
