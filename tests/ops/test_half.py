"""16-bit (bf16/f16) weights (cpuformer/half.h): conversions and products against float64 NumPy references."""
from __future__ import annotations

import numpy as np
import pytest

from cpuformer import _core
from testutil import SIMD_PATHS, assert_same_in_threads

KINDS = ["bf16", "f16"]


def to_f64(u16, kind):
    """The exact value of each 16-bit pattern, independently of the library."""
    u16 = np.asarray(u16, np.uint16)
    with np.errstate(invalid="ignore"):  # signalling NaN patterns
        if kind == "bf16":
            return (u16.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return u16.view(np.float16).astype(np.float64)


def to_half_ref(a, kind):
    """Round to nearest even (NumPy's float16 cast; bf16 by integer rounding of the float32 bits)."""
    a = np.asarray(a, np.float32)
    if kind == "f16":
        return a.astype(np.float16).view(np.uint16)
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(a), ((bits >> 16) | 0x40).astype(np.uint16), rounded)


def random_half(rng, shape, kind, scale=1.0):
    return to_half_ref(rng.standard_normal(shape).astype(np.float32) * scale, kind)


def check_product(y, x, w64, bias, what):
    """y against x w64^T + bias in float64, each element judged against the size of the terms it sums."""
    x64 = x.astype(np.float64)
    ref = x64 @ w64.T
    mag = np.abs(x64) @ np.abs(w64).T
    if bias is not None:
        ref = ref + bias
        mag = mag + np.abs(bias.astype(np.float64))
    assert y.shape == ref.shape, what
    err = np.abs(y.astype(np.float64) - ref) / (mag + 1e-30)
    assert err.max() < 1e-5, f"{what}: max error {err.max():.3g} of the terms' size"


# ---------------------------------------------------------------------------------------------------------------
# Conversions


@pytest.mark.parametrize("kind", KINDS)
def test_half_to_float_every_value(simd, kind):
    everything = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    padded = np.concatenate([[0], everything]).astype(np.uint16)[1:]  # 2-byte but not 16-byte aligned, like mmap'd data
    assert padded.ctypes.data % 16 != 0
    got = _core.half_to_float(padded, kind)
    assert got.dtype == np.float32 and got.shape == (65536,)
    ref = to_f64(everything, kind)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(got[~nan].astype(np.float64), ref[~nan])
    np.testing.assert_array_equal(np.signbit(got[~nan]), np.signbit(ref[~nan]))  # -0 stays -0
    assert np.isnan(got[nan]).all()
    if kind == "bf16":  # bits << 16 exactly, NaN payloads included
        np.testing.assert_array_equal(got.view(np.uint32), everything.astype(np.uint32) << 16)
    # Every path gives the same bits (the scalar f16 path quiets NaN as F16C does).
    _core.set_simd_path("scalar")
    np.testing.assert_array_equal(_core.half_to_float(padded, kind).view(np.uint32), got.view(np.uint32))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 15, 16, 17, 31, 100])
def test_half_to_float_short_and_shaped(simd, rng, kind, n):
    h = random_half(rng, (n,), kind)
    np.testing.assert_array_equal(_core.half_to_float(h, kind), to_f64(h, kind).astype(np.float32))
    h3 = random_half(rng, (2, 3, n), kind)
    out = _core.half_to_float(h3, kind)
    assert out.shape == (2, 3, n)
    np.testing.assert_array_equal(out, to_f64(h3, kind).astype(np.float32))


@pytest.mark.parametrize("kind", KINDS)
def test_float_to_half_rounds_to_nearest_even(rng, kind):
    x = np.concatenate([
        (rng.standard_normal(5000) * 10.0 ** rng.integers(-9, 6, 5000)).astype(np.float32),
        rng.integers(0, 2**32, 5000, dtype=np.uint64).astype(np.uint32).view(np.float32),  # any bits, NaN included
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519, 65520, -65520, 2.0**-24, 2.0**-25, 3 * 2.0**-25,
                  2.0**-14 - 2.0**-25, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8,
                  np.finfo(np.float32).max, np.finfo(np.float32).tiny], np.float32)], dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = to_half_ref(x, kind)
    got = _core.float_to_half(x, kind)
    assert got.dtype == np.uint16 and got.shape == x.shape
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], ref[~nan])
    assert np.isnan(to_f64(got[nan], kind)).all()
    # Round trip of every non-NaN pattern.
    everything = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    values = _core.half_to_float(everything, kind)
    keep = ~np.isnan(values)
    np.testing.assert_array_equal(_core.float_to_half(values, kind)[keep], everything[keep])


