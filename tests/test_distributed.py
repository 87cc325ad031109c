"""Data-parallel training over MPI (cpuformer.distributed): equivalence with one process, failure, resume, two
"hosts". Each test launches real MPI jobs of tests/distributed/dp_train.py; skipped without mpi4py + mpiexec."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("mpi4py")
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed")
SCRIPT = os.path.join(HERE, "dp_train.py")
BIN = os.path.dirname(sys.executable)
MPIEXEC = shutil.which("mpiexec", path=BIN + os.pathsep + os.environ.get("PATH", ""))
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install 'cpuformer[mpi]')")


def _env(extra=None):
    env = dict(os.environ)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.pop("OMP_NUM_THREADS", None)
    env.update(extra or {})
    return env


def run(args, ranks=None, timeout=120, env=None, check=True):
    cmd = [sys.executable, SCRIPT, *map(str, args)]
    if ranks:
        cmd = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py", SCRIPT, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(env))
    if check:
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def assert_same_run(a, b, rtol, skip=()):
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=rtol)
    for k in a:
        if k != "losses" and k not in skip:
            scale = np.abs(a[k]).max()
            assert np.abs(a[k] - b[k]).max() <= rtol * scale, (k, np.abs(a[k] - b[k]).max() / scale)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_two_ranks_match_one_process_with_doubled_batch(tmp_path, transport):
    env = {"MPIR_CVAR_NOLOCAL": "1", "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"} if transport == "tcp" else {}
    # SGD is linear in the gradient, so the runs agree to float rounding (1e-6 seen). 45 samples in global batches
    # of 14: each epoch ends with a batch of 3, split 2 + 1, and counts weight the ranks' gradients exactly.
    common = ["--optimizer", "sgd", "--steps", 8, "--windows", 45]
    run(["--out", tmp_path / "one.npz", "--batch", 14, "--threads", 2, *common])
    run(["--out", tmp_path / "two.npz", "--batch", 7, *common], ranks=2, env=env)
    one, two = load(tmp_path / "one.npz"), load(tmp_path / "two.npz")
    assert len(one["losses"]) == 8
    assert_same_run(one, two, 1e-5)


def test_adamw_overlap_and_uneven_last_batch(tmp_path):
    # 43 samples in global batches of 14: each epoch ends with one sample, so rank 1 has none in that step and
    # still takes part in every collective
    common = ["--steps", 6, "--windows", 43]
    run(["--out", tmp_path / "one.npz", "--batch", 14, "--threads", 2, *common])
    run(["--out", tmp_path / "ovl.npz", "--batch", 7, *common], ranks=2)
    run(["--out", tmp_path / "seq.npz", "--batch", 7, "--no-overlap", "--bucket-mb", 100, *common], ranks=2)
    one, ovl, seq = load(tmp_path / "one.npz"), load(tmp_path / "ovl.npz"), load(tmp_path / "seq.npz")
    # overlapped buckets and one big all-reduce after backward give bit-identical training
    for k in ovl:
        np.testing.assert_array_equal(ovl[k], seq[k])
    # AdamW divides by the gradient's RMS, so a gradient that is analytically zero (the key bias: softmax ignores a
    # constant added to every score) turns pure rounding noise into lr-sized steps; the rest agrees closely
    E = 32
    np.testing.assert_allclose(ovl["losses"], one["losses"], rtol=1e-5)
    for name in one:
        if name.endswith("in_proj_bias"):
            for part in (slice(0, E), slice(2 * E, 3 * E)):
                np.testing.assert_allclose(ovl[name][part], one[name][part], rtol=0, atol=1e-4)
        elif name != "losses":
            assert np.abs(ovl[name] - one[name]).max() <= 1e-4 * np.abs(one[name]).max(), name


def test_failing_rank_aborts_the_job_quickly(tmp_path):
    start = time.monotonic()
    proc = run(["--out", tmp_path / "x.npz", "--batch", 4, "--steps", 50, "--fail-rank", 1, "--fail-step", 2],
               ranks=2, timeout=60, check=False)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "fails on purpose" in proc.stderr
    assert elapsed < 30, elapsed
    assert not (tmp_path / "x.npz").exists()


def test_resume_matches_uninterrupted(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--batch", 4, "--save-every", 3, "--steps", 7]
    run(["--out", tmp_path / "full.npz", "--output-dir", full, *common], ranks=2)
    run(["--out", tmp_path / "p1.npz", "--output-dir", part, "--batch", 4, "--save-every", 3, "--steps", 4],
        ranks=2)
    assert sorted(os.listdir(part)) == ["checkpoint-3", "checkpoint-4", "history.csv", "history.jsonl"]  # rank 0 wrote, once
    run(["--out", tmp_path / "resumed.npz", "--output-dir", part, *common, "--resume"], ranks=2)
    a, b = load(tmp_path / "full.npz"), load(tmp_path / "resumed.npz")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def _netns_available() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["ip", "netns", "add", "cfprobe"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "cfprobe"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _netns_available(), reason="needs root and ip netns")
def test_two_hosts_over_tcp(tmp_path):
    run(["--out", tmp_path / "shm.npz", "--batch", 4, "--optimizer", "sgd", "--steps", 6], ranks=2)
    cmd = [os.path.join(HERE, "two_hosts.sh"), sys.executable, "-m", "mpi4py", SCRIPT, "--out",
           str(tmp_path / "hosts.npz"), "--batch", "4", "--optimizer", "sgd", "--steps", "6"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env({"MPIEXEC": MPIEXEC}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0 of 2" in proc.stdout
    a, b = load(tmp_path / "shm.npz"), load(tmp_path / "hosts.npz")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_single_rank_in_process_overlaps_and_changes_nothing():
    """One rank (no launcher): the reducer starts buckets during backward and the step equals the plain one."""
    from cpuformer import nn
    from cpuformer.data import LanguageModelDataset
    from cpuformer.distributed import DataParallel
    from cpuformer.models import GPT
    from cpuformer.train import SGD, Trainer

    data = LanguageModelDataset(np.random.default_rng(0).integers(0, 30, 16 * 20 + 1), 16)
    results = []
    for dist in (False, True):
        nn.init.manual_seed(0)
        model = GPT(vocab_size=30, block_size=16, n_layer=3, n_head=2, n_embd=16)
        dp = DataParallel(model, bucket_mb=0.01, threads=2) if dist else None
        Trainer(model, optimizer=SGD(model, lr=0.1), quiet=True, distributed=dp).fit(data, max_steps=2,
                                                                                     batch_size=5)
        results.append(model.state_dict())
        if dp:
            assert len(dp.buckets) > 3 and dp.early_starts >= 2 * (len(dp.buckets) - 1)
            assert all(p.grad.base is dp.flat for p in model.parameters())
    for k in results[0]:
        np.testing.assert_array_equal(results[0][k], results[1][k])
