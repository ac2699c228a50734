"""Paired statistics of two (or three) evaluations on the same windows or items: the one home of the estimators.

Every cell of a matrix scores the same perplexity windows, or the same multiple-choice items, as every other cell
of its target, so a difference between two cells is best measured on per-example differences: their correlation
(a hard window is hard for every model) cancels, and the uncertainty of a difference is far below what the two
cells' own standard errors suggest. Inputs are plain sequences of per-example values in the same order.

Perplexity (``k`` windows; window ``i`` has summed log-likelihood ``ll_i`` nats over ``n_i`` tokens; ``x_i = -ll_i``):

- log token perplexity ``r = sum x_i / sum n_i`` is a ratio estimator, ``se(r)^2 = sum e_i^2 / (k (k-1) nbar^2)``
  with residuals ``e_i = x_i - r n_i`` and ``nbar = mean n_i`` (``log_perplexity``);
- the change in log perplexity from A to B, ``d = r_B - r_A`` (``paired_log_ppl_change``), linearised per window:
  ``u_i = e_Bi / nbar_B - e_Ai / nbar_A`` (equal token counts: ``u_i = ((ll_Ai - ll_Bi) - d n_i) / nbar``, the
  per-window differences of summed log-likelihood around the ratio), ``se(d)^2 = sum u_i^2 / (k (k-1))``;
  ``exp(d)`` is the perplexity ratio B / A. Unpaired, for contrast: ``se^2 = se(r_A)^2 + se(r_B)^2``, which
  exceeds the paired one by ``2 cov`` whenever the two cells' residuals are positively correlated.

Accuracy (``k`` items, scores ``a_i``, ``b_i``, 0 / 1 for accuracies):

- ``paired_difference``: ``d_i = b_i - a_i``, estimate ``mean d``, ``se = sd(d) / sqrt(k)`` (sd with ``k - 1``);
  unpaired: ``se^2 = var(a) / k + var(b) / k``;
- ``mcnemar_exact``: the two-sided exact McNemar test on the discordant items (``b01`` right only in B, ``b10``
  right only in A): ``p = min(1, 2 P(X <= min(b01, b10)))`` with ``X ~ Binomial(b01 + b10, 1/2)``. Where fewer than
  ``SMALL_DISCORDANT`` items disagree the normal-theory CI is unreliable, and the exact test decides significance.

Confidence intervals of ``d`` are ``d -+ t_{k-1, 0.975} se`` (Student's t with ``k - 1`` degrees of freedom, which
matters at the few windows CPU runs afford); the unpaired contrast uses the same quantile, so the two intervals
differ only through the pairing.

Gap closed, ``g = (C - P) / (C - D)`` for the compressed (C), prompted (P) and dense (D) cells' metric values
(token perplexity or accuracy; 1 = the prompt recovers the dense model, 0 = no change, negative = worse):
``gap_closed`` gives a **paired bootstrap** 95% CI: ``BOOTSTRAP_RESAMPLES`` resamples of the shared windows (or
items) with replacement, drawn with a fixed seed (``BOOTSTRAP_SEED``), the same indices for the three cells, ``g``
recomputed from each resample's sums, percentile interval; its ``stderr`` is the resamples' standard deviation.
Resamples where ``C == D`` (no gap) are dropped; a CI needs at least half of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
SMALL_DISCORDANT = 25  # fewer discordant items than this: McNemar's exact test decides significance
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its standard error and 95% CI (None where fewer than two examples), over ``n``."""

    estimate: float
    stderr: float | None
    ci: tuple[float, float] | None
    n: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the CI lies wholly above or below zero."""
        return self.ci is not None and (self.ci[0] > 0 or self.ci[1] < 0)


def t_quantile(k: int) -> float:
    """``t_{k-1, 0.975}``: the two-sided 95% quantile of Student's t with ``k - 1`` degrees of freedom (k >= 2)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + LEVEL / 2, k - 1))


def _with_ci(estimate: float, stderr: float | None, k: int) -> Estimate:
    if stderr is None or k < 2:
        return Estimate(estimate, None, None, k)
    half = t_quantile(k) * stderr
    return Estimate(estimate, stderr, (estimate - half, estimate + half), k)


def _arrays(*columns: Sequence[float]) -> list[np.ndarray]:
    arrays = [np.asarray(column, dtype=np.float64) for column in columns]
    if len({array.shape for array in arrays}) != 1 or arrays[0].ndim != 1 or arrays[0].size == 0:
        raise ValueError(f"expected equally long non-empty sequences, got lengths {[a.size for a in arrays]}")
    return arrays


def _ratio_residuals(loglikelihood: np.ndarray, counts: np.ndarray) -> tuple[float, np.ndarray]:
    """``r = sum x / sum n`` with ``x = -ll`` and the residuals ``(x_i - r n_i) / nbar``."""
    nll = -loglikelihood
    rate = float(nll.sum() / counts.sum())
    return rate, (nll - rate * counts) / counts.mean()


