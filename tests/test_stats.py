"""The shared exact tail probability against brute-force enumeration."""

import math
from fractions import Fraction
from itertools import combinations

import pytest

from mneme_plugin.stats import hypergeometric_sf


@pytest.mark.parametrize("population,successes,draws", [(12, 5, 4), (20, 7, 9), (9, 9, 3), (10, 0, 4)])
def test_hypergeometric_tail_matches_exact_enumeration(population, successes, draws):
    items = range(population)
    total, counts = 0, {}
    for drawn in combinations(items, draws):
        k = sum(1 for i in drawn if i < successes)
        counts[k] = counts.get(k, 0) + 1
        total += 1
    for k in range(0, draws + 2):
        exact = Fraction(sum(c for kk, c in counts.items() if kk >= k), total)
        assert hypergeometric_sf(k, population, successes, draws) == pytest.approx(float(exact), rel=1e-9, abs=1e-15)


def test_hypergeometric_tail_is_a_probability_for_large_populations():
    p = hypergeometric_sf(30, 100_000, 5_000, 200)
    assert 0.0 <= p <= 1.0 and math.isfinite(p)
    assert hypergeometric_sf(10, 100_000, 5_000, 200) > p
