"""``cpt_bench.stats``: the paired estimators against hand computations on small fixtures, paired against unpaired
intervals, McNemar's exact test, and the bootstrap gap closed."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import binomtest

from cpt_bench import stats

# Three windows: summed log-likelihoods (nats) of cells A and B over 4, 5 and 3 tokens.
LL_A, LL_B, COUNTS = [-10.0, -12.0, -9.0], [-8.0, -11.0, -7.0], [4, 5, 3]
T_2 = 4.302652729911275  # Student's t, 2 degrees of freedom, 0.975 quantile (tables)


def test_t_quantile_is_students():
    assert stats.t_quantile(3) == pytest.approx(T_2)
    assert stats.t_quantile(1000) == pytest.approx(1.962, abs=1e-3)


def test_log_perplexity_and_its_stderr_by_hand():
    # r = 31 / 12; residuals x - r n = (-1/3, -11/12, 5/4); nbar = 4; se^2 = sum e^2 / (k (k-1) nbar^2)
    estimate = stats.log_perplexity(LL_A, COUNTS)
    assert estimate.estimate == pytest.approx(31 / 12)
    variance = (Fraction(1, 3) ** 2 + Fraction(11, 12) ** 2 + Fraction(5, 4) ** 2) / (3 * 2 * 16)
    assert variance == Fraction(362, 13824)
    assert estimate.stderr == pytest.approx(math.sqrt(variance))
    assert estimate.ci == pytest.approx((31 / 12 - T_2 * estimate.stderr, 31 / 12 + T_2 * estimate.stderr))


def test_paired_change_of_log_perplexity_by_hand():
    # d = 26/12 - 31/12; u_i = (e_Bi - e_Ai) / nbar with e_B = (-2/3, 1/6, 1/2): u = (-1/12, 13/48, -3/16)
    paired = stats.paired_log_ppl_change(LL_A, COUNTS, LL_B, COUNTS)
    assert paired.estimate == pytest.approx(-5 / 12)
    variance = (Fraction(-1, 12) ** 2 + Fraction(13, 48) ** 2 + Fraction(-3, 16) ** 2) / (3 * 2)
    assert variance == Fraction(266, 13824)
    assert paired.stderr == pytest.approx(math.sqrt(variance)) and paired.n == 3
    assert paired.ci == pytest.approx((-5 / 12 - T_2 * paired.stderr, -5 / 12 + T_2 * paired.stderr))
    # with equal counts, u_i is the per-window difference of summed log-likelihood around the ratio, over nbar
    differences = [(a - b - (-5 / 12) * n) / 4 for a, b, n in zip(LL_A, LL_B, COUNTS, strict=True)]
    assert differences == pytest.approx([-1 / 12, 13 / 48, -3 / 16])
    unpaired = stats.unpaired_log_ppl_change(LL_A, COUNTS, LL_B, COUNTS)
    assert unpaired.estimate == pytest.approx(-5 / 12)
    assert unpaired.stderr == pytest.approx(math.sqrt(Fraction(362 + 104, 13824)))  # se_A^2 + se_B^2


def test_paired_difference_of_accuracies_by_hand():
    a = [1, 1, 0, 0, 1, 0, 1, 1]
    b = [1, 1, 1, 0, 1, 1, 1, 0]
    paired = stats.paired_difference(a, b)  # d = (0, 0, 1, 0, 0, 1, 0, -1)
    assert paired.estimate == pytest.approx(1 / 8)
    variance_of_d = (3 - 8 * (1 / 8) ** 2) / 7
    assert paired.stderr == pytest.approx(math.sqrt(variance_of_d / 8))
    assert paired.ci == pytest.approx((1 / 8 - stats.t_quantile(8) * paired.stderr,
                                       1 / 8 + stats.t_quantile(8) * paired.stderr))
    assert stats.discordant(a, b) == (1, 2)
    unpaired = stats.unpaired_difference(a, b)
    assert unpaired.stderr == pytest.approx(math.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 8))
    assert stats.discordant([0.5, 1], [1, 1]) is None  # not a 0 / 1 metric


@pytest.mark.parametrize(("only_a", "only_b", "p"), [
    (1, 9, 22 / 1024),  # 2 (C(10,0) + C(10,1)) / 2^10
    (9, 1, 22 / 1024),
    (0, 6, 2 / 64),
    (5, 5, 1.0),
    (0, 0, 1.0),
    (3, 12, 2 * sum(math.comb(15, i) for i in range(4)) / 2**15),
])
def test_mcnemar_exact_on_known_tables(only_a, only_b, p):
    assert stats.mcnemar_exact(only_a, only_b) == pytest.approx(p)
    if only_a + only_b:
        assert stats.mcnemar_exact(only_a, only_b) == pytest.approx(binomtest(only_a, only_a + only_b).pvalue)


def _correlated_windows(rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two cells' per-window log-likelihoods sharing each window's difficulty, and the token counts."""
    counts = rng.integers(20, 40, k).astype(float)
    difficulty = rng.normal(3.0, 0.8, k)  # nats per token, shared by both cells
    ll_a = -counts * (difficulty + rng.normal(0, 0.1, k))
    ll_b = -counts * (difficulty - 0.2 + rng.normal(0, 0.1, k))
    return ll_a, ll_b, counts


