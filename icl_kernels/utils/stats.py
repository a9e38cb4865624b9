"""The statistics every study shares: intervals, splits, similarities, and named random streams.

Intervals. A proportion (accuracy, agreement) gets a Wilson score interval; any other statistic
(a difference, a recovery ratio, a mean over windows) gets a percentile bootstrap over the
independent unit (prompts, demonstration draws, text windows), *paired* when two conditions share
the unit: one resampled index vector is applied to every array, so the interval is for the
difference on the same prompts.

Summaries. Every rate or statistic with its interval is one JSON shape, `Estimate`
``{value, low, high, n, unit}``: `proportion` (a rate k/n with its Wilson interval) and
`paired_bootstrap` return it.

Selection and report. Every "best" (head, layer, learning rate, offset) is chosen on a seeded
selection split and reported on the disjoint rest (`split_indices`).

Random streams. Each random choice in the package draws from ``numpy.random.default_rng`` seeded
with the run's seed, the coordinates of the draw and a fixed salt that names its stream
(`SEED_STREAMS`), so that two streams never share numbers and adding a stream changes none of the
others. `rng` builds such a generator; the salts are the values the package has always used, so
shipped results reproduce.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypedDict

import numpy as np
import scipy.stats
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "Estimate",
    "SEED_STREAMS",
    "rng",
    "wilson_interval",
    "bootstrap_interval",
    "percentile_interval",
    "split_indices",
    "cosine",
    "kendall_tau",
    "recovery",
    "proportion",
    "paired_bootstrap",
    "majority_share",
    "mean_difference",
    "MIN_BOOTSTRAP_CLUSTERS",
    "student_t_quantile",
    "t_interval",
    "clustered_interval",
    "batched_statistic",
]

class Estimate(TypedDict):
    """A statistic with its 95% interval over the independent unit: the one JSON shape of every
    interval in a summary (`proportion`, `paired_bootstrap`).

    Keys: ``value`` (the statistic; a rate k/n for a proportion), ``low`` and ``high`` (the interval;
    NaN when there is nothing to resample), ``n`` (the number of independent units: prompts for a
    proportion, so k = value * n) and ``unit`` (what the units are).
    """

    value: float
    low: float
    high: float
    n: int
    unit: str


#: stream name -> salt appended to the seed material (None: no salt, the seed material alone).
SEED_STREAMS: dict[str, int | None] = {
    "query_demos": 0x1C1,  # demonstrations of one query (prompts.make_prompts), keys (seed, query)
    "select_report_split": 0x5E1,  # selection / report split of prompts, keys (seed,)
    "input_permutation": 0x9E7,  # word order of pool example i (control), keys (seed, i)
    "episode_demos": 0xC0,  # compare: demonstration set of episode e, keys (seed, e)
    "dev_queries": 0xDE5,  # compare: development queries from the pool, keys (seed,)
    "synthetic_episode": 0x5E,  # compare on the synthetic world: episode e, keys (seed, e)
    "theorem_simulation": 0x7E0,  # Theorem 1 simulation prompts, keys (seed, shots)
    "theorem_model": 0x30DE1,  # synthetic model behaviour prompts, keys (seed, shots)
    "synthetic_eval": None,  # synthetic accuracy-vs-shots prompts, keys (seed, shots)
    "random_heads": 0x4A4D,  # causal: random head set d, keys (seed, d)
    "bootstrap": 0xB007,  # bootstrap resampling, keys (seed,)
    "synthetic_prompts": 0xCA05,  # causal / sweep prompts on the synthetic world, keys (seed, shots)
    "momentum_bootstrap": None,  # momentum grid bootstrap, keys (seed,)
    "shuffled_labels": 0x5A1F,  # function vectors: label permutation of prompt i, keys (seed, i)
    "fv_split_half": 0x5B1F,  # function vectors: halves of the CIE prompts (ranking stability), keys (seed,)
    "repeated_tokens": 0x1D0C,  # induction scores: random repeated sequences, keys (seed,)
    "anchor_control": 0xA9C4,  # anchors: random non-label positions of prompt i, keys (seed, i)
    "probe_layer_split": 0x9B0E,  # heads: halves of the selection prompts to choose probe layers, keys (seed,)
    "resample_sources": 0x5E5A,  # resample ablation: which other prompt each prompt's heads take, keys (seed,)
    "random_draws_bootstrap": 0xD4A5,  # causal: random head sets resampled in the bootstrap, keys (seed,)
}

#: Offset added to the seed for the weights of an untrained copy of a model (compare controls).
UNTRAINED_SEED_OFFSET = 7919


def rng(stream: str, *keys: int) -> np.random.Generator:
    """The generator of a named stream at the given coordinates (seed first).

    >>> float(rng("select_report_split", 0).random()) == float(np.random.default_rng([0, 0x5E1]).random())
    True
    """
    if stream not in SEED_STREAMS:
        raise KeyError(f"Unknown random stream {stream!r}; known: {sorted(SEED_STREAMS)}.")
    salt = SEED_STREAMS[stream]
    material = [int(k) for k in keys] + ([] if salt is None else [salt])
    if len(material) == 1:
        return np.random.default_rng(material[0])
    return np.random.default_rng(material)


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    Ours rather than ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`` (the same interval,
    tested): a closed form of four lines that takes ``z`` directly and builds no test object per call.

    >>> [round(x, 3) for x in wilson_interval(8, 10)]
    [0.49, 0.943]
    >>> wilson_interval(0, 6)[0], wilson_interval(6, 6)[1]
    (0.0, 1.0)
    """
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # the interval always holds p itself; rounding would otherwise put 0/n's lower end at +1e-17
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def bootstrap_interval(
    statistic: Callable[..., float],
    arrays: Sequence[np.ndarray],
    n: int,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    stream: str = "bootstrap",
) -> tuple[float, float]:
    """Percentile interval of ``statistic(*[a[idx] for a in arrays])`` over units resampled with
    replacement (axis 0 of every array is the unit; one index vector for all arrays, so the interval
    is paired). NaN samples are dropped.

    Ours rather than ``scipy.stats.bootstrap``: the indices come from the package's named random
    stream (`rng`), so shipped intervals reproduce, and `paired_bootstrap` extends the same loop to
    whole clusters, which scipy does not resample.

    >>> lo, hi = bootstrap_interval(np.mean, [np.arange(100.0)], 100, resamples=500)
    >>> bool(lo < 49.5 < hi)
    True
    """
    generator = rng(stream, seed)
    values = []
    for _ in range(resamples):
        idx = generator.integers(0, n, size=n)
        values.append(statistic(*[a[idx] for a in arrays]))
    return percentile_interval(values, level)


