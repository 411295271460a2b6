"""Observers: exactness, robustness on pathological streams, constant memory, merge, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.errors import CalibrationError, UsageError
from graphopt.quant import (
    ACT_S8_SYM,
    ACT_U8_ASYM,
    OBSERVERS,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    QuantSpec,
    compute_qparams,
    fake_quantize,
    make_observer,
    sqnr_db,
)
from graphopt.quant.mse import expected_error

FILL = np.float32(-3.4028235e38)  # torch.finfo(float32).min, the attention-mask fill

HIST_OBSERVERS: list[tuple[str, dict[str, object]]] = [
    ("percentile", {}),
    ("entropy", {}),
    ("entropy", {"symmetric": True}),
    ("mse", {}),
    ("mse", {"spec": ACT_S8_SYM}),
]
ALL_OBSERVERS: list[tuple[str, dict[str, object]]] = [("minmax", {}), *HIST_OBSERVERS]


def _range(obs: Observer) -> tuple[float, float]:
    lo, hi = obs.range()
    return float(lo), float(hi)


def _stream(obs: Observer, batches: list[np.ndarray]) -> Observer:
    for b in batches:
        obs.update(b)
    return obs


# ----------------------------------------------------------------------------- minmax
def test_minmax_is_exact_per_tensor() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((3, 7)).astype(np.float32) * i for i in range(1, 9)]
    obs = _stream(MinMaxObserver(value_name="x"), batches)
    data = np.concatenate([b.reshape(-1) for b in batches])
    assert _range(obs) == (float(data.min()), float(data.max()))
    assert obs.range()[0].shape == ()


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_minmax_per_channel(axis: int) -> None:
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((4, 5, 6)).astype(np.float32) for _ in range(5)]
    obs = _stream(MinMaxObserver(axis=axis), batches)
    stacked = np.stack(batches)
    ax = axis % 3 + 1
    others = tuple(i for i in range(4) if i != ax)
    lo, hi = obs.range()
    np.testing.assert_array_equal(lo, stacked.min(axis=others))
    np.testing.assert_array_equal(hi, stacked.max(axis=others))
    qp = obs.qparams(ACT_U8_ASYM.with_axis(axis))
    assert qp.scale.shape == (stacked.shape[ax],)


def test_minmax_channel_errors_name_value_and_sample() -> None:
    obs = MinMaxObserver(axis=1, value_name="conv1.out")
    obs.update(np.zeros((2, 3)))
    with pytest.raises(CalibrationError, match=r"'conv1.out' sample 5: has 4 channels"):
        obs.update(np.zeros((2, 4)), sample=5)
    with pytest.raises(CalibrationError, match="no channel axis 1"):
        obs.update(np.zeros(3), sample=6)


def test_minmax_keeps_the_mask_fill() -> None:
    x = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    x[::10] = FILL
    obs = _stream(MinMaxObserver(), [x])
    assert _range(obs)[0] == float(FILL)
    assert float(obs.qparams(ACT_U8_ASYM).scale) > 1e36  # what collapses ORT's static QDQ


# ------------------------------------------------------------------------ percentile
@pytest.mark.parametrize("dist", ["normal", "uniform", "lognormal", "relu"])
def test_percentile_matches_numpy_on_large_samples(dist: str) -> None:
    rng = np.random.default_rng(3)
    n = 200_000
    data = {
        "normal": rng.standard_normal(n),
        "uniform": rng.uniform(-2, 5, n),
        "lognormal": rng.lognormal(0, 1, n),
        "relu": np.maximum(rng.standard_normal(n), 0),
    }[dist].astype(np.float32)
    for p in (99.0, 99.9, 99.99):
        obs = _stream(PercentileObserver(p), np.array_split(data, 16))
        lo, hi = _range(obs)
        width = (obs.histogram.hi - obs.histogram.lo) / obs.histogram.num_bins
        assert abs(lo - np.percentile(data, 100 - p)) <= 2 * width
        assert abs(hi - np.percentile(data, p)) <= 2 * width


def test_percentile_100_is_minmax_of_the_bins() -> None:
    x = np.random.default_rng(4).standard_normal(1000)
    obs = _stream(PercentileObserver(100.0), [x])
    assert _range(obs) == (x.min(), x.max())
    with pytest.raises(UsageError, match="percentile"):
        PercentileObserver(40.0)


# ------------------------------------------------------------------- entropy and MSE
def test_percentile_and_entropy_clip_rare_outliers_and_minmax_does_not() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal(100_000).astype(np.float32)
    x[30_000:30_005] = 60.0  # rare, binned (not separated by a 2**16 gap), third batch
    batches = np.array_split(x, 8)
    for name, kwargs in HIST_OBSERVERS:
        if name == "mse":
            continue
        first = _stream(make_observer(name, **kwargs), batches)
        lo, hi = _range(first)
        assert 3.0 < hi < 12.0 and -12.0 < lo < -3.0, (name, kwargs, lo, hi)
        # A second pass keeps the full resolution (the first one widened 16x).
        assert isinstance(first, HistogramObserver)
        second = first.second_pass()
        assert second.num_updates == 0 and second.histogram.total == 0
        lo, hi = _range(_stream(second, batches))
        assert 3.0 < hi < 6.0 and -6.0 < lo < -3.0, (name, kwargs, lo, hi)
    assert _range(_stream(MinMaxObserver(), batches))[1] == 60.0


@pytest.mark.parametrize("spec", [ACT_U8_ASYM, ACT_S8_SYM])
def test_mse_has_the_smallest_true_error(spec: QuantSpec) -> None:
    rng = np.random.default_rng(12)
    x = rng.standard_normal(100_000).astype(np.float32)
    x[30_000:30_005] = 60.0  # MSE keeps these: clipping them costs more than rounding
    x[50_000] = 12.0
    batches = np.array_split(x, 8)

    def true_mse(obs: Observer) -> float:
        return float(np.mean((x - fake_quantize(x, obs.qparams(spec), spec)) ** 2))

    mse = true_mse(_stream(MSEObserver(spec), batches))
    for name, kwargs in [("minmax", {}), ("percentile", {}), ("entropy", {})]:
        assert mse <= true_mse(_stream(make_observer(name, **kwargs), batches)) * 1.01, name


def test_entropy_symmetric_range_is_symmetric_inside_the_data() -> None:
    x = np.random.default_rng(6).laplace(size=50_000)
    lo, hi = _range(_stream(EntropyObserver(symmetric=True), [x]))
    t = max(-lo, hi)
    assert lo == max(x.min(), -t) and hi == min(x.max(), t)
    assert t < max(-x.min(), x.max())


def test_entropy_ignores_the_relu_spike_at_zero() -> None:
    x = np.maximum(np.random.default_rng(7).standard_normal(100_000), 0.0)
    lo, hi = _range(_stream(EntropyObserver(), np.array_split(x, 4)))
    assert lo == 0.0
    assert 3.0 < hi <= x.max()  # without leaving zeros out, KL picks ~1.5


def test_mse_beats_minmax_on_its_own_objective_and_on_real_error() -> None:
    rng = np.random.default_rng(8)
    x = rng.laplace(size=100_000).astype(np.float32)
    for spec in (ACT_U8_ASYM, ACT_S8_SYM):
        obs = _stream(MSEObserver(spec), np.array_split(x, 8))
        lo, hi = _range(obs)
        assert x.min() <= lo <= hi <= x.max()
        hist = obs.histogram
        assert expected_error(hist, lo, hi, spec) <= expected_error(
            hist, float(x.min()), float(x.max()), spec
        )
        mse_err = np.mean((x - fake_quantize(x, compute_qparams(lo, hi, spec), spec)) ** 2)
        mm = compute_qparams(x.min(), x.max(), spec)
        minmax_err = np.mean((x - fake_quantize(x, mm, spec)) ** 2)
        assert mse_err < minmax_err


@pytest.mark.parametrize("masked_fraction", [0.0001, 0.3, 0.84])
def test_mask_fill_is_clipped_and_the_bulk_keeps_30_db(masked_fraction: float) -> None:
    rng = np.random.default_rng(9)
    scores = (rng.standard_normal((8, 128)) * 3).astype(np.float32)
    batches = []
    for i in range(8):
        b = scores.copy() + i * 0.01
        b[rng.uniform(size=b.shape) < masked_fraction] = FILL
        b[0, -1] = FILL
        batches.append(b)
    bulk = np.concatenate([b[b != FILL] for b in batches])
    for name, kwargs in HIST_OBSERVERS:
        obs = _stream(make_observer(name, value_name="attn.add", **kwargs), batches)
        lo, hi = _range(obs)
        assert bulk.min() <= lo <= hi <= bulk.max(), (name, lo, hi)
        spec = ACT_S8_SYM if kwargs.get("symmetric") or kwargs.get("spec") else ACT_U8_ASYM
        qp = obs.qparams(spec)
        assert sqnr_db(bulk, fake_quantize(bulk, qp, spec)) > 30.0, name
        # The fill still saturates to the most negative code.
        assert float(fake_quantize(FILL, qp, spec)) <= lo + float(qp.scale) / 2


# --------------------------------------------------- never crash on pathological data
def _batch(kind: str, rng: np.random.Generator, c: float, size: int) -> np.ndarray:
    if kind == "const":
        return np.full(size, c, np.float32)
    if kind == "zeros":
        return np.zeros(size, np.float32)
    if kind == "narrow":
        return (c + rng.uniform(0, abs(c) * 1e-6 + 1e-30, size)).astype(np.float32)
    if kind == "single":
        return np.float32([c])
    if kind == "fill_mixed":
        b = rng.standard_normal(size).astype(np.float32)
        b[: max(1, size // 3)] = FILL
        return b
    if kind == "huge":
        return (rng.standard_normal(size) * 1e30).astype(np.float32)
    return np.clip(rng.standard_normal(size) * abs(c) + c, -3.4e38, 3.4e38).astype(np.float32)


kinds = st.sampled_from(["const", "zeros", "narrow", "single", "fill_mixed", "huge", "normal"])
values = st.floats(-1e6, 1e6, width=32) | st.sampled_from([0.0, 1e-30, -5e-39, 3e38])


@settings(max_examples=15, deadline=None)  # stress-tested at 1500 examples
@given(
    plan=st.lists(st.tuples(kinds, values, st.integers(1, 400)), min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
def test_observers_never_crash_and_stay_inside_the_data(
    plan: list[tuple[str, float, int]], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    batches = [_batch(kind, rng, c, size) for kind, c, size in plan]
    data = np.concatenate(batches)
    for name, kwargs in ALL_OBSERVERS:
        obs = _stream(make_observer(name, **kwargs), batches)
        lo, hi = _range(obs)
        assert data.min() <= lo <= hi <= data.max(), (name, kwargs, lo, hi)
        for spec in (ACT_U8_ASYM, ACT_S8_SYM):
            qp = obs.qparams(spec)
            assert np.isfinite(qp.scale) and qp.scale >= np.finfo(np.float32).tiny
            assert float(fake_quantize(np.float32(0.0), qp, spec)) == 0.0


@pytest.mark.parametrize(("name", "kwargs"), ALL_OBSERVERS)
def test_constant_and_zero_streams(name: str, kwargs: dict[str, object]) -> None:
    for c in (0.0, 2.5, -1e-9, FILL):
        c32 = float(np.float32(c))
        obs = _stream(make_observer(name, **kwargs), [np.full((4, 4), c32, np.float32)] * 3)
        assert _range(obs) == (c32, c32)
        qp = obs.qparams(ACT_U8_ASYM)
        assert float(fake_quantize(np.float32(c), qp, ACT_U8_ASYM)) == np.float32(c)


# ------------------------------------------------------------- errors and conversion
@pytest.mark.parametrize(("name", "kwargs"), ALL_OBSERVERS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_value_sample_and_observer(
    name: str, kwargs: dict[str, object], bad: float
) -> None:
    obs = make_observer(name, value_name="encoder.layer.0.attn.add", **kwargs)
    obs.update(np.ones(4, np.float32))
    x = np.zeros((2, 3), np.float32)
    x[1, 2] = bad
    with pytest.raises(CalibrationError) as info:
        obs.update(x, sample=17)
    message = str(info.value)
    assert "'encoder.layer.0.attn.add' sample 17" in message
    assert "index (1, 2)" in message and f"[{name} observer]" in message
    assert ("NaN" if np.isnan(bad) else "inf") in message
    assert "\n" not in message and info.value.exit_code == 3
    with pytest.raises(CalibrationError, match="sample 1:"):
        obs.update(x)  # default sample index: the number of earlier updates


def test_dtypes() -> None:
    obs = MinMaxObserver()
    obs.update(np.float16([1.5, -2.0]))
    obs.update(np.int32([7, -9]))
    assert _range(obs) == (-9.0, 7.0)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    obs.update(np.array([100.0], dtype=ml_dtypes.bfloat16))
    assert _range(obs)[1] == 100.0
    for bad in (np.array([True]), np.array([1 + 2j]), np.array(["a"])):
        with pytest.raises(CalibrationError, match="not a real number type"):
            obs.update(bad)


def test_empty_updates_are_ignored_and_no_data_is_an_error() -> None:
    for name, kwargs in ALL_OBSERVERS:
        obs = make_observer(name, value_name="v", **kwargs)
        obs.update(np.zeros((0, 3), np.float32))
        assert obs.num_updates == 1
        with pytest.raises(CalibrationError, match="'v': .* has seen no data"):
            obs.range()


# ------------------------------------------------------------ memory, merge, registry
@pytest.mark.parametrize(("name", "kwargs"), [*ALL_OBSERVERS, ("minmax", {"axis": 1})])
def test_state_bytes_same_after_16_and_512_updates(name: str, kwargs: dict[str, object]) -> None:
    rng = np.random.default_rng(10)
    obs = make_observer(name, **kwargs)
    for i in range(512):
        obs.update(rng.standard_normal((4, 8)).astype(np.float32) * (1 + i % 13))
        if i == 15:
            at_16 = obs.state_bytes()
    assert obs.state_bytes() == at_16 > 0


@pytest.mark.parametrize(("name", "kwargs"), [*ALL_OBSERVERS, ("minmax", {"axis": 0})])
def test_merge_equals_one_stream(name: str, kwargs: dict[str, object]) -> None:
    rng = np.random.default_rng(11)
    batches = [(rng.standard_normal((16, 64)) * (1 + i)).astype(np.float32) for i in range(8)]
    batches[5][3, 3] = FILL
    one = _stream(make_observer(name, **kwargs), batches)
    a = _stream(make_observer(name, **kwargs), batches[::2])
    b = _stream(make_observer(name, **kwargs), batches[1::2])
    a.merge(b)
    assert a.num_updates == one.num_updates == 8
    merged, single = a.range(), one.range()
    if name == "minmax":
        np.testing.assert_array_equal(merged[0], single[0])
        np.testing.assert_array_equal(merged[1], single[1])
        return
    span = float(single[1] - single[0])
    assert abs(float(merged[0] - single[0])) <= 0.05 * span
    assert abs(float(merged[1] - single[1])) <= 0.05 * span


def test_merge_refuses_other_settings() -> None:
    with pytest.raises(ValueError, match="cannot merge"):
        EntropyObserver(num_bins=512).merge(EntropyObserver(num_bins=1024))
    with pytest.raises(ValueError, match="cannot merge"):
        MinMaxObserver(axis=0).merge(MinMaxObserver())
    with pytest.raises(ValueError, match="cannot merge"):
        MSEObserver(ACT_U8_ASYM).merge(MSEObserver(ACT_S8_SYM))


def test_registry() -> None:
    assert set(OBSERVERS) == {"minmax", "percentile", "entropy", "mse"}
    for name, cls in OBSERVERS.items():
        assert cls.name == name
    obs = make_observer("entropy", num_bins=512, value_name="y")
    assert isinstance(obs, EntropyObserver) and obs.histogram.num_bins == 512
    assert obs.num_quant_bins == 255
    assert EntropyObserver(symmetric=True).num_quant_bins == 128
    with pytest.raises(UsageError, match="did you mean 'entropy'"):
        make_observer("entropi")
    with pytest.raises(UsageError, match="observer 'minmax'"):
        make_observer("minmax", bins=3)
    with pytest.raises(UsageError, match="per-tensor"):
        MSEObserver(ACT_U8_ASYM.with_axis(0))