# ---------------------------------------------------------------------------------------------------------------
# Products

# (in, out): tiny, odd, one of them 1, and one over the converted-block path's K block (1024).
SHAPES = [(1, 1), (1, 7), (7, 1), (7, 33), (33, 7), (300, 1), (1, 300), (65, 129), (300, 300), (1100, 70)]


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 17, 130])
@pytest.mark.parametrize("in_out", [False, True], ids=["out_in", "in_out"])
@pytest.mark.parametrize("kind", KINDS)
def test_linear_half(simd, threads, rng, kind, in_out, rows):
    for i, (n_in, n_out) in enumerate(SHAPES):
        if rows == 130 and n_in * n_out > 300 * 70:
            continue  # the float64 reference stays quick
        h = random_half(rng, (n_in, n_out) if in_out else (n_out, n_in), kind)
        x = rng.standard_normal((rows, n_in)).astype(np.float32)
        bias = rng.standard_normal(n_out).astype(np.float32) if i % 2 == 0 else None
        y = _core.linear_half(x, h, bias, kind, in_out=in_out)
        assert y.dtype == np.float32
        w64 = to_f64(h, kind)
        check_product(y, x, w64.T if in_out else w64, bias, f"{kind} rows={rows} in={n_in} out={n_out} in_out={in_out}")


@pytest.mark.parametrize("kind", KINDS)
def test_linear_half_leading_dims_and_large_values(simd, rng, kind):
    # x of rank 3 flattens to rows; f16 weights near the top of their range and subnormal ones mixed in.
    h = random_half(rng, (40, 24), kind, scale=1e4 if kind == "f16" else 1e20)
    h[0, :5] = to_half_ref(np.array([6e-8, -6e-8, 1e-5, 0.0, -0.0], np.float32), kind)
    x = rng.standard_normal((2, 3, 24)).astype(np.float32)
    y = _core.linear_half(x, h, None, kind)
    assert y.shape == (2, 3, 40)
    check_product(y.reshape(6, 40), x.reshape(6, 24), to_f64(h, kind), None, kind)


@pytest.mark.parametrize("in_out", [False, True], ids=["out_in", "in_out"])
def test_linear_half_keeps_float32_activations(simd, threads, rng, in_out):
    """16+ rows of bf16 weights (AMX tiles where the CPU has them: the activations split exactly into three bf16
    terms) are the float32 product: with few terms per output, no error above float32 rounding; a bf16 rounding or
    truncation of the activations would show as 2^-9 or 2^-16 of the terms' size."""
    for rows, n_in, n_out in [(48, 1, 20), (40, 3, 33), (17, 7, 64), (130, 2, 100)]:
        x = (rng.standard_normal((rows, n_in)) * np.exp(rng.uniform(-20, 20, (rows, 1)))).astype(np.float32)
        h = random_half(rng, (n_in, n_out) if in_out else (n_out, n_in), "bf16")
        y = _core.linear_half(x, h, None, "bf16", in_out=in_out)
        w64 = to_f64(h, "bf16")
        w64 = w64.T if in_out else w64
        ref = x.astype(np.float64) @ w64.T
        mag = np.abs(x.astype(np.float64)) @ np.abs(w64).T
        err = np.abs(y - ref) / (mag + 1e-300)
        assert err.max() < n_in * 2.0 ** -23, f"rows={rows} in={n_in}: {err.max():.3g}"


