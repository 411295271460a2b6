"""graphopt.MatMulLowBit against a numpy reference (GroupQuantized.dequantize)."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.backends.ext.format import to_ext
from tests.runtime_ext.ext_support import (
    assert_close,
    ext_session,
    lowbit_model,
    random_quantized,
    reference,
    reference_int8,
)

pytestmark = pytest.mark.usefixtures("ext_library")


@pytest.fixture(autouse=True)
def _always_parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send every shape through the thread pool (small ones run inline by default)."""
    monkeypatch.setenv("GRAPHOPT_EXT_MIN_PARALLEL_MACS", "0")


BITS = (2, 3, 4, 8)
#: GRAPHOPT_EXT_ISA values: the best the CPU has, AVX2 only, the portable kernels.
ISAS = ("native", "avx2", "scalar")


def _use_isa(monkeypatch: pytest.MonkeyPatch, isa: str) -> None:
    if isa == "native":
        monkeypatch.delenv("GRAPHOPT_EXT_ISA", raising=False)
    else:
        monkeypatch.setenv("GRAPHOPT_EXT_ISA", isa)


# (A shape, N, group_size): K not a multiple of the group, N = 1, per-channel, groups not
# a multiple of 8 (generic path), batch dims, K below one packed block.
SHAPES = [
    ((1, 64), 8, 32),
    ((1, 100), 5, 32),
    ((1, 257), 1, 20),
    ((3, 100), 7, 16),
    ((64, 300), 33, 128),
    ((1, 96), 12, 96),
    ((2, 33), 3, 33),
    ((17, 129), 9, 64),
    ((2, 3, 72), 6, 24),
    ((1, 5), 4, 8),
    ((1, 1000), 13, 128),
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("a_shape,n,group_size", SHAPES)
@pytest.mark.parametrize("asymmetric", [False, True], ids=["sym", "zp"])
def test_matches_numpy_reference(
    monkeypatch: pytest.MonkeyPatch,
    bits: int,
    a_shape: tuple[int, ...],
    n: int,
    group_size: int,
    asymmetric: bool,
) -> None:
    k = a_shape[-1]
    rng = np.random.default_rng([bits, k, n, group_size, int(asymmetric)])
    q = random_quantized(rng, n, k, bits, group_size, asymmetric)
    bias = rng.standard_normal(n).astype(np.float32) if (k + n) % 2 else None
    model = lowbit_model(to_ext(q), a_shape, bias)
    a = rng.standard_normal(a_shape).astype(np.float32)
    expected, magnitude = reference(a.reshape(-1, k), q, bias)
    expected = expected.reshape(*a_shape[:-1], n)
    magnitude = magnitude.reshape(*a_shape[:-1], n)
    for isa in ISAS:
        _use_isa(monkeypatch, isa)
        for threads in (1, 2):
            (y,) = ext_session(model, threads).run(None, {"A": a})
            assert y.dtype == np.float32
            assert_close(y, expected, magnitude)


@pytest.mark.parametrize("bits", [2, 4])
def test_every_m_from_1_to_64(bits: int) -> None:
    """One session with a symbolic M; GEMV (M = 1) and the small-GEMM tiles (M % 4)."""
    rng = np.random.default_rng(bits)
    k, n = 200, 37
    q = random_quantized(rng, n, k, bits, 64, asymmetric=True)
    bias = rng.standard_normal(n).astype(np.float32)
    session = ext_session(lowbit_model(to_ext(q), ["M", k], bias), threads=2)
    for m in range(1, 65):
        a = rng.standard_normal((m, k)).astype(np.float32)
        expected, magnitude = reference(a, q, bias)
        (y,) = session.run(None, {"A": a})
        assert_close(y, expected, magnitude)


def test_large_gemv_two_threads_equals_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads split N only: each output is computed the same way."""
    rng = np.random.default_rng(7)
    k, n = 4096, 512
    q = random_quantized(rng, n, k, 4, 128, asymmetric=False)
    model = lowbit_model(to_ext(q), [1, k])
    monkeypatch.delenv("GRAPHOPT_EXT_MIN_PARALLEL_MACS")  # the default threshold: 2.1e6 >= 2e6
    a = rng.standard_normal((1, k)).astype(np.float32)
    (y1,) = ext_session(model, 1).run(None, {"A": a})
    (y2,) = ext_session(model, 2).run(None, {"A": a})
    np.testing.assert_array_equal(y1, y2)
    expected, magnitude = reference(a, q, None)
    assert_close(y2, expected, magnitude)


def test_empty_batch_gives_empty_output() -> None:
    rng = np.random.default_rng(3)
    q = random_quantized(rng, 5, 40, 4, 16, asymmetric=False)
    session = ext_session(lowbit_model(to_ext(q), ["M", 40]))
    (y,) = session.run(None, {"A": np.zeros((0, 40), np.float32)})
    assert y.shape == (0, 5)


def test_symbolic_dims_propagate_to_the_output() -> None:
    rng = np.random.default_rng(4)
    q = random_quantized(rng, 6, 40, 4, 16, asymmetric=False)
    session = ext_session(lowbit_model(to_ext(q), ["batch", "seq", 40]))
    assert session.get_outputs()[0].shape == ["batch", "seq", 6]


def test_ternary_codes() -> None:
    """Ternary weights are symmetric 2-bit codes in {1, 2, 3} (values -1, 0, 1)."""
    rng = np.random.default_rng(5)
    q = random_quantized(rng, 24, 130, 2, 32, asymmetric=False)
    q = type(q)(rng.integers(1, 4, size=q.codes.shape, dtype=np.uint8), q.scales, None, 2, 32)
    a = rng.standard_normal((1, 130)).astype(np.float32)
    expected, magnitude = reference(a, q, None)
    (y,) = ext_session(lowbit_model(to_ext(q), [1, 130]), 2).run(None, {"A": a})
    assert_close(y, expected, magnitude)


# (A shape, N, group_size): the int8 SIMD paths (bits 2/4/8, groups of whole words; N not
# a multiple of the 8-channel tile; M in blocks of four and a remainder) and the generic
# one (3-bit, group sizes that split a word, short last group).
INT8_SHAPES = [
    ((1, 256), 9, 64),
    ((2, 200), 6, 32),
    ((1, 96), 5, 32),
    ((3, 300), 5, 128),
    ((1, 4096), 33, 128),
    ((2, 100), 3, 20),
    ((2, 2, 130), 7, 64),
    ((64, 192), 4, 192),
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("a_shape,n,group_size", INT8_SHAPES)
@pytest.mark.parametrize("asymmetric", [False, True], ids=["sym", "zp"])
def test_int8_activations_match_their_numpy_emulation(
    monkeypatch: pytest.MonkeyPatch,
    bits: int,
    a_shape: tuple[int, ...],
    n: int,
    group_size: int,
    asymmetric: bool,
) -> None:
    """accuracy_level=4: the arithmetic of ``reference_int8``, bit for bit on every path."""
    k = a_shape[-1]
    rng = np.random.default_rng([bits, k, n, group_size, int(asymmetric), 4])
    q = random_quantized(rng, n, k, bits, group_size, asymmetric)
    bias = rng.standard_normal(n).astype(np.float32)
    ext = to_ext(q, accuracy_level=4)
    assert ext.attributes["accuracy_level"] == 4
    model = lowbit_model(ext, a_shape, bias)
    a = rng.standard_normal(a_shape).astype(np.float32)
    expected = reference_int8(a.reshape(-1, k), q, bias).reshape(*a_shape[:-1], n)
    exact, _ = reference(a.reshape(-1, k), q, bias)
    for isa in ISAS:
        _use_isa(monkeypatch, isa)
        for threads in (1, 2):
            (y,) = ext_session(model, threads).run(None, {"A": a})
            np.testing.assert_array_equal(y, expected)
    # And int8 activations stay close to the exact product (|a| rounding <= amax / 254).
    err = np.abs(y.reshape(-1, n) - exact).max() / np.abs(exact).max()
    assert err < 0.05, err


def test_int8_non_finite_activation_gives_nan() -> None:
    rng = np.random.default_rng(9)
    q = random_quantized(rng, 8, 128, 4, 64, asymmetric=False)
    session = ext_session(lowbit_model(to_ext(q, accuracy_level=4), [1, 128]))
    a = rng.standard_normal((1, 128)).astype(np.float32)
    a[0, 70] = np.inf
    (y,) = session.run(None, {"A": a})
    assert np.isnan(y).all()
