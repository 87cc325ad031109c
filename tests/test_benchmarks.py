"""The benchmark scripts stay runnable: every name they import from cpuformer exists (a renamed private helper
broke benchmarks/bench_inference.py once, unnoticed, since no test runs the benchmarks: they take minutes and need
torch). Checked statically: each script is parsed, and each `import cpuformer...` / `from cpuformer... import ...`
in it is resolved against the installed package, without running the script."""
from __future__ import annotations

import ast
import importlib
import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
SCRIPTS = sorted(f for f in os.listdir(BENCH) if f.endswith(".py"))


def cpuformer_imports(path):
    """(module, names) for every cpuformer import in the file; names is empty for a plain `import`."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "cpuformer":
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "cpuformer":
                    yield a.name, []


def test_there_are_benchmarks():
    assert len(SCRIPTS) >= 10 and "bench_inference.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_imports_resolve(script):
    for module, names in cpuformer_imports(os.path.join(BENCH, script)):
        mod = importlib.import_module(module)
        for name in names:
            if not hasattr(mod, name):  # a submodule imported by name is fine
                importlib.import_module(f"{module}.{name}")


def test_a_missing_name_is_caught(tmp_path):
    """The check can fail: a script importing a name cpuformer does not have."""
    bad = tmp_path / "bench_bad.py"
    bad.write_text("def f():\n    from cpuformer.models.pretrained import _no_such_helper\n")
    (module, names), = cpuformer_imports(str(bad))
    mod = importlib.import_module(module)
    assert not hasattr(mod, names[0])
    with pytest.raises(ImportError):
        importlib.import_module(f"{module}.{names[0]}")
