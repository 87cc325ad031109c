"""The README's custom-layer example (section "Writing a layer") runs as written, and its hand-written backward
matches finite differences: the example cannot rot."""
from __future__ import annotations

import os
import re

import numpy as np

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def readme_example() -> str:
    text = open(README, encoding="utf-8").read()
    section = text[text.index("### Writing a layer"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_custom_layer_runs_and_its_gradients_are_right():
    scope: dict = {}
    exec(compile(readme_example(), "README.md (Writing a layer)", "exec"), scope)
    y, dx, model = scope["y"], scope["dx"], scope["model"]
    assert y.shape == (2, 5, 4) and dx.shape == (2, 5, 8)
    swish = scope["Swish"](3)
    swish.beta.data[:] = [0.5, 1.0, 2.0]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3)).astype(np.float64)
    g = rng.standard_normal((4, 3))
    swish(x)
    dx = swish.backward(g)

    def loss(x_, beta):
        return float((g * x_ / (1 + np.exp(-beta * x_))).sum())

    eps = 1e-4
    beta = swish.beta.data.astype(np.float64)
    num_dx = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        d = np.zeros_like(x)
        d[i] = eps
        num_dx[i] = (loss(x + d, beta) - loss(x - d, beta)) / (2 * eps)
    num_db = np.array([(loss(x, beta + e) - loss(x, beta - e)) / (2 * eps) for e in np.eye(3) * eps])
    np.testing.assert_allclose(dx, num_dx, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(swish.beta.grad, num_db, rtol=1e-3, atol=1e-4)
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "1.beta", "2.weight", "2.bias"]