def percentile_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap ``values``, NaN samples dropped
    ((nan, nan) when none is left)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return (float("nan"), float("nan"))
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def split_indices(
    n: int, select_fraction: float = 0.7, seed: int = 0, stream: str = "select_report_split"
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (selection, report) indices: a seeded permutation cut at ``select_fraction``.

    >>> s, r = split_indices(10, 0.7, seed=0)
    >>> len(s), len(r), len(set(s) & set(r))
    (7, 3, 0)
    """
    if not 0 < select_fraction < 1:
        raise ValueError(f"select_fraction must be in (0, 1), not {select_fraction}.")
    n_select = int(round(select_fraction * n))
    if n_select < 1 or n_select >= n:
        raise ValueError(
            f"{n} prompts cannot be split {select_fraction:.2f}/{1 - select_fraction:.2f} into two non-empty "
            "parts; use more prompts."
        )
    order = rng(stream, seed).permutation(n)
    return np.sort(order[:n_select]), np.sort(order[n_select:])


def cosine(a: Float[Tensor, "... d"], b: Float[Tensor, "... d"]) -> Float[Tensor, "..."]:
    """Cosine similarity along the last dimension (float64); NaN where either vector is zero.

    >>> float(cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])))  # doctest: +ELLIPSIS
    0.7071...
    """
    a, b = a.double(), b.double()
    denominator = a.norm(dim=-1) * b.norm(dim=-1)
    out = (a * b).sum(-1) / denominator
    return torch.where(denominator > 0, out, torch.full_like(out, float("nan")))


def kendall_tau(x: Float[Tensor, " n"], y: Float[Tensor, " n"]) -> float:
    """Kendall's tau-b (ties in either input handled), by ``scipy.stats.kendalltau`` (its default
    ``variant="b"``); NaN with fewer than two items, a constant input or a NaN in either input.

    tau-b = (concordant - discordant) / sqrt((pairs - ties in x) * (pairs - ties in y)); scipy counts
    the pairs by sorting (O(n log n) time, O(n) memory) where a pairwise sign matrix takes O(n^2).

    >>> kendall_tau(torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 3, 2]))  # doctest: +ELLIPSIS
    0.333...
    """
    x = torch.as_tensor(x).detach().double().flatten().cpu().numpy()
    y = torch.as_tensor(y).detach().double().flatten().cpu().numpy()
    if x.shape != y.shape:
        raise ValueError(f"kendall_tau needs equal lengths, got {tuple(x.shape)} and {tuple(y.shape)}.")
    if x.size < 2 or np.isnan(x).any() or np.isnan(y).any() or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(scipy.stats.kendalltau(x, y, variant="b").statistic)


def recovery(patched: np.ndarray, zsl: np.ndarray, icl: np.ndarray) -> float:
    """Share of the ICL gain a patch restores: (patched - zsl) / (icl - zsl) on means; NaN for no gain.

    >>> recovery(np.array([0.5]), np.array([0.0]), np.array([1.0]))
    0.5
    """
    gap = icl.mean() - zsl.mean()
    return float((patched.mean() - zsl.mean()) / gap) if abs(gap) > 1e-9 else float("nan")


def proportion(
    successes: np.ndarray | Tensor | Sequence[bool] | int, n: int | None = None, unit: str = "prompts"
) -> Estimate:
    """A rate k/n with its 95% Wilson interval, as an `Estimate` ``{value, low, high, n, unit}``.

    ``successes`` is a count k with ``n``, or a boolean vector over the units (k its sum, ``n`` its
    length). With ``n == 0`` the value and the interval are NaN.

    >>> proportion(np.array([1, 1, 0, 1], bool))["value"], proportion(3, 4)["n"]
    (0.75, 4)
    >>> p = proportion(8, 10)
    >>> (p["value"], round(p["low"], 3), round(p["high"], 3), p["unit"])
    (0.8, 0.49, 0.943, 'prompts')
    """
    if n is None:
        flags = np.asarray(torch.as_tensor(successes).cpu() if isinstance(successes, Tensor) else successes, dtype=bool)
        k, n = int(flags.sum()), int(flags.size)
    else:
        k, n = int(successes), int(n)
    low, high = wilson_interval(k, n)
    return Estimate(value=k / n if n else float("nan"), low=low, high=high, n=n, unit=unit)


#: Resamples and seed of `paired_bootstrap` unless a caller gives its own (studies record them).
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def paired_bootstrap(
    statistic: Callable[..., float],
    arrays: Sequence[np.ndarray],
    unit: str,
    groups: np.ndarray | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
    stream: str = "bootstrap",
    batched: Callable[..., np.ndarray] | None = None,
) -> Estimate:
    """``statistic(*arrays)`` with a percentile bootstrap interval over the independent ``unit``, as
    an `Estimate` ``{value, low, high, n, unit}``.

    Axis 0 of every array is one row; one resampled index vector serves all arrays (paired). With
    ``groups`` (one label per row) the rows of a unit share a label (e.g. the four prompts built on
    one query) and whole groups are resampled (cluster bootstrap); ``n`` is then the number of
    groups, else the number of rows. NaN resamples are dropped.

    ``batched``: the same statistic over a stack of resamples (`batched_statistic`), which computes
    all resamples in a few array operations instead of one call per resample; the draws are the
    same and so is every resample's value, bit for bit (``tests/unit/test_stats.py``). Used when
    every resample has the same number of rows (no groups, or groups of one size).

    Ours because ``scipy.stats.bootstrap`` resamples rows only: it has no cluster (group) resampling,
    and it could not draw from the package's named random streams that make shipped intervals reproduce.

    >>> a, b = np.r_[1.0, 1, 1, 0], np.r_[0.0, 1, 0, 0]
    >>> out = paired_bootstrap(lambda x, y: float((x - y).mean()), [a, b], "queries", resamples=200)
    >>> out["value"], out["n"], out["unit"], out["low"] <= 0.5 <= out["high"]
    (0.5, 4, 'queries', True)
    """
    arrays = [np.asarray(a) for a in arrays]
    rows = len(arrays[0])
    if any(len(a) != rows for a in arrays):
        raise ValueError("paired_bootstrap needs arrays with the same number of rows (the paired units).")
    value = float(statistic(*arrays))
    if groups is None:
        members = [np.array([i]) for i in range(rows)]
    else:
        groups = np.asarray(groups)
        if len(groups) != rows:
            raise ValueError(f"groups has {len(groups)} labels for {rows} rows.")
        members = [np.flatnonzero(groups == g) for g in dict.fromkeys(groups.tolist())]
    n = len(members)
    low = high = float("nan")
    if n:
        generator = rng(stream, seed)
        values = _resample_values(statistic, batched, arrays, members, resamples, generator)
        low, high = percentile_interval(values, level)
    return Estimate(value=value, low=low, high=high, n=n, unit=unit)


#: Most array elements one chunk of stacked resamples may hold (`_resample_values`): 2**24 float64
#: values are 128 MiB.
_BATCH_ELEMENTS = 1 << 24


def batched_statistic(statistic: Callable[..., float], batched: Callable[..., np.ndarray]) -> Callable[..., float]:
    """``statistic`` carrying its stacked form: ``batched(*stacks)`` takes every array with a leading
    resample axis (``[resample, row, ...]``) and returns one value per resample, each equal to
    ``statistic`` of that resample. `paired_bootstrap` and `clustered_interval` use it when given
    (their ``batched=`` argument overrides it).

    >>> mean = batched_statistic(np.mean, lambda x: x.mean(axis=1))
    >>> float(mean(np.r_[1.0, 2.0])), mean.batched(np.array([[1.0, 2.0], [3.0, 5.0]])).tolist()
    (1.5, [1.5, 4.0])
    """

    def wrapped(*arrays):
        return statistic(*arrays)

    wrapped.batched = batched  # type: ignore[attr-defined]
    wrapped.__doc__ = getattr(statistic, "__doc__", None)
    return wrapped


#: The index draws of recent bootstraps: (generator state, units, resamples) -> [resample, unit]. Every
#: interval of a study draws from the same seeded stream, so the draws repeat; kept read-only.
_DRAWS: dict[tuple, tuple[np.ndarray, dict]] = {}


def _draws(generator: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """``generator.integers(0, n, size=n)`` per resample, stacked, from a fresh generator (the state it
    is in decides the draws: a known state gives the stored draws, and the generator is moved on as
    the draws would have moved it)."""
    state = generator.bit_generator.state
    key = (repr(state), n, resamples)
    if key in _DRAWS:
        picks, after = _DRAWS[key]
        generator.bit_generator.state = after
        return picks
    picks = np.stack([generator.integers(0, n, size=n) for _ in range(resamples)]) if resamples else np.zeros((0, n), np.int64)
    picks.setflags(write=False)
    if len(_DRAWS) >= 8:
        _DRAWS.pop(next(iter(_DRAWS)))
    _DRAWS[key] = (picks, generator.bit_generator.state)
    return picks


def _resample_values(
    statistic: Callable[..., float],
    batched: Callable[..., np.ndarray] | None,
    arrays: Sequence[np.ndarray],
    members: Sequence[np.ndarray],
    resamples: int,
    generator: np.random.Generator,
) -> np.ndarray:
    """The statistic of every resample (float64, NaN kept), the draws in the order of the loop:
    per resample ``generator.integers(0, len(members), size=len(members))``, then its rows.

    With ``batched`` (or ``statistic.batched``) and members of one size the rows of a chunk of
    resamples are gathered into ``[resample, row, ...]`` arrays and the statistic is computed over
    the chunk at once; otherwise one call per resample."""
    batched = batched if batched is not None else getattr(statistic, "batched", None)
    n = len(members)
    sizes = {len(m) for m in members}
    if batched is None or len(sizes) != 1:
        values = []
        for _ in range(resamples):
            pick = generator.integers(0, n, size=n)
            idx = np.concatenate([members[j] for j in pick])
            values.append(statistic(*[a[idx] for a in arrays]))
        return np.asarray(values, dtype=float)
    table = np.stack(members)  # [cluster, size]
    picks = _draws(generator, n, resamples)
    rows = n * len(members[0])
    per_resample = max(1, rows * max(int(np.prod(a.shape[1:], dtype=np.int64)) for a in arrays))
    chunk = max(1, _BATCH_ELEMENTS // per_resample)
    out = []
    for start in range(0, resamples, chunk):
        idx = table[picks[start : start + chunk]].reshape(-1, rows)  # [chunk, rows]: each resample's rows in order
        out.append(np.asarray(batched(*[a[idx] for a in arrays]), dtype=float).reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    """``mean(a) - mean(b)``: the statistic of a paired difference of rates (bootstrap it over the
    rows the two arrays share).

    >>> mean_difference(np.r_[1.0, 1, 0, 1], np.r_[0.0, 1, 0, 0])
    0.5
    """
    return float(np.mean(a) - np.mean(b))


def majority_share(predictions: np.ndarray | Tensor) -> float:
    """Share of the most frequent value (the agreement of a constant predictor with ``predictions``).

    >>> majority_share(np.array([2, 2, 0, 2]))
    0.75
    """
    values = np.asarray(predictions.cpu() if isinstance(predictions, Tensor) else predictions).ravel()
    if not values.size:
        return float("nan")
    return float(np.unique(values, return_counts=True)[1].max() / values.size)


#: Fewest independent clusters for which `clustered_interval` resamples whole clusters; below it the
#: interval is a Student t interval on the per-cluster values.
MIN_BOOTSTRAP_CLUSTERS = 20


def student_t_quantile(probability: float, df: int) -> float:
    """Quantile of Student's t distribution with a positive integer number of degrees of freedom
    (``scipy.stats.t.ppf``), with a one-line error for a bad ``df`` or ``probability``.

    >>> round(student_t_quantile(0.975, 4), 6), round(student_t_quantile(0.975, 1), 6)
    (2.776445, 12.706205)
    """
    if not (isinstance(df, (int, np.integer)) and df >= 1):
        raise ValueError(f"df must be a positive integer, not {df!r}.")
    if not 0 < probability < 1:
        raise ValueError(f"probability must be in (0, 1), not {probability}.")
    return float(scipy.stats.t.ppf(probability, df))


def t_interval(values: np.ndarray | Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """``mean +- t_{G-1} * sd / sqrt(G)`` over the G non-NaN values (NaN with fewer than two).

    >>> [round(x, 5) for x in t_interval([1.0, 2.0, 3.0, 4.0, 5.0])]
    [1.03676, 4.96324]
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    g = len(x)
    if g < 2:
        return (float("nan"), float("nan"))
    half = student_t_quantile(1 - (1 - level) / 2, g - 1) * float(x.std(ddof=1)) / math.sqrt(g)
    centre = float(x.mean())
    return (centre - half, centre + half)


