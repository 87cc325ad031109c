"""Dynamic int8 quantization of Linear layers for inference (the idea of ``torch.ao.quantization.quantize_dynamic``).

``quantize_dynamic(model)`` returns an eval-mode copy whose Linear weights (every ``Linear``, the packed Q/K/V
projection of ``MultiheadAttention``, and a language model's output head) are also held as int8, one scale per
output channel. At run time each activation row is quantized to 7-bit unsigned with its own scale and zero point,
the product accumulates exactly in int32 (AVX2 ``vpmaddubsw``), and the result is dequantized once; layer norm,
softmax, attention and activations stay float32. The float32 weights are kept (read-only, so the int8 copies cannot
go stale): ``state_dict()`` and ``cpuformer.save`` write them unchanged, and a loaded model is quantized again.

A quantized model is for inference only: a forward in training mode or any ``backward`` raises ``RuntimeError``.
Accuracy cost and speed beside float32: ``benchmarks/bench_inference.py`` and the README.
"""
from __future__ import annotations

from .. import _core
from .module import Module

__all__ = ["quantize_dynamic", "is_quantized"]


def quantize_dynamic(model: Module, inplace: bool = False) -> Module:
    """Quantize ``model``'s Linear weights to int8 (per output channel) for inference; returns the quantized model
    in eval mode (a copy unless ``inplace``)."""
    if not isinstance(model, Module):
        raise TypeError(f"quantize_dynamic: model must be a cpuformer Module, got {type(model).__name__}")
    if is_quantized(model):
        raise ValueError("quantize_dynamic: model is already quantized")
    target = model if inplace else model.clone()
    count = 0
    for _, module in target.named_modules():
        quantize = getattr(module, "_quantize_int8", None)
        if quantize is not None:
            count += quantize()
    if count == 0:
        raise ValueError(f"quantize_dynamic: {type(model).__name__} has no Linear weights to quantize")
    for p in target.parameters():
        p.data.flags.writeable = False  # an optimizer step or load_state_dict would leave the int8 copy stale
    return target.eval()


def is_quantized(model: Module) -> bool:
    """Whether any layer of ``model`` runs with int8 weights."""
    return any(getattr(m, "_int8", None) is not None for _, m in model.named_modules())


def quantize_weight(weight):
    return _core.quantize_weight_int8(weight)


def require_inference(module: Module) -> None:
    if module.training:
        raise RuntimeError(f"{type(module).__name__} has int8 weights (quantize_dynamic) and runs in inference only: "
                           f"call .eval(); training needs the float model")


def no_backward(module: Module) -> None:
    raise RuntimeError(f"{type(module).__name__}.backward: int8-quantized layers are inference-only; train the "
                       f"float model and quantize it afterwards")


def linear(x, weight, bias):
    """``x @ W^T + b`` with int8 weights; ``x`` float32, any leading axes."""
    return _core.linear_int8(x, weight, bias)
