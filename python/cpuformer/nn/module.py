"""Parameter, Module and containers: the bookkeeping every layer shares.

A layer holds its weights as :class:`Parameter` objects (``.data`` and ``.grad``, float32 numpy arrays of one
shape), computes ``forward(...)`` (also ``__call__``), and ``backward(grad_output)`` returns the gradient with
respect to its input(s) while **accumulating** parameter gradients into ``.grad``. ``backward`` uses what the most
recent ``forward`` saved, so call them in pairs. Names in ``state_dict()`` follow PyTorch's, so weights move both
ways with ``load_state_dict``.
"""
from __future__ import annotations

import copy
import functools
import threading
from collections import OrderedDict
from typing import Dict, Iterator, List, NamedTuple, Tuple

import numpy as np

__all__ = ["Parameter", "Module", "Sequential", "ModuleList", "to_numpy", "check_grad_shape", "thread_state",
           "no_grad", "is_grad_enabled"]


class Parameter:
    """A trainable float32 array with its gradient (``grad`` starts at zero, same shape)."""

    __slots__ = ("data", "grad")

    def __init__(self, data) -> None:
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        self.grad = np.zeros_like(self.data)

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.data.shape

    def __repr__(self) -> str:
        return f"Parameter(shape={self.data.shape})"


def to_numpy(value, name: str = "value") -> np.ndarray:
    """Anything ``numpy.asarray`` reads (torch tensors included, also with requires_grad) as a numpy array."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{name}: expected numbers, got dtype {arr.dtype}")
    return arr


class _IncompatibleKeys(NamedTuple):
    missing_keys: List[str]
    unexpected_keys: List[str]


def check_grad_shape(grad: np.ndarray, expected: Tuple[int, ...], layer: str) -> None:
    """A gradient must have exactly its output's shape: a permutation of it (same size) would reshape silently."""
    if grad.shape != tuple(expected):
        raise ValueError(f"{layer}.backward: grad_output must have the forward output's shape {tuple(expected)}, "
                         f"got {grad.shape}")


class Workspace:
    """float32 arrays a layer reuses from step to step for what it keeps between forward and backward (and for
    scratch), never handed to the caller. Multi-megabyte arrays allocated fresh every step are returned to the OS
    when freed and page-faulted back on first touch, which costs several percent of a training step.

    Each thread has its own arrays: one eval-mode model called from several threads at once must not have two
    forwards writing one buffer (a thread's arrays are freed when the thread ends)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, shape: Tuple[int, ...]) -> np.ndarray:
        """An uninitialised (contents are this thread's previous step's) C-contiguous float32 array of ``shape``."""
        arrays = self._local.__dict__.setdefault("arrays", {})
        arr = arrays.get(name)
        if arr is None or arr.shape != shape:
            arr = arrays[name] = np.empty(shape, np.float32)
        return arr

    def __deepcopy__(self, memo) -> "Workspace":
        return Workspace()  # scratch, not state: a copy starts empty


class _PerThread(threading.local):
    """A module's per-thread state (copies and pickles start empty: it is scratch, not model state)."""

    def __deepcopy__(self, memo):
        return _PerThread()

    def __reduce__(self):
        return _PerThread, ()


_THREAD_STATE = threading.Lock()
_GRAD = threading.local()


class no_grad:
    """``with cpuformer.no_grad(): ...`` (or as a decorator): on this thread, eval-mode forwards keep nothing for
    ``backward``, as ``torch.no_grad()``: a float model's blocks then skip saving their activations (about 5% of a
    batch-1 encoder forward). Results are the same; a ``backward`` after such a forward raises. Training-mode
    forwards still keep what backward needs (their dropout is part of it). Nests; other threads are unaffected."""

    def __enter__(self) -> "no_grad":
        _GRAD.disabled = getattr(_GRAD, "disabled", 0) + 1
        return self

    def __exit__(self, *exc) -> None:
        _GRAD.disabled -= 1

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with no_grad():
                return fn(*args, **kwargs)
        return wrapper


def is_grad_enabled() -> bool:
    """False inside ``no_grad()`` on this thread."""
    return not getattr(_GRAD, "disabled", 0)


def thread_state(module) -> "_PerThread":
    """``module``'s per-thread namespace, for what a forward keeps for its backward: each thread sees its own
    attributes, so forwards from several threads never overwrite each other's."""
    state = module.__dict__.get("_thread_state")
    if state is None:
        with _THREAD_STATE:
            state = module.__dict__.get("_thread_state")
            if state is None:
                state = _PerThread()
                object.__setattr__(module, "_thread_state", state)
    return state


_TRAINING_CALLS = threading.Lock()  # guards the per-module training-call bookkeeping below