def _se_of_residuals(residuals: np.ndarray) -> float | None:
    """``sqrt(sum u_i^2 / (k (k-1)))``, None for one example."""
    k = residuals.size
    return None if k < 2 else math.sqrt(float((residuals**2).sum()) / (k * (k - 1)))


def log_perplexity(loglikelihood: Sequence[float], counts: Sequence[float]) -> Estimate:
    """Log token perplexity ``r`` of windows (summed log-likelihood in nats, token count each) and ``se(r)``."""
    ll, n = _arrays(loglikelihood, counts)
    rate, residuals = _ratio_residuals(ll, n)
    return _with_ci(rate, _se_of_residuals(residuals), ll.size)


def paired_log_ppl_change(ll_a: Sequence[float], n_a: Sequence[float], ll_b: Sequence[float],
                          n_b: Sequence[float]) -> Estimate:
    """``log ppl_B - log ppl_A`` over the same windows, with the paired (per-window) standard error and CI."""
    ll_a, n_a, ll_b, n_b = _arrays(ll_a, n_a, ll_b, n_b)
    rate_a, residuals_a = _ratio_residuals(ll_a, n_a)
    rate_b, residuals_b = _ratio_residuals(ll_b, n_b)
    return _with_ci(rate_b - rate_a, _se_of_residuals(residuals_b - residuals_a), ll_a.size)


def unpaired_log_ppl_change(ll_a: Sequence[float], n_a: Sequence[float], ll_b: Sequence[float],
                            n_b: Sequence[float]) -> Estimate:
    """``log ppl_B - log ppl_A`` with the standard error of two independent samples (for contrast)."""
    a, b = log_perplexity(ll_a, n_a), log_perplexity(ll_b, n_b)
    stderr = None if a.stderr is None or b.stderr is None else math.hypot(a.stderr, b.stderr)
    return _with_ci(b.estimate - a.estimate, stderr, min(a.n, b.n))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Estimate:
    """``mean(b - a)`` over the same items with ``sd(b - a) / sqrt(k)`` and its CI."""
    a, b = _arrays(a, b)
    differences = b - a
    k = differences.size
    stderr = None if k < 2 else float(differences.std(ddof=1)) / math.sqrt(k)
    return _with_ci(float(differences.mean()), stderr, k)


def unpaired_difference(a: Sequence[float], b: Sequence[float]) -> Estimate:
    """``mean(b) - mean(a)`` with ``sqrt(var(a) / k + var(b) / k)`` (for contrast)."""
    a, b = _arrays(a, b)
    k = a.size
    stderr = None if k < 2 else math.sqrt(float(a.var(ddof=1) + b.var(ddof=1)) / k)
    return _with_ci(float(b.mean() - a.mean()), stderr, k)


def discordant(a: Sequence[float], b: Sequence[float]) -> tuple[int, int] | None:
    """``(right only in A, right only in B)`` for 0 / 1 scores, None when a score is neither 0 nor 1."""
    a, b = _arrays(a, b)
    if not np.isin(a, (0.0, 1.0)).all() or not np.isin(b, (0.0, 1.0)).all():
        return None
    return int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value of ``only_a`` vs ``only_b`` discordant items (1.0 when none disagree)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def gap_closed(compressed: Sequence[float], prompted: Sequence[float], dense: Sequence[float],
               counts: Sequence[float] | None = None, resamples: int = BOOTSTRAP_RESAMPLES,
               seed: int = BOOTSTRAP_SEED) -> Estimate | None:
    """``(C - P) / (C - D)`` with a paired-bootstrap CI (module docstring); None when ``C == D`` on the full sample.

    With ``counts`` the three sequences are per-window summed log-likelihoods (nats) over ``counts`` tokens and the
    metric is token perplexity ``exp(-sum ll / sum n)``; without, they are per-item scores and the metric is their
    mean.
    """
    values = np.stack(_arrays(compressed, prompted, dense))  # [3, k]
    k = values.shape[1]
    weights_n = np.asarray(counts, dtype=np.float64) if counts is not None else np.ones(k)

    def metric(weights: np.ndarray) -> np.ndarray:  # weights [..., k] -> metric [3, ...]
        sums = np.tensordot(values, weights, axes=([1], [-1]))
        totals = weights @ weights_n
        return np.exp(-sums / totals) if counts is not None else sums / totals

    def ratio(m: np.ndarray) -> np.ndarray:
        gap = m[0] - m[2]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gap != 0, (m[0] - m[1]) / gap, np.nan)

    point = float(ratio(metric(np.ones(k))))
    if math.isnan(point):
        return None
    if k < 2:
        return Estimate(point, None, None, k)
    rng = np.random.default_rng(seed)
    weights = np.stack([np.bincount(row, minlength=k) for row in rng.integers(0, k, (resamples, k))]).astype(float)
    draws = ratio(metric(weights))
    draws = draws[np.isfinite(draws)]
    if draws.size < resamples / 2:
        return Estimate(point, None, None, k)
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Estimate(point, float(draws.std(ddof=1)), (float(low), float(high)), k)
