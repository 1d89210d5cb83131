"""The exact best-of-N estimator against brute force, Monte Carlo and its limiting cases."""

import math
from fractions import Fraction
from itertools import combinations

import numpy as np
import pytest
from reference_estimators import (
    best_of_n_weights,
    expected_counts,
    monte_carlo_best_of_n,
    prefix_weights,
)

from rescue.estimators import Ranking, prefix_select_weights, rank_probabilities


def _key(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def brute_best_of_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Enumerate every N-subset; the pick is its argmax, shared evenly among tied maxima."""
    m = len(scores)
    w = np.zeros(m)
    subsets = list(combinations(range(m), n))
    for sub in subsets:
        top = max(_key(scores[k]) for k in sub)
        tied = [k for k in sub if _key(scores[k]) == top]
        for k in tied:
            w[k] += 1.0 / len(tied)
    return w / len(subsets)


def brute_prefix(scores: np.ndarray, n: int) -> np.ndarray:
    w = np.zeros(len(scores))
    top = max(_key(s) for s in scores[:n])
    tied = [k for k in range(n) if _key(scores[k]) == top]
    w[tied] = 1.0 / len(tied)
    return w


def random_scores(rng: np.random.Generator, m: int) -> np.ndarray:
    """Scores from a small set of levels (many ties), with failures (NaN, -inf) mixed in."""
    levels = rng.integers(1, 5)
    s = rng.integers(0, levels, size=m).astype(float) / 4
    s[rng.random(m) < 0.15] = np.nan
    s[rng.random(m) < 0.1] = -np.inf
    return s


def test_rank_probabilities_match_exact_binomials():
    for m, n in [(1, 1), (5, 3), (9, 9), (64, 8), (200, 37)]:
        exact = [Fraction(math.comb(m - 1 - j, n - 1), math.comb(m, n)) for j in range(m)]
        assert sum(exact) == 1
        np.testing.assert_allclose(rank_probabilities(m, n), [float(f) for f in exact],
                                   rtol=1e-12, atol=1e-300)


def test_rank_probabilities_stay_finite_and_normalised_for_large_pools():
    for m, n in [(3000, 1), (3000, 2), (3000, 1500), (5000, 4999)]:
        p = rank_probabilities(m, n)
        assert np.all(np.isfinite(p)) and np.all(p >= 0)
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(np.diff(p) <= 1e-300)  # a better rank is never less likely to win
        for j in (0, (m - n) // 2, m - n):
            log_exact = (math.lgamma(m - j) - math.lgamma(n) - math.lgamma(m - j - n + 1)
                         - (math.lgamma(m + 1) - math.lgamma(n + 1) - math.lgamma(m - n + 1)))
            assert p[j] == pytest.approx(math.exp(log_exact), rel=1e-9)
        assert np.all(p[m - n + 1:] == 0)


def test_exact_equals_brute_force_on_small_pools_with_ties():
    rng = np.random.default_rng(1)
    cases = 0
    for _ in range(300):
        m = int(rng.integers(1, 10))
        n = int(rng.integers(1, m + 1))
        scores = random_scores(rng, m)
        np.testing.assert_allclose(best_of_n_weights(scores, n), brute_best_of_n(scores, n),
                                   rtol=0, atol=1e-12)
        np.testing.assert_allclose(prefix_select_weights(scores, n), brute_prefix(scores, n),
                                   rtol=0, atol=1e-15)
        cases += 1
    assert cases == 300


def test_batched_weights_equal_row_by_row():
    rng = np.random.default_rng(2)
    scores = np.stack([random_scores(rng, 7) for _ in range(50)])
    for n in range(1, 8):
        batch = best_of_n_weights(scores, n)
        assert batch.shape == scores.shape
        for b in range(len(scores)):
            np.testing.assert_allclose(batch[b], best_of_n_weights(scores[b], n), atol=1e-15)
        np.testing.assert_allclose(prefix_select_weights(scores, n)[3],
                                   prefix_select_weights(scores[3], n))
    ranking = Ranking.of(scores)
    np.testing.assert_allclose(ranking.best_of_n(3), best_of_n_weights(scores, 3))


def test_weights_sum_to_one_and_favour_better_scores():
    rng = np.random.default_rng(3)
    for _ in range(50):
        m = int(rng.integers(2, 300))
        n = int(rng.integers(1, m + 1))
        scores = random_scores(rng, m)
        w = best_of_n_weights(scores, n)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        keys = np.where(np.isnan(scores), -np.inf, scores)
        for a, b in [(0, 1), (1, 0)]:
            if keys[a] > keys[b]:
                assert w[a] >= w[b]
            if keys[a] == keys[b]:
                assert w[a] == pytest.approx(w[b], abs=1e-15)


def test_n_equals_m_is_argmax_shared_among_ties():
    scores = np.array([0.3, 0.9, np.nan, 0.9, -np.inf, 0.1])
    np.testing.assert_allclose(best_of_n_weights(scores, 6), [0, 0.5, 0, 0.5, 0, 0])
    distinct = np.random.default_rng(4).random(40)
    w = best_of_n_weights(distinct, 40)
    assert w[np.argmax(distinct)] == 1.0 and w.sum() == 1.0


def test_n_equals_one_is_the_mean():
    scores = np.array([0.3, 0.9, np.nan, 0.9, -np.inf, 0.1, 0.1])
    values = np.array([0.1, 0.2, 0.0, 0.7, 0.0, 0.5, 0.4])
    w = best_of_n_weights(scores, 1)
    np.testing.assert_allclose(w, np.full(7, 1 / 7))
    assert w @ values == pytest.approx(values.mean())


def test_failed_candidates_rank_last():
    scores = np.array([np.nan, -np.inf, -5.0, np.nan])
    # with N = 2 a failed candidate is picked only when the subset holds no working one
    w = best_of_n_weights(scores, 2)
    assert w[2] == pytest.approx(0.5)  # in 3 of the 6 pairs
    np.testing.assert_allclose(w[[0, 1, 3]], 0.5 / 3)
    np.testing.assert_allclose(best_of_n_weights(scores, 4), [0, 0, 1, 0])


def test_all_failed_pool_shares_evenly():
    scores = np.full(5, np.nan)
    for n in range(1, 6):
        np.testing.assert_allclose(best_of_n_weights(scores, n), np.full(5, 0.2))
        np.testing.assert_allclose(prefix_select_weights(scores, n)[:n], np.full(n, 1 / n))


def test_prefix_weights():
    np.testing.assert_allclose(prefix_weights(5, 2), [0.5, 0.5, 0, 0, 0])
    np.testing.assert_allclose(prefix_select_weights(np.zeros(5), 2), prefix_weights(5, 2))
    scores = np.array([0.1, 0.8, 0.95, 0.2])
    np.testing.assert_allclose(prefix_select_weights(scores, 1), [1, 0, 0, 0])
    np.testing.assert_allclose(prefix_select_weights(scores, 2), [0, 1, 0, 0])
    np.testing.assert_allclose(prefix_select_weights(scores, 4), [0, 0, 1, 0])


@pytest.mark.parametrize("n", [0, 6])
def test_invalid_n_is_an_error(n):
    with pytest.raises(ValueError, match="N"):
        best_of_n_weights(np.zeros(5), n)
    with pytest.raises(ValueError, match="N"):
        prefix_select_weights(np.zeros(5), n)
    with pytest.raises(ValueError, match="N"):
        rank_probabilities(5, n)


def test_oracle_beats_every_selector_at_every_n():
    rng = np.random.default_rng(5)
    for _ in range(40):
        m = int(rng.integers(1, 40))
        ious = rng.random(m) * (rng.random(m) > 0.2)  # some zeros (failures)
        ious[rng.random(m) < 0.2] = 0.5  # ties in the truth too
        selectors = [
            ious + rng.normal(0, 0.3, m),  # a noisy verifier
            random_scores(rng, m),  # an uninformative, tied one
            -ious,  # an adversarial one
            -np.arange(m, dtype=float),  # first
        ]
        for n in range(1, m + 1):
            best = best_of_n_weights(ious, n) @ ious
            best_prefix = prefix_select_weights(ious, n) @ ious
            for s in selectors:
                assert best >= best_of_n_weights(s, n) @ ious - 1e-12
                assert best_prefix >= prefix_select_weights(s, n) @ ious - 1e-12


def test_expected_counts():
    w = np.array([[0.25, 0.75], [1.0, 0.0]])
    i, u = expected_counts(w, np.array([[4, 8], [1, 2]]), np.array([[10, 20], [5, 6]]))
    np.testing.assert_allclose(i, [7, 1])
    np.testing.assert_allclose(u, [17.5, 5])


# Monte-Carlo tolerance: the MC mean averages `draws` iid picks, so by the CLT its error is close
# to normal with the reported standard error (SE). We accept |exact - MC| <= 5 SE: a correct
# estimator fails with probability ~6e-7 per comparison (and the seed is fixed, so the test is
# deterministic). With 20000 draws of values in [0, 1] the SE is below 0.004, so the check has
# power: it rejects the plain pool mean and the prefix estimate, which differ by more than 5 SE.
DRAWS = 20_000


@pytest.mark.parametrize("n", [1, 2, 5, 16, 40, 64])
def test_exact_matches_monte_carlo_on_large_pool(n):
    rng = np.random.default_rng(100 + n)
    m = 64
    values = rng.random(m)
    scores = np.round(values + rng.normal(0, 0.3, m), 1)  # rounding makes ties
    scores[rng.random(m) < 0.1] = np.nan
    exact = best_of_n_weights(scores, n) @ values
    mc, se = monte_carlo_best_of_n(scores, values, n, DRAWS, rng)
    assert se < 0.004 or n == m  # at N = M every draw picks the same tie group
    assert abs(exact - mc) <= 5 * se + 1e-12
    if 2 <= n < m:  # the comparison can tell a wrong answer apart
        assert abs(values.mean() - mc) > 5 * se


def test_monte_carlo_rejects_a_wrong_estimator():
    rng = np.random.default_rng(7)
    m, n = 64, 8
    values = rng.random(m)
    scores = values + rng.normal(0, 0.1, m)
    mc, se = monte_carlo_best_of_n(scores, values, n, DRAWS, rng)
    assert abs(prefix_select_weights(scores, n) @ values - mc) > 5 * se
    assert abs(best_of_n_weights(scores, n) @ values - mc) <= 5 * se


def test_monte_carlo_with_subset_dependent_scores():
    rng = np.random.default_rng(8)
    m, n = 30, 4
    values = rng.random(m)
    scores = rng.random(m)
    # a selector that reads only its own subset's scores equals the exact estimator ...
    mc, se = monte_carlo_best_of_n(lambda sub: scores[sub], values, n, 4000, rng)
    assert abs(best_of_n_weights(scores, n) @ values - mc) <= 5 * se
    # ... and one that ranks by position within the subset picks its lowest index ("first")
    mc_first, se_first = monte_carlo_best_of_n(lambda sub: -np.sort(sub).searchsorted(sub),
                                               values, n, 4000, rng)
    exact_first = best_of_n_weights(-np.arange(m, dtype=float), n) @ values
    assert abs(exact_first - mc_first) <= 5 * se_first


def test_monte_carlo_vector_values_and_bad_shapes():
    rng = np.random.default_rng(9)
    values = rng.random((10, 2))
    mc, se = monte_carlo_best_of_n(np.arange(10.0), values, 10, 50, rng)
    np.testing.assert_allclose(mc, values[9])
    np.testing.assert_allclose(se, 0, atol=1e-15)
    with pytest.raises(ValueError):
        monte_carlo_best_of_n(np.arange(9.0), values, 2, 50, rng)
