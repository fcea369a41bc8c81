"""Exact tail probabilities shared by the stages that test counts: the prediction rules'
enrichment and breadth tests (``sideeffects``) and the ground truth's drop tests (``groundtruth``)."""

from __future__ import annotations

import math


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def hypergeometric_sf(k: int, population: int, successes: int, draws: int) -> float:
    """P(X >= k) for X ~ Hypergeometric(population, successes, draws): the one-sided Fisher exact
    p-value of seeing at least ``k`` successes among ``draws``."""
    low, high = max(0, draws - (population - successes)), min(draws, successes)
    if k <= low:
        return 1.0
    if k > high:
        return 0.0
    log_total = _log_comb(population, draws)
    terms = [_log_comb(successes, i) + _log_comb(population - successes, draws - i) - log_total
             for i in range(k, high + 1)]
    top = max(terms)
    return float(min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms)))