@pytest.mark.parametrize("rows", [1, 4, 5, 17, 64, 130])
@pytest.mark.parametrize("in_out", [False, True], ids=["out_in", "in_out"])
@pytest.mark.parametrize("kind", KINDS)
def test_linear_half_bf16_activations(simd, threads, rng, kind, in_out, rows):
    """bf16_activations=True: the activations are rounded to bf16 (nearest even, as PyTorch's bf16 tensors hold
    them) and exactly those values are multiplied (AMX: one tile product instead of three). Against the float64
    product of the rounded activations; and visibly not the float32-activation product."""
    for n_in, n_out in [(7, 33), (96, 40), (300, 70), (1100, 20)]:
        h = random_half(rng, (n_in, n_out) if in_out else (n_out, n_in), kind)
        x = rng.standard_normal((rows, n_in)).astype(np.float32)
        x[0, : min(3, n_in)] = np.array([1.00390625, 1.01171875, -2.00781250], np.float32)[: min(3, n_in)]  # ties
        bias = rng.standard_normal(n_out).astype(np.float32)
        y = _core.linear_half(x, h, bias, kind, in_out, True)
        w64 = to_f64(h, kind)
        w64 = w64.T if in_out else w64
        rounded = to_f64(to_half_ref(x, "bf16"), "bf16").astype(np.float32)
        what = f"{kind} rows={rows} in={n_in} out={n_out} in_out={in_out}"
        check_product(y, rounded, w64, bias, what)
        full = _core.linear_half(x, h, bias, kind, in_out, False)
        ref = x.astype(np.float64) @ w64.T + bias
        mag = np.abs(x.astype(np.float64)) @ np.abs(w64).T + np.abs(bias)
        assert (np.abs(y - ref) / mag).max() > 2.0 ** -14 > (np.abs(full - ref) / mag).max(), what


def test_linear_half_bf16_activations_non_finite(simd, rng):
    x = rng.standard_normal((40, 50)).astype(np.float32)
    x[3, 7], x[5, 0], x[9, 49] = np.inf, -np.inf, np.nan
    x[11, 11] = np.float32(3.4e38)  # rounds up past bf16's largest finite: inf, as torch's bf16 cast gives
    h = random_half(rng, (30, 50), "bf16")
    y = _core.linear_half(x, h, None, "bf16", False, True)
    bad = {3, 5, 9, 11}
    for r in range(40):
        assert np.isfinite(y[r]).all() == (r not in bad), r
    assert np.isnan(y[9]).all()


def test_linear_half_non_finite_activations(simd, rng):
    # inf, -inf, NaN and float32's extremes in the activations: the same classes of result as the float32 product.
    x = rng.standard_normal((40, 50)).astype(np.float32)
    x[3, 7], x[5, 0], x[9, 49], x[11, 11] = np.inf, -np.inf, np.nan, np.float32(3.4e38)
    x[13, :] = np.float32(1e-40)  # subnormal
    h = random_half(rng, (30, 50), "bf16")
    y = _core.linear_half(x, h, None, "bf16")
    with np.errstate(all="ignore"):
        ref = (x.astype(np.float64) @ to_f64(h, "bf16").T).astype(np.float32)
    rest = np.arange(40) != 11  # 3.4e38 times the weights may overflow in partial sums, in any order
    np.testing.assert_array_equal(np.isnan(y[rest]), np.isnan(ref[rest]))
    np.testing.assert_array_equal(np.isinf(y[rest]), np.isinf(ref[rest]))
    fine = np.isfinite(ref) & (np.abs(ref) < 1e30) & rest[:, None]
    np.testing.assert_allclose(y[fine], ref[fine], rtol=1e-4, atol=1e-3)


@pytest.mark.skipif("amx" not in SIMD_PATHS, reason="no AMX on this CPU or build")
def test_linear_half_swapped_rows_equal_the_unswapped_product(threads, rng):
    """96-256 rows of bf16 weights (N >= rows / 2, K a multiple of 32) run swapped on AMX tiles, the weights' rows
    read by the tiles in place: the same three term products in the same order, so each row's bits equal those of a
    300-row call (not swapped); and within float32 rounding of the float64 product, non-finite values as there."""
    cases = [(97, 96, 400), (128, 64, 1030), (200, 2080, 401), (256, 128, 130), (96, 64, 48), (130, 100, 300)]
    for rows, n_in, n_out in cases:  # the last (K=100): not swapped
        h = random_half(rng, (n_out, n_in), "bf16")
        x = rng.standard_normal((300, n_in)).astype(np.float32)
        x[7, 3], x[20, 0] = np.inf, np.nan
        h[5, 1] = to_half_ref(np.array([np.inf], np.float32), "bf16")[0]
        bias = rng.standard_normal(n_out).astype(np.float32)
        big = _core.linear_half(x, h, bias, "bf16")
        y = _core.linear_half(np.ascontiguousarray(x[:rows]), h, bias, "bf16")
        assert y.tobytes() == big[:rows].tobytes(), f"rows={rows} in={n_in} out={n_out}"
        fine = np.isfinite(x[:rows]).all(axis=1)
        w = to_f64(h, "bf16")
        ok = np.arange(n_out) != 5
        check_product(y[fine][:, ok], x[:rows][fine], w[ok], bias[ok], f"rows={rows} in={n_in} out={n_out}")
        assert np.isnan(y[20]).all() and not np.isfinite(y[7]).any() and not np.isfinite(y[:, 5]).any()