def test_paired_interval_is_never_wider_than_unpaired_on_positively_correlated_data():
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(200):
        ll_a, ll_b, counts = _correlated_windows(rng, int(rng.integers(3, 30)))
        residual_a = -ll_a - stats.log_perplexity(ll_a, counts).estimate * counts
        residual_b = -ll_b - stats.log_perplexity(ll_b, counts).estimate * counts
        if residual_a @ residual_b < 0:
            continue
        checked += 1
        paired = stats.paired_log_ppl_change(ll_a, counts, ll_b, counts)
        unpaired = stats.unpaired_log_ppl_change(ll_a, counts, ll_b, counts)
        assert paired.ci[1] - paired.ci[0] <= unpaired.ci[1] - unpaired.ci[0]
    assert checked > 150  # the fixture is positively correlated nearly always
    for _ in range(100):  # accuracies: B right mostly where A is
        a = (rng.random(50) < 0.6).astype(float)
        b = np.where(rng.random(50) < 0.9, a, 1 - a)
        if np.cov(a, b)[0, 1] >= 0:
            paired, unpaired = stats.paired_difference(a, b), stats.unpaired_difference(a, b)
            assert paired.stderr <= unpaired.stderr


def _ppl(ll: list[float], counts: list[int]) -> float:
    return math.exp(-sum(ll) / sum(counts))


def test_gap_closed_point_estimate_by_hand_and_a_fixed_seed_bootstrap():
    compressed, prompted, dense = [-14.0, -16.0, -13.0], LL_B, LL_A
    counts = COUNTS
    gap = stats.gap_closed(compressed, prompted, dense, counts)
    hand = (_ppl(compressed, counts) - _ppl(prompted, counts)) / (_ppl(compressed, counts) - _ppl(dense, counts))
    assert gap.estimate == pytest.approx(hand) and gap.n == 3
    assert gap.ci[0] <= gap.estimate <= gap.ci[1] and gap.stderr > 0
    assert stats.gap_closed(compressed, prompted, dense, counts) == gap  # fixed seed: the same interval
    assert stats.gap_closed(compressed, prompted, dense, counts, seed=1) != gap
    assert stats.gap_closed(compressed, compressed, dense, counts).estimate == 0.0
    assert stats.gap_closed(compressed, dense, dense, counts).estimate == pytest.approx(1.0)
    assert stats.gap_closed(dense, prompted, dense, counts) is None  # no gap to close


def test_gap_closed_of_accuracies():
    compressed, prompted, dense = [0, 1, 0, 0, 1, 0], [1, 1, 0, 0, 1, 1], [1, 1, 1, 0, 1, 1]
    gap = stats.gap_closed(compressed, prompted, dense)
    assert gap.estimate == pytest.approx((2 / 6 - 4 / 6) / (2 / 6 - 5 / 6))
    assert gap.ci is not None and gap.ci[0] <= gap.estimate <= gap.ci[1]


def test_estimators_refuse_misaligned_inputs():
    with pytest.raises(ValueError, match="equally long"):
        stats.paired_difference([1, 0], [1])
    one = stats.paired_difference([1], [0])
    assert one.stderr is None and one.ci is None and not one.excludes_zero


def test_cell_perplexity_stderr_is_the_delta_method_on_the_ratio_estimator():
    from cpt_bench.perplexity import perplexity_with_stderr

    value, stderr = perplexity_with_stderr(list(zip(LL_A, COUNTS, strict=True)))
    assert value == pytest.approx(math.exp(31 / 12))
    assert stderr == pytest.approx(math.exp(31 / 12) * math.sqrt(362 / 13824))
    assert perplexity_with_stderr([(-10.0, 4)]) == (pytest.approx(math.exp(2.5)), None)
