"""The interval chooser of `icl_kernels.utils.stats`: Student t quantiles, t intervals, cluster counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from icl_kernels.utils.stats import (
    MIN_BOOTSTRAP_CLUSTERS,
    clustered_interval,
    paired_bootstrap,
    student_t_quantile,
    t_interval,
)


def test_student_t_quantile_matches_tables():
    # printed tables: t_{0.975, 1} = 12.7062, t_{0.975, 4} = 2.7764, t_{0.975, 19} = 2.0930, t_{0.95, 2} = 2.9200
    for p, df, table in ((0.975, 1, 12.7062), (0.975, 4, 2.7764), (0.975, 19, 2.0930), (0.95, 2, 2.9200)):
        assert student_t_quantile(p, df) == pytest.approx(table, abs=5e-5)
    for df in (1, 2, 3, 4, 7, 20, 99):  # symmetric about 0
        for p in (0.6, 0.9, 0.975, 0.995):
            assert student_t_quantile(1 - p, df) == pytest.approx(-student_t_quantile(p, df), rel=1e-9)
    assert student_t_quantile(0.975, 10**6) == pytest.approx(1.959964, abs=1e-5)  # the normal quantile
    assert student_t_quantile(0.5, 3) == 0.0
    with pytest.raises(ValueError, match="df"):
        student_t_quantile(0.975, 0)
    with pytest.raises(ValueError, match="probability"):
        student_t_quantile(1.0, 3)


def test_t_interval_by_hand():
    # values 1..5: mean 3, sample sd sqrt(10/4) = 1.58114, se = 1.58114 / sqrt(5) = 0.70711;
    # t_{0.975, 4} = 2.776445 -> half-width 2.776445 * 0.70711 = 1.963243 -> [1.036757, 4.963243]
    low, high = t_interval(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert low == pytest.approx(3 - 2.7764451051977987 * math.sqrt(2.5 / 5), abs=1e-12)
    assert (low, high) == pytest.approx((1.036757, 4.963243), abs=1e-6)
    # NaNs are dropped (G counts the rest); fewer than two values: no interval
    assert t_interval(np.array([1.0, np.nan, 2.0, 3.0, 4.0, 5.0])) == pytest.approx((low, high), abs=1e-12)
    assert all(math.isnan(x) for x in t_interval(np.array([1.0, np.nan])))


def test_clustered_interval_uses_t_below_twenty_clusters_and_is_never_narrower_than_rows():
    gen = np.random.default_rng(0)
    # 5 clusters of 20 rows whose cluster means differ a lot: the t(4) interval on the 5 means
    x = np.repeat(np.array([0.0, 1.0, 2.0, 3.0, 4.0]), 20) + gen.normal(0, 0.1, 100)
    groups = np.repeat(np.arange(5), 20)
    out = clustered_interval(np.mean, [x], "sets", groups, resamples=300, seed=1)
    means = [x[groups == g].mean() for g in range(5)]
    assert out["method"] == "t(G-1) on cluster values" and out["n"] == 5 and out["n_rows"] == 100
    assert (out["low"], out["high"]) == pytest.approx(t_interval(np.array(means)), abs=1e-12)
    assert out["value"] == pytest.approx(x.mean(), abs=1e-12)
    assert out["resamples"] == 300 and out["seed"] == 1 and not out["widened"]
    # identical clusters: the t interval is a point; the row-level interval (a floor) widens it
    flat = np.tile(np.array([0.0, 1.0]), 50)
    out = clustered_interval(np.mean, [flat], "sets", np.repeat(np.arange(5), 20), resamples=300)
    rows = paired_bootstrap(np.mean, [flat], "rows", resamples=300)
    assert out["widened"] and (out["low"], out["high"]) == (rows["low"], rows["high"])
    assert out["low"] < 0.5 < out["high"]
    # a given floor (e.g. a Wilson interval) is honoured
    out = clustered_interval(np.mean, [flat], "sets", np.repeat(np.arange(5), 20), resamples=50, floor=(0.1, 0.9))
    assert (out["low"], out["high"]) == (0.1, 0.9)
    # a rate's t interval over two clusters (t_{0.975, 1} = 12.7) is clipped to [0, 1]
    rate = np.r_[0.0, 0.0, 1.0, 1.0]
    wide = clustered_interval(np.mean, [rate], "sets", np.r_[0, 0, 1, 1], resamples=50)
    assert wide["low"] < -5 and wide["high"] > 5  # 0.5 -+ 12.706 * 0.5
    clipped = clustered_interval(np.mean, [rate], "sets", np.r_[0, 0, 1, 1], resamples=50, bounds=(0.0, 1.0))
    assert (clipped["low"], clipped["high"]) == (0.0, 1.0)


def test_clustered_interval_bootstraps_clusters_from_twenty_on():
    gen = np.random.default_rng(2)
    g = MIN_BOOTSTRAP_CLUSTERS
    x = gen.normal(0, 1, 5 * g)
    groups = np.repeat(np.arange(g), 5)
    out = clustered_interval(np.mean, [x], "sets", groups, resamples=400, seed=3)
    boot = paired_bootstrap(np.mean, [x], "sets", groups=groups, resamples=400, seed=3)
    assert out["method"] == "cluster bootstrap" and out["n"] == g
    rows = paired_bootstrap(np.mean, [x], "rows", resamples=400, seed=3)
    assert out["low"] == min(boot["low"], rows["low"]) and out["high"] == max(boot["high"], rows["high"])
    one_fewer = clustered_interval(np.mean, [x[:-5]], "sets", groups[:-5], resamples=50)
    assert one_fewer["method"] == "t(G-1) on cluster values" and one_fewer["n"] == g - 1
    with pytest.raises(ValueError, match="labels"):
        clustered_interval(np.mean, [x], "sets", groups[:-1])
