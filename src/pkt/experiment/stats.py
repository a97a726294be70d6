"""Summary statistics for the results: mean ± std over seeds, paired differences with intervals and p-values,
exact McNemar tests and Holm's family-wise correction.

The design they match: every arm of a study is evaluated on the same questions in every seed (a fixed
evaluation subset, or the whole test set), so the seeds *share* the questions. A difference "arm − reference"
is a mean over seeds × questions of per-question differences, and its uncertainty has two sources: which
questions the test happened to hold (shared by all seeds) and which seeds were trained. The interval therefore
resamples the questions **once** for all seeds (the same question indices in every seed) and, independently, the
seeds: a two-way (pigeonhole) bootstrap. Resampling the questions independently within each seed, as pkt did
before, treats three seeds on the same 150 questions as 450 independent questions and gives intervals too
narrow by about √3 for the question part (tests/test_stats.py measures both methods' coverage on simulated
studies with a known difference).

When the seeds' lists differ in length (each seed drew its own subset of another size) the questions cannot be
shared and are resampled within each seed; for independent subsets of one size, sharing the indices is harmless:
each seed's questions are then unrelated, so which index stands for which question is arbitrary.

The p-value is the bootstrap's own two-sided one (twice the smaller tail mass at 0, with the usual +1 so that it
is never 0), so "the interval excludes 0" and "p < 0.05" agree up to the resolution of ``n_boot`` draws. A report
states many comparisons; :func:`holm` adjusts their p-values together (Holm 1979, step-down), and a report shows
the raw and the adjusted verdict side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np

N_BOOT = 10_000  # enough draws for tail p-values down to ~1e-4, which Holm over ~50 comparisons needs


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


@dataclass(frozen=True)
class Difference:
    """mean(method) − mean(reference) over seeds × questions, its bootstrap interval and two-sided p-value."""

    mean: float
    low: float
    high: float
    p: float

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


def _seed_counts(n_seeds: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    # seeds drawn with replacement, as counts per seed: (n_boot, n_seeds)
    return rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=n_boot).astype(float)


def _question_counts(n_q: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    # one draw of question indices per replicate, used by every seed: (n_boot, n_q) counts
    return rng.multinomial(n_q, np.full(n_q, 1 / n_q), size=n_boot).astype(float)


def two_way_counts(n_seeds: int, n_q: int, n_boot: int = N_BOOT, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The draws of :func:`paired_difference`'s two-way bootstrap, for a statistic that is not a mean difference
    (e.g. where a loss curve crosses a level): (seed counts (n_boot, n_seeds), question counts (n_boot, n_q)).
    Replicate b weighs seed s by ``seed_counts[b, s]`` and question i, the same in every seed, by
    ``q_counts[b, i]``; the same ``seed`` gives the same draws as :func:`paired_difference`."""
    rng = np.random.default_rng(seed)
    seeds = _seed_counts(n_seeds, n_boot, rng)
    return seeds, _question_counts(n_q, n_boot, rng)


def _draws(diffs: list[np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` bootstrap replicates of the mean over seeds of each seed's mean difference."""
    n_seeds = len(diffs)
    seed_counts = _seed_counts(n_seeds, n_boot, rng)
    lengths = {len(d) for d in diffs}
    if len(lengths) == 1:
        n_q = lengths.pop()
        q_counts = _question_counts(n_q, n_boot, rng)
        per_seed = q_counts @ np.stack(diffs).T / n_q  # (n_boot, n_seeds): each seed's mean on the drawn questions
    else:  # subsets of different sizes cannot share questions: each seed's own resample
        per_seed = np.stack([rng.multinomial(len(d), np.full(len(d), 1 / len(d)), size=n_boot) @ d / len(d)
                             for d in diffs], axis=1)
    return (seed_counts * per_seed).sum(axis=1) / n_seeds


def paired_difference(method: list[list[float]], base: list[list[float]], n_boot: int = N_BOOT, seed: int = 0,
                      level: float = 0.95) -> Difference:
    """The paired difference mean(method) − mean(base); the lists are per seed, per question, and question i of a
    seed is the same question for both (and, with lists of one length, for every seed)."""
    if not method or len(method) != len(base) or any(len(a) != len(b) or not len(a) for a, b in zip(method, base)):
        raise ValueError("a paired difference needs the same seeds and questions for both arms")
    diffs = [np.asarray(a, float) - np.asarray(b, float) for a, b in zip(method, base)]
    point = float(np.mean([d.mean() for d in diffs]))
    stats = _draws(diffs, n_boot, np.random.default_rng(seed))
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Difference(point, float(lo), float(hi), bootstrap_p(stats))


def bootstrap_p(draws: np.ndarray) -> float:
    """The two-sided bootstrap p of "the statistic is 0" from its replicates: twice the smaller share of draws on
    either side of 0 (with the +1 that keeps it above 0 for a finite number of draws). Ties at exactly 0 count in
    both tails: a statistic that is 0 in every draw gets p = 1."""
    draws = np.asarray(draws, dtype=float)
    tail = min(int((draws <= 0).sum()), int((draws >= 0).sum()))
    return min(1.0, 2 * (tail + 1) / (len(draws) + 1))


def paired_bootstrap(method: list[list[float]], base: list[list[float]], n_boot: int = N_BOOT, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(mean difference, low, high) of :func:`paired_difference`."""
    d = paired_difference(method, base, n_boot=n_boot, seed=seed, level=level)
    return d.mean, d.low, d.high


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: the family-wise error rate of rejecting every
    hypothesis whose adjusted p is ≤ α is at most α, whatever the dependence between the tests."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs (questions only A gets right, only B gets right)
    under Binomial(n, 1/2). Each question must count once: test each seed on its own, never add one question's
    pairs from several seeds into one test (they are not independent)."""
    if only_a < 0 or only_b < 0:
        raise ValueError("discordant counts are non-negative")
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n)
