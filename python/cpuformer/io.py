"""Model and checkpoint files: safetensors format, read and written by our own code (no pickle, no dependency).

Format: 8-byte little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets"},
"__metadata__": {str: str}}``, then the raw little-endian C-order tensor bytes (offsets relative to the data
section). Files written here load in the official ``safetensors`` package and vice versa. Writes are atomic
(temporary file, fsync, rename), so a crash mid-write never damages an existing file.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import stat
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

__all__ = ["save_safetensors", "load_safetensors", "open_safetensors", "atomic_write_bytes", "SafetensorsError"]

_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
MAX_HEADER = 100 * 2**20


class SafetensorsError(ValueError):
    """A malformed or unsupported safetensors file."""


def _fsync_dir(path: str) -> None:
    """Make the folder's entries (a rename, a new or removed file) durable; a no-op where folders can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, chunks) -> None:
    """Write the byte chunks to ``path`` atomically: a temporary file in the same folder, fsync, rename, fsync of
    the folder. Readers see the old file or the complete new one, never a partial one.

    The file gets the permissions ``open(path, "wb")`` would give: ``0o666`` less the umask for a new file, the old
    file's mode when replacing one. The temporary file is ``.tmp-{pid}-{random}`` in the target's folder (the
    trainer removes those a killed process left behind)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, flags, 0o666)  # the kernel applies the umask, as for any new file
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"atomic_write_bytes: no free temporary name in {folder}")
    try:
        try:
            old_mode = stat.S_IMODE(os.stat(path).st_mode) & 0o777
        except OSError:
            old_mode = None
        if old_mode is not None and hasattr(os, "fchmod"):
            os.fchmod(fd, old_mode)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write named arrays (and string metadata) to a safetensors file, atomically."""
    arrays = {}
    for name, value in tensors.items():
        arr = np.asarray(value)
        if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
            arr = arr.copy(order="C")
        if arr.dtype not in _NAMES:
            raise TypeError(f"save_safetensors: {name} has unsupported dtype {arr.dtype}")
        arrays[str(name)] = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    # Largest item size first so every tensor is naturally aligned within the 8-byte-aligned data section.
    order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    header: Dict[str, object] = {}
    offset = 0
    for name in order:
        nbytes = arrays[name].nbytes
        header[name] = {"dtype": _NAMES[arrays[name].dtype], "shape": list(arrays[name].shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    chunks = [len(raw).to_bytes(8, "little"), raw] + [memoryview(arrays[n]).cast("B") for n in order]
    atomic_write_bytes(path, chunks)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true/false are Python bools, which are ints


def parse_json(raw: bytes, what: str):
    """Parse JSON from a file; anything malformed (bad UTF-8 or syntax, nesting deep enough to exhaust Python's
    recursion limit) is a :class:`SafetensorsError` naming ``what``."""
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SafetensorsError(f"{what} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None


def open_safetensors(path):
    """Memory-map a safetensors file, or a Hugging Face model directory (``model.safetensors``, or
    ``model.safetensors.index.json`` and its shards), without reading or copying the tensor data:
    a ``cpuformer._core.SafetensorsMap``.

    ``keys()``, ``len()``, ``name in m``, ``dtype(name)`` ("F32", "BF16", ...), ``shape(name)``, ``metadata()``
    (the files' ``__metadata__``), ``mapped_bytes``; ``tensor(name)`` is a read-only numpy array viewing the file's
    bytes (F16 as float16, BF16 as its raw uint16 bits, the F8 formats as uint8; an unaligned tensor of an old file
    is copied). Views keep the mapping open. Only the headers are read when opening; pages are loaded as they are
    touched. A malformed file or index raises ``ValueError`` naming the file and the tensor; a missing file,
    directory or shard ``FileNotFoundError``. The checks are the C++ runtime's (cpp/include/cpuformer/safetensors.h),
    plus for directories: shard names are plain file names inside it, and the shards hold exactly the tensors the
    index maps to them."""
    from . import _core  # on use: the rest of this module is pure Python

    return _core.SafetensorsMap.open(os.fspath(path))


def load_safetensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Read a safetensors file: ``(tensors, metadata)``. Every bound is checked (header length, offsets inside the
    data section, sizes matching shapes, no overlaps); a malformed file raises :class:`SafetensorsError`. Tensors
    are copied out, so unaligned data is fine."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size < 8:
                raise SafetensorsError(f"{path}: file too short for a safetensors header ({size} bytes)")
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER or 8 + n > size:
                raise SafetensorsError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
            header = parse_json(f.read(n), f"{path}: header")
            if not isinstance(header, dict):
                raise SafetensorsError(f"{path}: header must be a JSON object")
            data_size = size - 8 - n
            metadata = header.pop("__metadata__", {}) or {}
            if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
                raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
            spans = []
            tensors = {}
            for name, info in header.items():
                if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"}:
                    raise SafetensorsError(f"{path}: entry {name!r} is malformed")
                dtype = _DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
                if dtype is None:
                    raise SafetensorsError(f"{path}: {name}: unsupported dtype {info.get('dtype')!r}")
                shape, offsets = info.get("shape"), info.get("data_offsets")
                if (not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape)
                        or not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets))):
                    raise SafetensorsError(f"{path}: {name}: bad shape or data_offsets")
                begin, end = offsets
                count = math.prod(shape)  # Python integers: no overflow, however large the shape claims to be
                if not 0 <= begin <= end <= data_size:
                    raise SafetensorsError(f"{path}: {name}: data_offsets {offsets} outside the data section "
                                           f"({data_size} bytes)")
                if end - begin != count * np.dtype(dtype).itemsize:
                    raise SafetensorsError(f"{path}: {name}: {end - begin} bytes for shape {shape} of "
                                           f"{info['dtype']}")
                spans.append((begin, end, name))
                f.seek(8 + n + begin)
                buf = f.read(end - begin)
                tensors[name] = np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<")).astype(
                    dtype, copy=True).reshape(shape)
            spans.sort()
            for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
                if b1 < e0:
                    raise SafetensorsError(f"{path}: tensors {n0} and {n1} overlap")
            return tensors, dict(metadata)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SafetensorsError(f"{path}: cannot read ({exc})") from exc