def clustered_interval(
    statistic: Callable[..., float],
    arrays: Sequence[np.ndarray],
    unit: str,
    groups: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
    stream: str = "bootstrap",
    min_clusters: int = MIN_BOOTSTRAP_CLUSTERS,
    floor: tuple[float, float] | None = None,
    bounds: tuple[float, float] | None = None,
    batched: Callable[..., np.ndarray] | None = None,
) -> dict:
    """``statistic(*arrays)`` with an interval whose method follows the number G of independent clusters.

    Rows that share a label of ``groups`` form one cluster (e.g. the queries of one demonstration
    set). With ``G >= min_clusters`` the interval is a cluster bootstrap (`paired_bootstrap` with
    ``groups``); with fewer, a t(G-1) interval (`t_interval`) on the statistic of each cluster, since
    a percentile bootstrap over a handful of clusters is too narrow. Either way it is widened to hold
    ``floor``, the interval of the same statistic with rows as units (by default their percentile
    bootstrap), so that it is never narrower than the row-level one; ``bounds`` (the range the
    statistic can take, e.g. ``(0, 1)`` for a rate) clips a t interval that overshoots it; ``batched``
    computes the bootstraps' resamples at once (`paired_bootstrap`). Returns
    ``{value, low, high, n, unit, method, resamples, seed, level, n_rows, widened}``; ``n`` is G (for the
    t interval, the clusters whose statistic is defined). The interval always holds ``value``.

    >>> x = np.r_[0.0, 1, 2, 3, 4, 5]
    >>> out = clustered_interval(np.mean, [x], "sets", groups=np.r_[0, 0, 1, 1, 2, 2], resamples=200)
    >>> out["method"], out["n"], out["low"] <= 2.5 <= out["high"]
    ('t(G-1) on cluster values', 3, True)
    """
    arrays = [np.asarray(a) for a in arrays]
    groups = np.asarray(groups)
    rows = len(arrays[0])
    if len(groups) != rows:
        raise ValueError(f"groups has {len(groups)} labels for {rows} rows.")
    members = [np.flatnonzero(groups == g) for g in dict.fromkeys(groups.tolist())]
    n = len(members)
    if n >= min_clusters:
        method = "cluster bootstrap"
        out = paired_bootstrap(statistic, arrays, unit, groups=groups, resamples=resamples, seed=seed,
                               level=level, stream=stream, batched=batched)
        value, low, high = out["value"], out["low"], out["high"]
    else:
        method = "t(G-1) on cluster values"
        value = float(statistic(*arrays))
        per_cluster = [float(statistic(*[a[idx] for a in arrays])) for idx in members]
        per_cluster = [v for v in per_cluster if not math.isnan(v)]  # a cluster with no defined value
        n = len(per_cluster)
        low, high = t_interval(per_cluster, level)
        if not (math.isnan(low) or math.isnan(value)):  # centred on the cluster mean: keep the estimate inside
            low, high = min(low, value), max(high, value)
    if floor is None:
        row_level = paired_bootstrap(statistic, arrays, "rows", resamples=resamples, seed=seed, level=level,
                                     stream=stream, batched=batched)
        floor = (row_level["low"], row_level["high"])
    widened = False
    if not (math.isnan(floor[0]) or math.isnan(floor[1])):
        if math.isnan(low) or math.isnan(high):
            low, high, widened = float(floor[0]), float(floor[1]), True
        elif floor[0] < low or floor[1] > high:
            low, high, widened = min(low, float(floor[0])), max(high, float(floor[1])), True
    if bounds is not None and not (math.isnan(low) or math.isnan(high)):
        low, high = max(low, float(bounds[0])), min(high, float(bounds[1]))
    return {"value": value, "low": low, "high": high, "n": n, "unit": unit, "method": method,
            "resamples": int(resamples), "seed": int(seed), "level": level, "n_rows": rows, "widened": widened}
