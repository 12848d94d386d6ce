"""Statistics for groups of runs that differ only in their seed: pure functions, no I/O.

A group's test accuracies are a sample of what its configuration gives over seeds. Two groups are set
against each other with Welch's t (unequal variances, unequal sizes): the difference of their means,
its confidence interval, a verdict, and the power analysis that says what this many seeds could have
seen (through the noncentral t distribution, the exact power of the t test).
"""

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import optimize, stats

BETTER = "better"
WORSE = "worse"
WITHIN_NOISE = "within noise"
CANNOT_JUDGE = "cannot judge"

MOST_SEEDS = 1000  # seeds_needed gives up beyond this many seeds a side


@dataclass(frozen=True)
class Sample:
    """One group's values: count, mean, sample standard deviation and the mean's confidence interval
    (t distribution). Below 2 values there is no spread and no interval."""

    n: int
    mean: Optional[float]
    std: Optional[float]
    ci: Optional[tuple[float, float]]
    variance: Optional[float]


@dataclass(frozen=True)
class Difference:
    """Candidate against baseline. `diff` is candidate mean minus baseline mean; `ci` its confidence
    interval (Welch); `detectable` the smallest true difference these seeds detect with the asked
    power at the asked level; `seeds_needed` the seeds a side that would detect `detect` (None when
    more than MOST_SEEDS). Both are None when no spread was seen (fewer than 2 values a side, or every
    seed gave the same value on both sides)."""

    baseline: Sample
    candidate: Sample
    diff: Optional[float]
    ci: Optional[tuple[float, float]]
    p_value: Optional[float]
    verdict: str
    detectable: Optional[float]
    seeds_needed: Optional[int]


def describe(values: Sequence[float], confidence: float = 0.95) -> Sample:
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Sample(0, None, None, None, None)
    mean = float(x.mean())
    if n < 2:
        return Sample(n, mean, None, None, None)
    variance = float(x.var(ddof=1))
    std = math.sqrt(variance)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Sample(n, mean, std, (mean - half, mean + half), variance)


def compare_samples(
    baseline: Sequence[float], candidate: Sequence[float], confidence: float = 0.95, power: float = 0.8, detect: float = 0.005
) -> Difference:
    """The verdict: `better` or `worse` when the confidence interval of the difference excludes 0
    (the two-sided Welch test at level 1 - confidence), `within noise` when it holds 0, `cannot
    judge` with fewer than 2 values on a side (no spread to judge by)."""
    a, b = describe(baseline, confidence), describe(candidate, confidence)
    if a.n < 2 or b.n < 2:
        diff = b.mean - a.mean if a.n and b.n else None
        return Difference(a, b, diff, None, None, CANNOT_JUDGE, None, None)
    alpha = 1 - confidence
    diff = b.mean - a.mean
    if a.variance + b.variance == 0:  # every seed gave the same number: no noise seen, and nothing to size a test by
        verdict = BETTER if diff > 0 else WORSE if diff < 0 else WITHIN_NOISE
        return Difference(a, b, diff, (diff, diff), None, verdict, None, None)
    with warnings.catch_warnings():  # scipy warns of precision loss when one side's values are all equal; its result is exact
        warnings.simplefilter("ignore", RuntimeWarning)
        test = stats.ttest_ind(candidate, baseline, equal_var=False)
    ci = test.confidence_interval(confidence_level=confidence)
    low, high = float(ci.low), float(ci.high)
    verdict = BETTER if low > 0 else WORSE if high < 0 else WITHIN_NOISE
    return Difference(
        a, b, diff, (low, high), float(test.pvalue), verdict,
        detectable_difference(a.variance, a.n, b.variance, b.n, alpha, power),
        seeds_needed(a.variance, b.variance, detect, alpha, power),
    )


def welch_df(var_a: float, n_a: int, var_b: float, n_b: int) -> float:
    """Welch-Satterthwaite degrees of freedom of the difference of two means."""
    va, vb = var_a / n_a, var_b / n_b
    return (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))


def welch_power(noncentrality: float, df: float, alpha: float) -> float:
    """Power of the two-sided t test at level `alpha` when the true difference is `noncentrality`
    standard errors: P(|T| > t_crit) for T ~ noncentral t(df, noncentrality)."""
    critical = stats.t.ppf(1 - alpha / 2, df)
    with warnings.catch_warnings():  # far in a tail scipy's nct warns, or returns nan for what is 0
        warnings.simplefilter("ignore", RuntimeWarning)
        tails = np.array([stats.nct.sf(critical, df, noncentrality), stats.nct.cdf(-critical, df, noncentrality)])
    return float(np.nan_to_num(tails, nan=0.0).sum())


def detectable_difference(var_a: float, n_a: int, var_b: float, n_b: int, alpha: float, power: float) -> float:
    """The smallest true difference that Welch's test on samples this size and spread detects with
    probability `power` at level `alpha`."""
    se = math.sqrt(var_a / n_a + var_b / n_b)
    if se == 0:
        return 0.0
    df = welch_df(var_a, n_a, var_b, n_b)
    noncentrality = optimize.brentq(lambda nc: welch_power(nc, df, alpha) - power, 0.0, 1000.0)
    return noncentrality * se


def seeds_needed(var_a: float, var_b: float, effect: float, alpha: float, power: float, most: int = MOST_SEEDS) -> Optional[int]:
    """The fewest seeds a side (the same on both sides, at least 2) at which Welch's test detects a
    true difference of `effect` with probability `power` at level `alpha`, for runs whose test
    accuracy varies over seeds with these variances (not both 0); None when more than `most` would be needed."""
    spread = var_a + var_b

    def enough(n: int) -> bool:
        return welch_power(effect / math.sqrt(spread / n), welch_df(var_a, n, var_b, n), alpha) >= power

    if not enough(most):
        return None
    low, high = 2, most  # power grows with n: bisect for the first n that is enough
    while low < high:
        middle = (low + high) // 2
        if enough(middle):
            high = middle
        else:
            low = middle + 1
    return low


def above_chance(accuracy: float, images: Optional[int], classes: int, confidence: float = 0.95) -> bool:
    """Whether `accuracy` on `images` test images is better than guessing among `classes` (1/classes): a one-sided
    binomial test at level 1 - confidence; without the count of images, whether it is above 1/classes at all."""
    if not images:
        return accuracy > 1 / classes
    correct = round(accuracy * images)
    return float(stats.binomtest(correct, images, 1 / classes, alternative="greater").pvalue) < 1 - confidence
