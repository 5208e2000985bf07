"""Paired statistics of a seeded comparison (pure numpy, no flags).

An experiment runs every arm (scratch, each pre-training method) once per
seed with the same labelled subset, data order and initialisation of new
layers for that seed, so arm and scratch are compared per seed: the paired
difference ``arm[seed] - scratch[seed]``. Its mean estimates the effect;
a percentile bootstrap over seeds gives a 95 % interval for that mean.

The bootstrap resamples the ``n`` differences with replacement ``resamples``
times (``numpy.random.default_rng(seed)``, so the interval is
reproducible), takes each resample's mean, and returns the 2.5 % and
97.5 % quantiles of those means (numpy's default linear interpolation).
With fewer than two differences there is no spread to resample: the
interval is ``(nan, nan)`` (a single seed would otherwise give the
zero-width ``(d, d)``, which claims a certainty one run cannot have).

Rule of thumb for planning: the interval's half-width is about
``2.0 * s / sqrt(n)`` for ``n`` seeds whose paired differences have standard
deviation ``s``, so resolving a difference ``h`` needs about
``(2.0 * s / h) ** 2`` seeds (:func:`seeds_needed`).
"""

import math

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


def paired(arm, base):
    """Pairs two ``{seed: value}`` dicts on the seeds both have a value
    (not None, not NaN) for. Returns ``(seeds, arm_values, base_values)``,
    seeds sorted, values as float arrays."""
    seeds = sorted(s for s in arm if s in base and _ok(arm[s]) and _ok(base[s]))
    return (seeds, np.array([arm[s] for s in seeds], float),
            np.array([base[s] for s in seeds], float))


def _ok(value):
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def resample_means(values, resamples=RESAMPLES, seed=0):
    """Means of ``resamples`` bootstrap resamples (with replacement, same
    size) of ``values``, drawn with ``numpy.random.default_rng(seed)``."""
    values = np.asarray(values, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(int(resamples), len(values)))
    return values[idx].mean(axis=1)


def bootstrap_ci(values, resamples=RESAMPLES, seed=0, level=LEVEL):
    """Percentile bootstrap interval ``(lo, hi)`` of the mean of ``values``;
    ``(nan, nan)`` with fewer than two values (see the module docstring)."""
    values = np.asarray(values, float)
    if len(values) < 2:
        return (math.nan, math.nan)
    means = resample_means(values, resamples, seed)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return (float(lo), float(hi))


def sample_std(values):
    """Standard deviation with ``n - 1`` (nan below two values)."""
    values = np.asarray(values, float)
    return float(values.std(ddof=1)) if len(values) >= 2 else math.nan


def describe(values, resamples=RESAMPLES, seed=0, level=LEVEL):
    """``{"n", "mean", "std", "ci95"}`` of a list of per-seed values
    (mean nan when empty)."""
    values = np.asarray(values, float)
    return {"n": int(len(values)),
            "mean": float(values.mean()) if len(values) else math.nan,
            "std": sample_std(values),
            "ci95": bootstrap_ci(values, resamples, seed, level)}


def paired_difference(arm, base, resamples=RESAMPLES, seed=0, level=LEVEL):
    """Paired comparison of ``{seed: value}`` dicts: ``{"seeds", "diffs",
    "diff_mean", "diff_std", "diff_ci95"}`` of ``arm - base`` over the seeds
    both have (diff_mean nan when none)."""
    seeds, a, b = paired(arm, base)
    d = a - b
    summary = describe(d, resamples, seed, level)
    return {"seeds": seeds, "diffs": [float(x) for x in d], "diff_mean": summary["mean"],
            "diff_std": summary["std"], "diff_ci95": summary["ci95"]}


def half_width(std, n, z=2.0):
    """Planning half-width ``z * std / sqrt(n)`` of the interval of a mean."""
    return z * std / math.sqrt(n) if n > 0 else math.inf


def seeds_needed(std, target, z=2.0):
    """Seeds for an interval half-width of at most ``target`` when the paired
    differences have standard deviation ``std``: ``ceil((z * std / target) ** 2)``,
    at least 2 (nan when ``std`` is nan)."""
    if std is None or math.isnan(std):
        return math.nan
    return max(2, math.ceil((z * std / target) ** 2 - 1e-12))
