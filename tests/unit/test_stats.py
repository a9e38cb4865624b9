"""The shared statistics against hand-computed cases: a wrong implementation fails these."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from icl_kernels.finetuning import dai_metrics as dm
from icl_kernels.utils.stats import (
    _resample_values,
    clustered_interval,
    cosine,
    kendall_tau,
    majority_share,
    paired_bootstrap,
    proportion,
    recovery,
    rng,
    split_indices,
    wilson_interval,
)

pytestmark = pytest.mark.no_model  # statistics on plain tensors: the TransformerLens version changes nothing


def test_kendall_tau_b_by_hand_with_ties():
    # pairs of x=[1,2,2,3], y=[1,3,2,2]: (0,1) (0,2) (0,3) concordant, (1,3) discordant,
    # (1,2) tied in x, (2,3) tied in y -> tau_b = (3 - 1) / sqrt((6 - 1) * (6 - 1)) = 0.4
    # (tau_a, without the tie correction, would be 2/6).
    x, y = torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 3, 2, 2])
    assert kendall_tau(x, y) == pytest.approx(0.4, abs=1e-12)
    assert kendall_tau(y, x) == pytest.approx(0.4, abs=1e-12)
    assert kendall_tau(x, -y) == pytest.approx(-0.4, abs=1e-12)
    # no ties: 3 items, one discordant pair of three -> (2 - 1) / 3
    assert kendall_tau(torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 3, 2])) == pytest.approx(1 / 3, abs=1e-12)
    # x=[1,1,2], y=[1,2,3]: pairs (0,2), (1,2) concordant, (0,1) tied in x -> 2 / sqrt(2 * 3)
    assert kendall_tau(torch.tensor([1.0, 1, 2]), torch.tensor([1.0, 2, 3])) == pytest.approx(2 / math.sqrt(6), abs=1e-12)


def test_cosine_by_hand_along_the_last_dimension():
    assert float(cosine(torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0]))) == pytest.approx(24 / 25, abs=1e-12)
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    torch.testing.assert_close(cosine(a, b), torch.tensor([1 / math.sqrt(2), -1.0], dtype=torch.float64))
    # float64 even for float32 inputs whose float32 cosine would round
    assert cosine(a, b).dtype == torch.float64
    assert float(cosine(torch.tensor([1.0, 0.0]), torch.tensor([-5.0, 0.0]))) == -1.0
    assert torch.isnan(cosine(torch.zeros(2), torch.ones(2)))


def test_wilson_and_proportion_by_hand():
    # (0, 10): low 0, high z^2 / (n + z^2)
    z2 = 1.959963984540054**2
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(z2 / (10 + z2), abs=1e-12)
    assert [round(v, 3) for v in wilson_interval(8, 10)] == [0.49, 0.943]
    out = proportion(np.array([True, False, True, True]), unit="queries")
    assert out == {"value": 0.75, "low": pytest.approx(wilson_interval(3, 4)[0]),
                   "high": pytest.approx(wilson_interval(3, 4)[1]), "n": 4, "unit": "queries"}
    assert proportion(torch.tensor([1, 0, 0, 0]).bool())["value"] == 0.25
    assert proportion(2, 8)["n"] == 8 and math.isnan(proportion(0, 0)["value"])


def test_paired_bootstrap_is_paired_and_clustered():
    gen = np.random.default_rng(0)
    a = gen.random(30)
    diff = paired_bootstrap(lambda x, y: float((x - y).mean()), [a, a + 0.1], "prompts")
    # the same prompts with a constant offset: every paired resample gives exactly -0.1
    assert diff["low"] == pytest.approx(-0.1) and diff["high"] == pytest.approx(-0.1)
    assert diff["n"] == 30 and diff["unit"] == "prompts" and diff["value"] == pytest.approx(-0.1)
    # four copies of each query: resampling the queries (groups) gives the interval of the queries alone
    plain = paired_bootstrap(np.mean, [a], "queries", seed=3)
    grouped = paired_bootstrap(np.mean, [np.repeat(a, 4)], "queries", groups=np.repeat(np.arange(30), 4), seed=3)
    assert grouped["n"] == 30
    assert grouped["low"] == pytest.approx(plain["low"]) and grouped["high"] == pytest.approx(plain["high"])
    naive = paired_bootstrap(np.mean, [np.repeat(a, 4)], "prompts", seed=3)
    assert naive["high"] - naive["low"] < 0.7 * (grouped["high"] - grouped["low"])  # pseudo-replication
    with pytest.raises(ValueError, match="same number of rows"):
        paired_bootstrap(np.mean, [a, a[:3]], "prompts")


def test_majority_share_recovery_and_split():
    assert majority_share(np.array([2, 2, 0, 2, 1])) == pytest.approx(0.6)
    assert majority_share(torch.tensor([1, 1])) == 1.0
    assert recovery(np.array([0.25, 0.75]), np.array([0.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(0.5)
    s, r = split_indices(20, 0.7, seed=1)
    assert sorted(np.r_[s, r].tolist()) == list(range(20)) and len(s) == 14
    s2, _ = split_indices(20, 0.7, seed=1, stream="probe_layer_split")
    assert s2.tolist() != s.tolist()  # a different stream gives a different split


def _pairwise_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """The O(n^2) definition kendall_tau used before it called scipy: signs of every pair, tie-corrected."""
    dx, dy = np.sign(x[:, None] - x[None, :]), np.sign(y[:, None] - y[None, :])
    upper = np.triu(np.ones_like(dx, dtype=bool), k=1)
    nx, ny = (dx[upper] != 0).sum(), (dy[upper] != 0).sum()
    return float((dx * dy)[upper].sum() / math.sqrt(nx * ny))


@pytest.mark.parametrize("ties", [False, True])
def test_kendall_tau_equals_the_pairwise_tau_b(ties):
    gen = np.random.default_rng(3)
    for n in (2, 3, 9, 50, 301):
        if ties:  # few distinct values: many ties in x, in y and in both
            x, y = gen.integers(0, 4, n).astype(float), gen.integers(0, 3, n).astype(float)
            if np.ptp(x) == 0 or np.ptp(y) == 0:
                continue
        else:
            x, y = gen.normal(size=n), gen.normal(size=n)
        y = y + 0.5 * x  # some correlation, so the sign is checked too
        got = kendall_tau(torch.from_numpy(x), torch.from_numpy(y))
        assert got == pytest.approx(_pairwise_tau_b(x, y), abs=1e-12), (n, ties)
    assert np.isnan(kendall_tau(torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([1.0, 2.0, 3.0])))
    assert np.isnan(kendall_tau(torch.tensor([1.0]), torch.tensor([2.0])))


def test_wilson_interval_equals_scipy():
    binomtest = pytest.importorskip("scipy.stats").binomtest
    for k, n in ((0, 6), (1, 6), (8, 10), (37, 100), (100, 100), (3, 1000)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12), (k, n)


def _old_loop_values(statistic, arrays, groups, resamples, seed):
    """The bootstrap loop before vectorisation (issue 26), verbatim: one statistic call per resample."""
    rows = len(arrays[0])
    if groups is None:
        members = [np.array([i]) for i in range(rows)]
    else:
        members = [np.flatnonzero(groups == g) for g in dict.fromkeys(groups.tolist())]
    n = len(members)
    generator = rng("bootstrap", seed)
    values = []
    for _ in range(resamples):
        pick = generator.integers(0, n, size=n)
        idx = np.concatenate([members[j] for j in pick])
        values.append(statistic(*[a[idx] for a in arrays]))
    return np.asarray(values, dtype=float)


@pytest.mark.parametrize("shape", [(40, 6), (40, 1), (37, 5, 4), (40, 1, 1), (9, 3, 7), (120, 30, 9)])
@pytest.mark.parametrize("grouping", ["rows", "equal groups", "unequal groups"])
def test_vectorised_bootstrap_equals_the_loop_bit_for_bit(shape, grouping):
    """The compare statistics' stacked forms give every resample the value the old loop gave, bit
    for bit (same draws, same order), on random data with NaNs (whole queries, single cells)."""
    gen = np.random.default_rng(sum(shape) + len(grouping))
    rows = shape[0]
    a, b = gen.normal(size=shape), gen.normal(size=shape) * 1e3
    a[gen.random(shape) < 0.15] = np.nan
    a[1] = np.nan  # a query with no value at all
    b[gen.random(shape) < 0.05] = np.nan
    right = [(gen.random(rows) < p).astype(float) for p in (0.3, 0.6, 0.7, 0.5)]
    if grouping == "rows":
        groups = None
    elif grouping == "equal groups":
        groups = np.repeat(np.arange(rows), 1)[: rows - rows % 3] // 3
        a, b, right = a[: len(groups)], b[: len(groups)], [r[: len(groups)] for r in right]
    else:
        groups = np.sort(gen.integers(0, max(2, rows // 4), size=rows))
    head = dm._head_statistic if len(shape) == 3 else dm._layer_statistic
    cases = [
        (head, [a]),
        (dm._difference(head), [a, b]),
        (dm._accuracy_statistic, [right[0]]),
        (dm._difference_of_means, [right[0], right[1]]),
        (dm._rec2ftp_statistic("rec2ftp"), right[:3]),
        (dm._rec2ftp_statistic("rec2ftp_chance"), right[:3]),
        (dm._REC2FTP_GAP, right),
    ]
    if len(shape) == 3:
        cases.append((dm.batched_statistic(
            lambda w, x, y, z: (head(w) - head(x)) - (head(y) - head(z)),
            lambda w, x, y, z: (dm._head_means(w) - dm._head_means(x)) - (dm._head_means(y) - dm._head_means(z))),
            [a, b, b[::-1].copy(), a[::-1].copy()]))
    members = ([np.array([i]) for i in range(len(a))] if groups is None else
               [np.flatnonzero(groups == g) for g in dict.fromkeys(groups.tolist())])
    for statistic, arrays in cases:
        old = _old_loop_values(statistic, arrays, groups, 300, seed=5)
        new = _resample_values(statistic, None, arrays, members, 300, rng("bootstrap", 5))
        assert old.tobytes() == new.tobytes(), statistic
        if groups is not None:
            vectorised = clustered_interval(statistic, arrays, "sets", groups, resamples=300, seed=5)
            loop = clustered_interval(dm._one_at_a_time(statistic), arrays, "sets", groups, resamples=300, seed=5)
            assert repr(vectorised) == repr(loop)
    # the stacked form is used: a statistic whose stacked form is wrong changes the numbers
    wrong = dm.batched_statistic(np.mean, lambda x: x.mean(axis=1) + 1.0)
    members_equal = len({len(m) for m in members}) == 1
    changed = _resample_values(wrong, None, [right[0]], members, 50, rng("bootstrap", 5))
    assert (changed.tobytes() != _old_loop_values(np.mean, [right[0]], groups, 50, 5).tobytes()) == members_equal
