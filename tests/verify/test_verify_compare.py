"""Tolerance classes and output comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graphopt.errors import UsageError, VerificationError
from graphopt.verify.compare import (
    EXACT,
    FP16,
    FUSION,
    PRUNED,
    QUANTIZED,
    WEIGHT_ONLY,
    Agreement,
    compare_output,
    compare_outputs,
    json_float,
    merge_agreements,
    tolerance_for,
)


@pytest.fixture
def ref() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)


def test_presets_match_the_reliability_contract() -> None:
    assert (FUSION.rtol, FUSION.atol) == (1e-5, 1e-6)
    assert (FP16.rtol, FP16.atol, FP16.allow_new_nonfinite) == (1e-2, 1e-3, False)
    assert QUANTIZED.min_sqnr_db == 12.0
    assert WEIGHT_ONLY.min_sqnr_db == 3.0
    assert PRUNED.min_sqnr_db == -float("inf") and not PRUNED.allow_new_nonfinite
    assert tolerance_for(["quantized", "pruned", "weight-only"]) is PRUNED
    assert tolerance_for(["quantized", "weight-only"]) is WEIGHT_ONLY
    assert EXACT.bit_exact and not FUSION.bit_exact


def test_tolerance_for_returns_the_loosest() -> None:
    assert tolerance_for([]) is EXACT
    assert tolerance_for(["exact", "fusion", "exact"]) is FUSION
    assert tolerance_for(["fusion", "fp16"]) is FP16
    assert tolerance_for(["fp16", "quantized", "fusion"]) is QUANTIZED
    with pytest.raises(UsageError, match="unknown tolerance class 'int3'.*fusion"):
        tolerance_for(["int3"])


def test_exact(ref: np.ndarray) -> None:
    assert compare_output("y", ref, ref.copy(), EXACT).passed
    got = ref.copy()
    got[3, 4] = np.nextafter(got[3, 4], np.float32(np.inf))  # one ulp
    result = compare_output("y", ref, got, EXACT)
    assert not result.passed and result.mismatched == 1
    assert "bit-exact" in result.reason and "(3, 4)" in result.reason
    with_nan = ref.copy()
    with_nan[0, 0] = np.nan
    assert compare_output("y", with_nan, with_nan.copy(), EXACT).passed  # NaN == NaN
    assert not compare_output("y", with_nan, ref, EXACT).passed


def test_fusion(ref: np.ndarray) -> None:
    close = ref * np.float32(1 + 2e-6)
    result = compare_output("y", ref, close, FUSION)
    assert result.passed and result.reason == "" and result.max_rel < 1e-5
    assert not compare_output("y", ref, close, EXACT).passed
    far = ref.copy()
    far[1, 1] += 1e-3
    result = compare_output("y", ref, far, FUSION)
    assert not result.passed and result.mismatched == 1
    assert "rtol=1e-05" in result.reason and "(1, 1)" in result.reason


def test_fp16(ref: np.ndarray) -> None:
    half = ref.astype(np.float16).astype(np.float32)
    assert compare_output("y", ref, half, FP16).passed
    assert not compare_output("y", ref, half, FUSION).passed
    overflow = half.copy()
    overflow[2, 3] = np.inf
    result = compare_output("y", ref, overflow, FP16)
    assert not result.passed and result.new_nonfinite == 1
    assert "1 new NaN/Inf" in result.reason and "(2, 3)" in result.reason


def test_quantized_uses_sqnr(ref: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(ref.shape).astype(np.float32)
    scale = math.sqrt(float(np.sum(ref.astype(np.float64) ** 2)) / float(np.sum(noise**2.0)))
    at_40db = ref + noise * np.float32(scale * 10 ** (-40 / 20))
    at_8db = ref + noise * np.float32(scale * 10 ** (-8 / 20))
    good = compare_output("y", ref, at_40db, QUANTIZED)
    assert good.passed and good.sqnr_db == pytest.approx(40.0, abs=0.1)
    assert not compare_output("y", ref, at_40db, FUSION).passed
    bad = compare_output("y", ref, at_8db, QUANTIZED)
    assert not bad.passed and "SQNR 8.0 dB < 12 dB" in bad.reason


def test_sqnr_definition_and_identity(ref: np.ndarray) -> None:
    got = ref + np.float32(0.01)
    result = compare_output("y", ref, got, QUANTIZED)
    r = ref.astype(np.float64)
    expected = 10 * math.log10(np.sum(r**2) / np.sum((r - got.astype(np.float64)) ** 2))
    assert result.sqnr_db == pytest.approx(expected)
    same = compare_output("y", ref, ref.copy(), QUANTIZED)
    assert same.sqnr_db == math.inf and same.cosine == 1.0 and same.max_abs == 0.0


def test_integer_outputs_are_compared_exactly() -> None:
    ref = np.arange(10, dtype=np.int64)
    got = ref.copy()
    got[7] = 8
    for tol in (QUANTIZED, FP16, FUSION):
        result = compare_output("idx", ref, got, tol)
        assert not result.passed and result.mismatched == 1 and "compared exactly" in result.reason
    flags = np.array([True, False, True])
    assert compare_output("b", flags, flags.copy(), QUANTIZED).passed
    assert not compare_output("b", flags, ~flags, QUANTIZED).passed


def test_missing_extra_shape_and_dtype(ref: np.ndarray) -> None:
    agreement = compare_outputs(
        {"a": ref, "b": ref, "c": ref, "d": ref},
        {"a": ref, "c": ref[:, :8], "d": ref.astype(np.float16), "e": ref},
        FP16,
    )
    by_name = {o.name: o for o in agreement.outputs}
    assert by_name["a"].passed
    assert by_name["b"].reason == "missing in the candidate"
    assert by_name["c"].reason == "shape changed: (8, 16) -> (8, 8)"
    assert by_name["d"].reason == "dtype changed: float32 -> float16"
    assert "not in the reference" in by_name["e"].reason
    assert not agreement.passed and len(agreement.failed_outputs) == 4


def test_reference_nonfinite_must_be_reproduced(ref: np.ndarray) -> None:
    with_inf = ref.copy()
    with_inf[0, 0] = -np.inf
    assert compare_output("y", with_inf, with_inf.copy(), FUSION).passed
    result = compare_output("y", with_inf, ref, FUSION)
    assert not result.passed and "not reproduced" in result.reason


def test_agreement_summary_worst_and_merge(ref: np.ndarray) -> None:
    good = compare_outputs({"y": ref, "z": ref}, {"y": ref, "z": ref + np.float32(1e-7)}, FUSION)
    assert good.passed
    worst = good.worst()
    assert worst is not None and worst.name == "z"
    line = good.summary()
    assert line.startswith("PASS (fusion, 1 feed): 2 outputs agree; worst 'z'")
    assert "\n" not in line
    good.raise_for_failure()

    bad = compare_outputs({"y": ref, "z": ref}, {"y": ref, "z": ref + np.float32(1.0)}, FUSION)
    merged = merge_agreements([good, bad])
    assert not merged.passed and merged.samples == 2
    z = {o.name: o for o in merged.outputs}["z"]
    assert z.samples == 2 and z.max_abs == pytest.approx(1.0) and z.reason.startswith("feed 1:")
    assert merged.summary().startswith("FAIL (fusion, 2 feeds): 1 of 2 outputs differ; 'z'")
    with pytest.raises(VerificationError, match="'z'"):
        merged.raise_for_failure()

    errored = Agreement(tolerance=EXACT, error="candidate does not load: x")
    assert not errored.passed and errored.summary().endswith("candidate does not load: x")


def test_json_float() -> None:
    assert json_float(math.inf) == "inf"
    assert json_float(-math.inf) == "-inf"
    assert json_float(math.nan) is None
    assert json_float(None) is None
    assert json_float(1.5) == 1.5