def _same_thread_backward(backward):
    """Wrap a layer's ``backward``: it must run in the thread whose training-mode forward it differentiates, or
    it would read what another thread's forward saved."""

    @functools.wraps(backward)
    def checked(self, *args, **kwargs):
        owner = self.__dict__.get("_forward_thread")
        if owner is not None and owner != threading.get_ident():
            raise RuntimeError(f"{type(self).__name__}.backward: the latest training-mode forward ran in another "
                               "thread; call forward and backward from one thread")
        return backward(self, *args, **kwargs)

    checked._checks_thread = True
    return checked


class Module:
    """Base class of layers and models (the PyTorch ``nn.Module`` conventions, without autograd)."""

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value) -> None:
        params = self.__dict__.get("_parameters")
        if params is None:
            raise AttributeError("call Module.__init__() before assigning attributes")
        params.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            params[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    # -- traversal ------------------------------------------------------------------------------------------------
    def named_parameters(self, prefix: str = "") -> Iterator[Tuple[str, Parameter]]:
        """``(name, Parameter)`` pairs with the ``state_dict()`` names, each parameter once."""
        seen = set()
        for name, module in self.named_modules(prefix):
            for pname, p in module._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{name}.{pname}" if name else pname), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def named_modules(self, prefix: str = "") -> Iterator[Tuple[str, "Module"]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def children(self) -> Iterator["Module"]:
        yield from self._modules.values()

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def num_parameters(self) -> int:
        return sum(p.data.size for p in self.parameters())

    # -- modes and gradients --------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad.fill(0.0)

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Parameter arrays by PyTorch-style name (the arrays themselves, not copies)."""
        return OrderedDict((name, p.data) for name, p in self.named_parameters())

    def load_state_dict(self, state_dict, strict: bool = True) -> _IncompatibleKeys:
        """Copy weights in by name. Accepts numpy arrays, torch tensors or anything ``numpy.asarray`` reads; shapes
        must match exactly and values must be finite. With ``strict`` (default), missing or unexpected keys raise
        ``KeyError``. Returns ``(missing_keys, unexpected_keys)``."""
        own: Dict[str, Parameter] = OrderedDict(self.named_parameters())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict for {type(self).__name__}: missing keys {missing}, "
                           f"unexpected keys {unexpected}")
        arrays = {}
        for name, p in own.items():  # check everything before changing anything
            if name not in state_dict:
                continue
            arr = to_numpy(state_dict[name], name)
            if not p.data.flags.writeable:
                raise RuntimeError(f"load_state_dict: {name} is read-only: the model is int8-quantized "
                                   f"(quantize_dynamic); load into the float model and quantize it again")
            if arr.shape != p.data.shape:
                raise ValueError(f"load_state_dict: {name} has shape {arr.shape}, expected {p.data.shape}")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise ValueError(f"load_state_dict: {name} contains non-finite values")
            arrays[name] = arr
        for name, arr in arrays.items():
            own[name].data[...] = arr
        return _IncompatibleKeys(missing, unexpected)

    # -- calling --------------------------------------------------------------------------------------------------
    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        backward = cls.__dict__.get("backward")
        if backward is not None and not getattr(backward, "_checks_thread", False):
            cls.backward = _same_thread_backward(backward)

    def __call__(self, *args, **kwargs):
        if not self.training:  # eval mode: nothing shared is written, any number of threads may call
            return self.forward(*args, **kwargs)
        # Training mode keeps what backward needs on the layers, so one forward at a time per module: a second
        # thread's forward would overwrite it. Refuse that rather than give silently wrong gradients.
        me = threading.get_ident()
        with _TRAINING_CALLS:
            owner, depth = self.__dict__.get("_training_call", (None, 0))
            if depth and owner != me:
                raise RuntimeError(f"{type(self).__name__}: a training-mode forward is already running in another "
                                   "thread; a model in training mode keeps what backward needs and can be used by "
                                   "one thread at a time (eval-mode forwards are thread-safe)")
            object.__setattr__(self, "_training_call", (me, depth + 1))
        try:
            return self.forward(*args, **kwargs)
        finally:
            with _TRAINING_CALLS:
                object.__setattr__(self, "_training_call", (me, self._training_call[1] - 1))
                object.__setattr__(self, "_forward_thread", me)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, grad_output):
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            child_repr = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child_repr}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"

    def clone(self) -> "Module":
        """A deep copy (independent weights), as PyTorch's stacks use for their layers."""
        return copy.deepcopy(self)


class Sequential(Module):
    """Modules applied in order; ``backward`` runs them in reverse. Children are named "0", "1", ..."""

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential: argument {i} is a {type(m).__name__}, not a Module")
            setattr(self, str(i), m)

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

    def backward(self, grad_output):
        for m in reversed(list(self._modules.values())):
            grad_output = m.backward(grad_output)
        return grad_output


class ModuleList(Module):
    """A list of modules, named "0", "1", ... in the state dict."""

    def __init__(self, modules=()) -> None:
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> None:
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList: expected a Module, got {type(module).__name__}")
        setattr(self, str(len(self._modules)), module)

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __iter__(self) -> Iterator[Module]:
        return iter(list(self._modules.values()))