@pytest.mark.skipif("amx" not in SIMD_PATHS, reason="no AMX on this CPU or build")
def test_linear_half_swapped_concurrent_callers(rng):
    # The swapped bf16 product from several threads at once (each packs its own x^T): their serial results.
    runs = []
    for i in range(4):
        h = random_half(rng, (400 + 32 * i, 128), "bf16")
        x = rng.standard_normal((100 + 9 * i, 128)).astype(np.float32)
        runs.append(lambda x=x, h=h: _core.linear_half(x, h, None, "bf16"))
    assert_same_in_threads(runs, repeats=10)


def test_linear_half_concurrent_callers(rng):
    # Many threads in the converted-block path at once (each has its own block buffer, and its own buffer of
    # bf16-rounded activations) give their serial results.
    runs = []
    for i in range(6):
        n_in, n_out = 200 + 37 * i, 150 + 11 * i
        h = random_half(rng, (n_out, n_in), "bf16")
        x = rng.standard_normal((9 + i, n_in)).astype(np.float32)
        runs.append(lambda x=x, h=h, act=i % 2 == 1: _core.linear_half(x, h, None, "bf16", False, act))
    assert_same_in_threads(runs, repeats=20)


# ---------------------------------------------------------------------------------------------------------------
# Embedding


@pytest.mark.parametrize("kind", KINDS)
def test_embedding_half(simd, threads, rng, kind):
    for V, C in [(1, 1), (5, 3), (50, 37), (1000, 256)]:
        table = random_half(rng, (V, C), kind)
        ids = rng.integers(0, V, (2, 7))
        out = _core.embedding_half(ids, table, kind)
        assert out.shape == (2, 7, C) and out.dtype == np.float32
        np.testing.assert_array_equal(out, to_f64(table, kind)[ids].astype(np.float32))


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs(rng):
    h = random_half(rng, (5, 7), "bf16")
    x = rng.standard_normal((3, 7)).astype(np.float32)
    with pytest.raises(ValueError, match="kind"):
        _core.half_to_float(h, "fp8")
    with pytest.raises(ValueError, match="kind"):
        _core.linear_half(x, h, None, "float16")
    with pytest.raises(TypeError, match="a must be uint16"):
        _core.half_to_float(h.astype(np.int16), "bf16")
    with pytest.raises(TypeError, match="a must be uint16"):
        _core.half_to_float(h.view(np.float16), "f16")
    with pytest.raises(TypeError, match="a must be float32"):
        _core.float_to_half(x.astype(np.float64), "bf16")
    with pytest.raises(TypeError, match="weight must be uint16"):
        _core.linear_half(x, to_f64(h, "bf16").astype(np.float32), None, "bf16")
    with pytest.raises(TypeError, match="x must be float32"):
        _core.linear_half(x.astype(np.float64), h, None, "bf16")
    with pytest.raises(ValueError, match="in_features 5"):
        _core.linear_half(x, h, None, "bf16", in_out=True)  # (5, 7) as (in, out) wants x (..., 5)
    with pytest.raises(ValueError, match="in_features"):
        _core.linear_half(x[:, :6].copy(), h, None, "bf16")
    with pytest.raises(ValueError, match="bias must have shape"):
        _core.linear_half(x, h, np.zeros(7, np.float32), "bf16")
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        _core.linear_half(x, h.reshape(-1), None, "bf16")
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.linear_half(x, np.asfortranarray(random_half(rng, (7, 7), "bf16")), None, "bf16")
    table = random_half(rng, (4, 3), "f16")
    with pytest.raises(IndexError, match="out of range"):
        _core.embedding_half(np.array([0, 4]), table, "f16")
    with pytest.raises(IndexError, match="out of range"):
        _core.embedding_half(np.array([-1]), table, "f16")
    with pytest.raises(TypeError, match="ids must be int64"):
        _core.embedding_half(np.array([0], np.int32), table, "f16")
    with pytest.raises(TypeError, match="table must be uint16"):
        _core.embedding_half(np.array([0]), table.view(np.float16), "f16")
    with pytest.raises(ValueError, match="table must have 2 dimensions"):
        _core.embedding_half(np.array([0]), table.reshape(-1), "f16")
