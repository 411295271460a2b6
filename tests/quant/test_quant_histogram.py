"""The streaming histogram: exact counts, re-binning, outlier tails, merge, constant memory."""

from __future__ import annotations

import itertools
import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.quant import Histogram


def _feed(hist: Histogram, batches: list[np.ndarray]) -> None:
    for b in batches:
        hist.add(np.asarray(b))


def _width(hist: Histogram) -> float:
    return (hist.hi - hist.lo) / hist.num_bins


def test_first_batch_sets_the_grid_exactly() -> None:
    x = np.random.default_rng(0).standard_normal(10000)
    hist = Histogram(256)
    _feed(hist, [x])
    assert hist.lo == x.min() and hist.hi == x.max()
    np.testing.assert_array_equal(hist.counts, np.histogram(x, 256, (x.min(), x.max()))[0])


def test_widening_keeps_the_total_and_the_distribution() -> None:
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal(5000) * s for s in (0.01, 0.1, 1.0, 3.0, 50.0, 0.5)]
    hist = Histogram(2048)
    _feed(hist, batches)
    data = np.concatenate(batches)
    assert hist.total == hist.binned_count == data.size
    assert hist.binned_min == data.min() and hist.binned_max == data.max()
    assert hist.lo <= data.min() and hist.hi >= data.max()
    # Old bins merge into whole new bins: quantiles stay within a bin of numpy's.
    for q in (0.001, 0.01, 0.25, 0.5, 0.75, 0.99, 0.999):
        assert abs(hist.quantile(q) - np.quantile(data, q)) <= 2 * _width(hist), q


def test_rebinning_is_exact_for_old_bins() -> None:
    hist = Histogram(8)
    _feed(hist, [np.array([0.0, 0.5, 1.0, 7.9, 8.0])])
    before = hist.counts
    _feed(hist, [np.array([-3.0, 20.0])])
    # Width 1 -> 4 and the grid shifted by whole old bins: old counts are sums of bins.
    assert _width(hist) == 4.0
    assert hist.binned_count == 7
    # Centred on the data [-3, 20] with a whole number of old bins as shift: [-8, 24].
    assert hist.lo == -8.0 and hist.hi == 24.0
    # Old bins 0..1 -> new bin 2, old bin 7 -> new bin 3; new data -3 -> 1 and 20 -> 7.
    assert hist.counts.tolist() == [0, 1, 3, 2, 0, 0, 0, 1]
    assert before.tolist() == [2, 1, 0, 0, 0, 0, 0, 2]


