"""Summary statistics for the results table: mean ± std over seeds and a paired bootstrap interval.

The interval for "method − vanilla student" resamples seeds, then examples within each seed (both with
replacement). The evaluation subset of a seed is the same for every method, so the difference is
paired per example, which is what makes small subsets informative.
"""

from __future__ import annotations

import numpy as np


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def paired_bootstrap(method: list[list[float]], base: list[list[float]], n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(mean difference, low, high) of mean(method) − mean(base); lists are per seed, per example."""
    if len(method) != len(base) or any(len(a) != len(b) for a, b in zip(method, base)):
        raise ValueError("paired bootstrap needs the same seeds and examples for both methods")
    diffs = [np.asarray(a, float) - np.asarray(b, float) for a, b in zip(method, base)]
    point = float(np.mean([d.mean() for d in diffs]))
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for i in range(n_boot):
        seeds = rng.integers(0, len(diffs), len(diffs))
        stats[i] = np.mean([diffs[s][rng.integers(0, len(diffs[s]), len(diffs[s]))].mean() for s in seeds])
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return point, float(lo), float(hi)
