"""Dynamic int8 quantization of Linear layers for inference (the idea of ``torch.ao.quantization.quantize_dynamic``).

``quantize_dynamic(model)`` returns an eval-mode copy whose Linear weights (every ``Linear``, the packed Q/K/V
projection of ``MultiheadAttention``, and a language model's output head) are also held as int8, one scale per
output channel. At run time each activation row is quantized to 7-bit unsigned with its own scale and zero point,
the product accumulates exactly in int32 (AVX2 ``vpmaddubsw``), and the result is dequantized once; layer norm,
softmax, attention and activations stay float32. The float32 weights are kept (read-only, so the int8 copies cannot
go stale): ``state_dict()`` and ``cpuformer.save`` write them unchanged, and a loaded model is quantized again.

A quantized model is for inference only: a forward in training mode or any ``backward`` raises ``RuntimeError``.

``freeze(model)`` is the float32 counterpart: the same weights packed once into the GEMM kernel's layout.
Accuracy cost and speed beside float32: ``benchmarks/bench_inference.py`` and the README.
"""
from __future__ import annotations

from .. import _core, ops
from .module import Module

__all__ = ["quantize_dynamic", "freeze", "is_quantized", "is_frozen"]


def _prepare(model: Module, inplace: bool, make, what: str) -> Module:
    if not isinstance(model, Module):
        raise TypeError(f"{what}: model must be a cpuformer Module, got {type(model).__name__}")
    if is_frozen(model):
        raise ValueError(f"{what}: model is already {'quantized' if is_quantized(model) else 'frozen'}")
    target = model if inplace else model.clone()
    count = 0
    for _, module in target.named_modules():
        prepare = getattr(module, "_freeze_weights", None)
        if prepare is not None:
            count += prepare(make)
    if count == 0:
        raise ValueError(f"{what}: {type(model).__name__} has no Linear weights to prepare")
    for p in target.parameters():
        p.data.flags.writeable = False  # an optimizer step or load_state_dict would leave the copies stale
    return target.eval()


def quantize_dynamic(model: Module, inplace: bool = False) -> Module:
    """Quantize ``model``'s Linear weights to int8 (per output channel) for inference; returns the quantized model
    in eval mode (a copy unless ``inplace``)."""
    return _prepare(model, inplace, _core.quantize_weight_int8, "quantize_dynamic")


def freeze(model: Module, inplace: bool = False, amx_tiles: bool = True) -> Module:
    """Float32 inference: every Linear weight packed once into the GEMM kernel's panel layout (a product otherwise
    repacks its weight on every call), weights made read-only; inference-only like :func:`quantize_dynamic`.
    Returns an eval-mode copy unless ``inplace``.

    On the ``"amx"`` SIMD path (Sapphire Rapids and later) a weight's first product of 128 rows or more also splits
    it once into AMX tile terms, kept for every such product (1.5x the float32 weight's bytes): float32-precision
    products within 1e-5 of the float model's. With ``amx_tiles=False``, or elsewhere, the results are the float
    model's (bitwise for more than 4 rows; a few ulp for 1-4 rows)."""
    if not isinstance(amx_tiles, bool):
        raise TypeError(f"freeze: amx_tiles must be True or False, got {type(amx_tiles).__name__}")
    return _prepare(model, inplace, lambda w: _core.pack_linear_weight(w, amx_tiles), "freeze")


def is_quantized(model: Module) -> bool:
    """Whether any layer of ``model`` runs with int8 weights."""
    return any(_kinds(m) & {_core.Int8Weight} for _, m in model.named_modules())


def is_frozen(model: Module) -> bool:
    """Whether ``model`` was prepared by :func:`freeze` or :func:`quantize_dynamic`."""
    return any(_kinds(m) for _, m in model.named_modules())


def _kinds(module) -> set:
    frozen = getattr(module, "_frozen", None)
    if frozen is None:
        return set()
    return {type(v) for v in frozen.values()} if isinstance(frozen, dict) else {type(frozen)}


def same_kind(example, weight):
    """``weight`` prepared the way ``example`` was."""
    if isinstance(example, _core.Int8Weight):
        return _core.quantize_weight_int8(weight)
    return _core.pack_linear_weight(weight, example.amx_tiles)


def require_inference(module: Module) -> None:
    if module.training:
        raise RuntimeError(f"{type(module).__name__} has weights prepared for inference (quantize_dynamic / freeze) "
                           f"and runs in inference only: call .eval(); training needs the float model")


def no_backward(module: Module) -> None:
    raise RuntimeError(f"{type(module).__name__}.backward: quantized or frozen layers are inference-only; train the "
                       f"float model and prepare it afterwards")


def linear(x, prepared, bias, weight, out=None):
    """``x @ W^T + b`` with a prepared weight; ``x`` float32, any leading axes; ``weight`` is the float original
    (a product of 1-4 rows reads it directly: streaming W once beats the panel kernel there). ``out``: a buffer of
    the result's shape to write into (ignored, and a new array returned, on the 1-4 row path)."""
    if isinstance(prepared, _core.Int8Weight):
        return _core.linear_int8(x, prepared, bias, out)
    if x.size // x.shape[-1] <= 4:
        return ops.matmul(x, weight, transpose_b=True, bias=bias)
    return _core.linear_packed(x, prepared, bias, out)