@settings(max_examples=60, deadline=None)
@given(
    scales=st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=12),
    shifts=st.lists(st.floats(-1e3, 1e3), min_size=12, max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_counts_are_exact_under_any_stream(
    scales: list[float], shifts: list[float], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal(rng.integers(1, 300)) * s + m for s, m in zip(scales, shifts)]
    hist = Histogram(64)
    _feed(hist, batches)
    data = np.concatenate(batches)
    assert hist.total == data.size
    assert hist.data_min == data.min() and hist.data_max == data.max()
    assert (hist.counts >= 0).all()
    qs = [hist.quantile(q) for q in np.linspace(0, 1, 11)]
    assert all(a <= b for a, b in itertools.pairwise(qs))
    assert qs[0] == data.min() and qs[-1] == data.max()


def test_points_then_spread() -> None:
    hist = Histogram(16)
    _feed(hist, [np.zeros(10), np.zeros(5)])
    assert hist.is_point and hist.zeros == 15 and hist.quantile(0.5) == 0.0
    _feed(hist, [np.full(3, 2.0)])
    assert not hist.is_point and hist.total == 18
    assert hist.lo == 0.0 and hist.hi == 2.0
    assert hist.counts[0] == 15 and hist.counts[-1] == 3
    assert hist.zeros == 15


def test_narrow_range_keeps_resolution() -> None:
    x = 1.0 + np.random.default_rng(2).uniform(0, 1e-6, 10000)
    hist = Histogram(2048)
    _feed(hist, [x])
    assert hist.hi - hist.lo == pytest.approx(x.max() - x.min())
    assert abs(hist.quantile(0.5) - np.median(x)) < 1e-8


def test_mask_fill_goes_to_the_tail_even_when_it_is_the_majority() -> None:
    rng = np.random.default_rng(3)
    scores = rng.standard_normal(2000) * 3
    for masked_fraction in (0.001, 0.3, 0.84, 0.99):
        x = scores.copy()
        masked = rng.uniform(size=x.size) < masked_fraction
        masked[0] = True
        x[masked] = -3.4028235e38
        hist = Histogram(2048)
        _feed(hist, [x[:1000], x[1000:]])
        assert hist.below.count == masked.sum()
        assert hist.below.min == -3.4028235e38
        assert hist.binned_count == (~masked).sum()
        assert hist.binned_min == x[~masked].min() and hist.binned_max == x[~masked].max()
        assert hist.data_min == -3.4028235e38
        assert hist.hi - hist.lo < 100  # the bulk keeps its resolution


def test_hf_style_fill_and_positive_outliers_split_too() -> None:
    x = np.concatenate([np.random.default_rng(4).standard_normal(1000), [-1e9, 5e8]])
    hist = Histogram(256)
    _feed(hist, [x])
    assert hist.below.count == 1 and hist.above.count == 1 and hist.above.max == 5e8


def test_continuous_heavy_tails_stay_binned() -> None:
    rng = np.random.default_rng(5)
    x = rng.lognormal(0.0, 3.0, 100000) * rng.choice([-1.0, 1.0], 100000)  # ~1e-6 .. 1e6
    hist = Histogram(2048)
    _feed(hist, np.array_split(x, 8))
    assert hist.below.count == 0 and hist.above.count == 0


def test_outliers_are_judged_per_batch() -> None:
    rng = np.random.default_rng(6)
    hist = Histogram(512)
    _feed(hist, [rng.standard_normal(1000), np.array([1.0, -3.4e38, 0.0])])
    assert hist.below.count == 1 and hist.binned_count == 1002
    # A stream may grow by any factor between batches: each batch has its own bulk.
    _feed(hist, [np.array([300.0, 5e4]), rng.standard_normal(100) * 1e9])
    assert hist.above.count == 0 and hist.binned_max > 1e9


def test_a_batch_of_only_fill_values_is_binned() -> None:
    # Documented limitation: such a batch is its own bulk (right for the mask tensor).
    hist = Histogram(512)
    _feed(hist, [np.random.default_rng(11).standard_normal(1000), np.full(7, -3.4e38)])
    assert hist.below.count == 0 and hist.binned_min == -3.4e38


def test_tiny_stragglers_below_the_bulk_do_not_become_the_bulk() -> None:
    x = np.concatenate([np.full(3, 1e-30), np.random.default_rng(7).standard_normal(10000)])
    hist = Histogram(256)
    _feed(hist, [x])
    assert hist.below.count == hist.above.count == 0
    assert hist.binned_count == x.size


def test_underflow_debris_does_not_become_the_bulk_even_when_it_is_the_majority() -> None:
    # A masked softmax with a -100 fill: masked probabilities underflow to ~1e-44.
    rng = np.random.default_rng(12)
    probs = rng.dirichlet(np.ones(32), size=64).reshape(-1)
    masked = rng.uniform(size=probs.size) < 0.84
    probs[masked] = np.float32(np.exp(np.float32(-100)))
    hist = Histogram(256)
    _feed(hist, [probs])
    assert hist.below.count == hist.above.count == 0
    assert hist.binned_max == probs.max()


def test_the_bulk_is_the_cluster_nearest_to_one() -> None:
    x = np.concatenate([np.full(100, 1e-30), np.full(100, 0.5), np.full(100, 1e30)])
    hist = Histogram(64)
    _feed(hist, [x])
    assert hist.above.count == 100 and hist.binned_count == 200


def test_outlier_split_can_be_turned_off() -> None:
    hist = Histogram(64, outlier_gap=None)
    _feed(hist, [np.array([0.0, 1.0, -3.4e38])])
    assert hist.below.count == 0 and hist.lo == -3.4e38


def test_merge_equals_one_stream_approximately() -> None:
    rng = np.random.default_rng(8)
    a_batches = [rng.standard_normal(4000) for _ in range(3)]
    b_batches = [rng.standard_normal(4000) * 4 + 1 for _ in range(3)]
    b_batches[1][7] = -3.4e38
    one = Histogram(2048)
    _feed(one, a_batches + b_batches)
    a, b = Histogram(2048), Histogram(2048)
    _feed(a, a_batches)
    _feed(b, b_batches)
    a.merge(b)
    assert a.total == one.total and a.binned_count == one.binned_count
    assert a.below.count == one.below.count == 1
    assert a.data_min == one.data_min and a.data_max == one.data_max
    assert a.zeros == one.zeros
    tol = 3 * max(_width(a), _width(one))
    for q in (0.001, 0.1, 0.5, 0.9, 0.999):
        assert abs(a.quantile(q) - one.quantile(q)) <= tol


def test_merge_with_points_and_empty() -> None:
    a, b, empty = Histogram(32), Histogram(32), Histogram(32)
    _feed(a, [np.full(4, 2.0)])
    _feed(b, [np.linspace(-1, 1, 100)])
    a.merge(empty)
    assert a.is_point and a.total == 4
    a.merge(b)
    assert a.total == 104 and a.binned_max == 2.0 and a.binned_min == -1.0
    c = Histogram(32)
    _feed(c, [np.linspace(-1, 1, 100)])
    c.merge(Histogram(32))
    d = Histogram(32)
    d.merge(c)
    np.testing.assert_array_equal(d.counts, c.counts)
    with pytest.raises(ValueError, match="32 and 16"):
        c.merge(Histogram(16))


def test_folded_view_and_cdf() -> None:
    x = np.random.default_rng(9).standard_normal(20000)
    hist = Histogram(1024)
    _feed(hist, [x])
    edges, counts = hist.folded(256)
    assert edges[0] == 0.0 and edges[-1] == pytest.approx(np.abs(x).max())
    assert counts.sum() == pytest.approx(x.size)
    np.testing.assert_allclose(
        np.cumsum(counts)[[63, 127, 191]],
        [np.sum(np.abs(x) <= edges[i + 1]) for i in (63, 127, 191)],
        rtol=0.01,
    )
    cdf = hist.cdf(np.linspace(-5, 5, 101))
    assert (np.diff(cdf) >= 0).all() and cdf[0] == 0 and cdf[-1] == x.size


def test_state_bytes_and_memory_are_constant() -> None:
    rng = np.random.default_rng(10)
    hist = Histogram(2048)
    batches = [rng.standard_normal(256) * (1 + i % 7) for i in range(512)]
    _feed(hist, batches[:16])
    bytes_16 = hist.state_bytes()
    tracemalloc.start()
    _feed(hist, batches[16:32])
    before = tracemalloc.get_traced_memory()[0]
    _feed(hist, batches[32:])
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert hist.state_bytes() == bytes_16
    assert grown < 4096


def test_initial_range() -> None:
    hist = Histogram(100, initial_range=(-1.0, 1.0))
    _feed(hist, [np.array([0.0, 0.5])])
    assert (hist.lo, hist.hi) == (-1.0, 1.0) and hist.counts[75] == 1
    _feed(hist, [np.array([3.0])])
    assert hist.hi >= 3.0 and hist.total == 3
    point = Histogram(10, initial_range=(2.0, 2.0))  # degenerate: ignored
    _feed(point, [np.array([1.0, 5.0])])
    assert (point.lo, point.hi) == (1.0, 5.0)
    outside = Histogram(10, initial_range=(0.0, 1.0))
    _feed(outside, [np.array([5.0, 6.0])])
    assert outside.lo <= 5.0 and outside.hi >= 6.0 and outside.total == 2
    with pytest.raises(ValueError, match="initial_range"):
        Histogram(10, initial_range=(1.0, 0.0))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="2 bins"):
        Histogram(1)
    with pytest.raises(ValueError, match="outlier_gap"):
        Histogram(8, outlier_gap=0)
    with pytest.raises(ValueError, match="no binned"):
        Histogram(8).quantile(0.5)
    hist = Histogram(8)
    _feed(hist, [np.arange(5.0)])
    with pytest.raises(ValueError, match="outside"):
        hist.quantile(1.5)
    assert math.isnan(Histogram(8).lo)
