"""Randomized bad inputs for every public op, layer and model, and mutated model files for cpuformer.load, each run in
a child process (tests/fuzz_driver.py) so that a crash, an abort or a hang fails the test with the case that caused
it. A few thousand cases by default; CPUFORMER_FUZZ_LONG=1 runs 25 times as many (several minutes), and
CPUFORMER_FUZZ_SEED=N picks another stream."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

DRIVER = os.path.join(os.path.dirname(__file__), "fuzz_driver.py")
LONG = os.environ.get("CPUFORMER_FUZZ_LONG") == "1"
SEED = int(os.environ.get("CPUFORMER_FUZZ_SEED", "20261201"))
SCALE = 25 if LONG else 1


@pytest.mark.parametrize("kind,count", [("ops", 3000), ("layers", 2000), ("models", 1500), ("files", 1500),
                                        ("tokenizers", 1500)])
def test_bad_inputs_raise_clear_errors_never_crash(kind, count, tmp_path):
    if kind == "tokenizers":
        pytest.importorskip("tokenizers")  # the seed files are made with the reference library
    args = [sys.executable, DRIVER, kind, str(SEED), str(count * SCALE), str(tmp_path)]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=120 * SCALE)
    except subprocess.TimeoutExpired as exc:
        lines = (exc.stdout or b"").decode(errors="replace").strip().splitlines()
        pytest.fail(f"fuzz {kind} hung; last case: {lines[-1] if lines else '(none)'}")
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines or lines[-1] != "DONE":
        last = [line for line in lines if line.startswith("CASE")][-1:] or ["(none)"]
        how = f"signal {-out.returncode}" if out.returncode < 0 else f"exit {out.returncode}"
        tail = "\n".join(line for line in lines[-40:] if not line.startswith("CASE"))
        pytest.fail(f"fuzz {kind} (seed {SEED}): {how} at {last[0]}\n{tail}\n{out.stderr[-3000:]}")
