"""Confidence intervals for evaluation scores: Wilson for accuracies, a seeded bootstrap for the rest.

A score from a few hundred examples is noisy; every number the harness reports carries its sample
count n and a 95% interval so two models can be told apart (or not). No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist

import numpy as np


def z_value(confidence: float) -> float:
    """The two-sided standard normal quantile for ``confidence`` (1.959964 for 0.95)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``; (nan, nan) when n is 0.

    Unlike the normal (Wald) interval it stays inside [0, 1] and is sensible at 0/n and n/n.
    """
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return math.nan, math.nan
    z = z_value(confidence)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, center - half)  # exact ends: no rounding residue at 0/n, n/n
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def bootstrap_interval(
    items: Sequence | np.ndarray,
    statistic: Callable[[np.ndarray], float],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``items`` (rows of per-example statistics).

    Each resample draws len(items) rows with replacement (seeded: the same inputs give the same
    interval) and applies ``statistic`` to the (n, ...) array of drawn rows; corpus-level scores such as
    BLEU pass a statistic that sums sufficient statistics. (nan, nan) for no items.
    """
    data = np.asarray(items, dtype=np.float64)
    n = len(data)
    if n == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_resamples, n))
    values = np.sort([statistic(data[rows]) for rows in draws])
    alpha = (1 - confidence) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))
