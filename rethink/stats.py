"""Statistics for groups of runs that differ only in their seed: pure functions, no I/O.

A group's test accuracies are a sample of what its configuration gives over seeds. `judge_pairs` sets each
(baseline, candidate) pair of a comparison against each other, as one family:
1. the seeds: Welch's t (unequal variances, unequal sizes) gives the difference of the means, its confidence
   interval, p-value, degrees of freedom and effect size; two one-sided Welch tests (TOST) ask whether the
   difference lies within +-margin;
2. the family: the p-values of all pairs are adjusted together (Holm's step-down by default), so that the chance of
   any false better/worse among them stays at most the level, however many pairs there are;
3. the verdict: better/worse when the adjusted p is below the level, equivalent when the adjusted TOST p is, else
   within noise; cannot judge with fewer than 2 seeds a side or no spread the test set can resolve; never a
   verdict from a difference of one test image or less;
4. power: the smallest difference these seeds detect, and the seeds a side another difference needs, for the
   Welch test itself (its degrees of freedom drawn from the data, integrated exactly), at the level the
   correction asks of the first test (alpha / comparisons);
5. the test images: a two-level bootstrap over test images and seeds (seeded: the same inputs give the same
   numbers), and the probability that the candidate beats the baseline on a new seed.
"""

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from scipy import optimize, stats

BETTER = "better"
WORSE = "worse"
EQUIVALENT = "equivalent"
WITHIN_NOISE = "within noise"
CANNOT_JUDGE = "cannot judge"

CORRECTIONS = ("holm", "bonferroni", "none")
MOST_SEEDS = 1000  # seeds_needed gives up beyond this many seeds a side
ROUND_OFF = 1e-9  # accuracies closer than this are equal (k/N accuracies differ from their mean by ~1e-16)
BOOTSTRAP_SEED = 0
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(32)  # Gauss-Legendre on [-1, 1], moved to [0, 1] below
_NODES, _WEIGHTS = (_NODES + 1) / 2, _WEIGHTS / 2


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
class Rules:
    """How a comparison judges: the compare.* settings (README, "Compare runs")."""

    confidence: float = 0.95  # of every interval; the level of every test is 1 - confidence
    power: float = 0.8  # for the detectable difference and the seeds needed
    detect: float = 0.005  # the difference (a fraction of accuracy) whose seeds needed are reported
    margin: float = 0.005  # equivalence: |difference| < margin
    correction: str = "holm"
    bootstrap: int = 10000  # draws of the two-level bootstrap; 0: none

    @property
    def alpha(self) -> float:
        return 1 - self.confidence


@dataclass(frozen=True)
class Pair:
    """What one verdict is judged on: each side's test accuracy per seed; `resolution`, one test image as a
    fraction of accuracy (1 / test images; None when unknown); and for the bootstrap, each side's per-image
    results (seeds x test images, 1 where the seed got the image right; None when the runs did not save them),
    `paired` when both sides scored the same test images in the same order."""

    baseline: Sequence[float]
    candidate: Sequence[float]
    resolution: Optional[float] = None
    correct_baseline: Optional[np.ndarray] = None
    correct_candidate: Optional[np.ndarray] = None
    paired: bool = True


@dataclass(frozen=True)
class Bootstrap:
    """Candidate minus baseline over seeds and test images: `ci` of the difference in accuracy, and of the
    probability that the candidate beats the baseline on a new seed (`p_beat_ci`)."""

    draws: int
    ci: tuple[float, float]
    p_beat_ci: tuple[float, float]


@dataclass(frozen=True)
class Difference:
    """Candidate against baseline. `diff` is candidate mean minus baseline mean, `ci` its Welch interval (not
    adjusted for the family), `p_adjusted` the Welch p after the family's correction, `p_equivalence(_adjusted)`
    the TOST p; `detectable` the smallest true difference these seeds detect with the asked power at `level`,
    `seeds_needed` the seeds a side that would detect `detect` (None: more than MOST_SEEDS) and
    `seeds_needed_range` the same at the ends of the spread's confidence interval. Numbers a test needs are None
    where it could not run; `reason` says why, or adds what qualifies the verdict."""

    baseline: Sample
    candidate: Sample
    diff: Optional[float]
    verdict: str
    reason: str = ""
    ci: Optional[tuple[float, float]] = None
    se: Optional[float] = None
    df: Optional[float] = None
    t: Optional[float] = None
    p_value: Optional[float] = None
    p_adjusted: Optional[float] = None
    effect_size: Optional[float] = None  # diff / sqrt((s_b^2 + s_c^2) / 2)
    p_equivalence: Optional[float] = None
    p_equivalence_adjusted: Optional[float] = None
    comparisons: int = 1  # the family the p-values were adjusted over
    level: Optional[float] = None  # the level the power analysis is at
    detectable: Optional[float] = None
    seeds_needed: Optional[int] = None
    seeds_needed_range: Optional[tuple[Optional[int], Optional[int]]] = None
    p_beat: Optional[float] = None  # P(candidate > baseline) for a new seed of each (normal model)
    bootstrap: Optional[Bootstrap] = None
    levels_agree: Optional[bool] = None  # False: the seeds say better/worse, seeds and test images together cannot tell
    notes: list[str] = field(default_factory=list)


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
    baseline: Sequence[float],
    candidate: Sequence[float],
    confidence: float = 0.95,
    power: float = 0.8,
    detect: float = 0.005,
    margin: float = 0.005,
    resolution: Optional[float] = None,
) -> Difference:
    """One pair judged on its own (a family of one: no correction)."""
    rules = Rules(confidence, power, detect, margin, "none", bootstrap=0)
    return judge_pairs([Pair(baseline, candidate, resolution)], rules)[0]


# 1-3. The seeds' test, the family, the verdict ------------------------------------------------------------------


def judge_pairs(pairs: Sequence[Pair], rules: Rules) -> list[Difference]:
    """Every pair's verdict, the pairs adjusted as one family (`rules.correction`)."""
    tested = [_welch_tests(pair, rules) for pair in pairs]
    family = [i for i, d in enumerate(tested) if d.p_value is not None]
    adjusted = adjust([tested[i].p_value for i in family], rules.correction)
    adjusted_equivalence = adjust([tested[i].p_equivalence for i in family], rules.correction)
    level = rules.alpha / len(family) if rules.correction != "none" and family else rules.alpha
    judged = list(tested)
    for i, p, p_eq in zip(family, adjusted, adjusted_equivalence):
        judged[i] = _verdict(tested[i], pairs[i], rules, float(p), float(p_eq), len(family), level)
    return judged


def _welch_tests(pair: Pair, rules: Rules) -> Difference:
    """The seeds' Welch test and TOST, before any correction; or the reason there can be none."""
    a, b = describe(pair.baseline, rules.confidence), describe(pair.candidate, rules.confidence)
    diff = b.mean - a.mean if a.n and b.n else None
    if a.n == 0 or b.n == 0:
        return Difference(a, b, diff, CANNOT_JUDGE, "a side has no finished run")
    if a.n < 2 or b.n < 2:
        return Difference(a, b, diff, CANNOT_JUDGE, "fewer than 2 seeds on a side: no spread to judge by")
    base, cand = _snapped(pair.baseline, pair.resolution), _snapped(pair.candidate, pair.resolution)
    if np.ptp(base) == 0 and np.ptp(cand) == 0:
        image = " (to within half a test image)" if pair.resolution else ""
        return Difference(
            a,
            b,
            diff,
            CANNOT_JUDGE,
            f"every seed of each group gave the same accuracy{image}: no spread the test set can resolve",
        )
    # scipy warns of precision loss when one side's values are all equal; its result is exact
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        test = stats.ttest_ind(cand, base, equal_var=False)
        # equivalence: H0 diff <= -margin, and H0 diff >= +margin, each rejected by a one-sided Welch test
        above = stats.ttest_ind(cand + rules.margin, base, equal_var=False, alternative="greater")
        below = stats.ttest_ind(cand - rules.margin, base, equal_var=False, alternative="less")
    ci = test.confidence_interval(confidence_level=rules.confidence)
    va, vb = float(np.var(base, ddof=1)), float(np.var(cand, ddof=1))
    spread = math.sqrt((va + vb) / 2)
    return Difference(
        a,
        b,
        diff,
        WITHIN_NOISE,
        ci=(float(ci.low), float(ci.high)),
        se=math.sqrt(va / a.n + vb / b.n),
        df=float(test.df),
        t=float(test.statistic),
        p_value=float(test.pvalue),
        effect_size=diff / spread if spread else None,
        p_equivalence=float(max(above.pvalue, below.pvalue)),
    )


def _snapped(values: Sequence[float], resolution: Optional[float]) -> np.ndarray:
    """`values`, or where they lie within half a test image of each other (round-off: 443/551 three times gives a
    variance of 1e-32), their mean repeated: no spread is seen there."""
    x = np.asarray(values, dtype=float)
    tolerance = resolution / 2 if resolution else ROUND_OFF
    return np.full_like(x, x.mean()) if np.ptp(x) < tolerance else x


def adjust(p_values: Sequence[float], correction: str) -> np.ndarray:
    """p-values adjusted for their family: `holm` (step-down: the k-th smallest times m - k + 1, kept monotone),
    `bonferroni` (times m) or `none`; capped at 1. Rejecting where the adjusted p < alpha keeps the chance of any
    false rejection at most alpha."""
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    if correction == "none" or m == 0:
        return p
    if correction == "bonferroni":
        return np.minimum(1.0, p * m)
    if correction != "holm":
        raise ValueError(f"unknown correction {correction!r}; allowed: {', '.join(CORRECTIONS)}")
    order = np.argsort(p)
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, stepped)
    return adjusted


def _verdict(
    d: Difference, pair: Pair, rules: Rules, p: float, p_eq: float, comparisons: int, level: float
) -> Difference:
    """The verdict from the adjusted p-values, with the power analysis at `level` and the test images' bootstrap."""
    notes = []
    if p < rules.alpha and pair.resolution and abs(d.diff) <= pair.resolution * (1 + 1e-6):
        verdict, reason = WITHIN_NOISE, "a difference of one test image or less is never a verdict"
    elif p < rules.alpha:
        verdict, reason = (BETTER if d.diff > 0 else WORSE), ""
        if p_eq < rules.alpha:
            notes.append(f"the difference also lies within the margin of ±{100 * rules.margin:.2f} points")
    elif p_eq < rules.alpha:
        verdict, reason = EQUIVALENT, ""
    else:
        verdict, reason = WITHIN_NOISE, ""
    na, nb = d.baseline.n, d.candidate.n
    va, vb = (float(np.var(_snapped(v, pair.resolution), ddof=1)) for v in (pair.baseline, pair.candidate))
    low, high = spread_factors(na + nb - 2, rules.confidence)
    boot = None
    if rules.bootstrap and pair.correct_baseline is not None and pair.correct_candidate is not None:
        boot = two_level_bootstrap(
            _snapped(pair.baseline, pair.resolution),
            _snapped(pair.candidate, pair.resolution),
            pair.correct_baseline,
            pair.correct_candidate,
            pair.paired,
            rules.bootstrap,
            rules.confidence,
        )
    agree = None
    if boot is not None and verdict in (BETTER, WORSE):
        agree = bool(boot.ci[0] > 0 if verdict == BETTER else boot.ci[1] < 0)
    return Difference(
        **{
            **d.__dict__,
            "verdict": verdict,
            "reason": reason,
            "p_adjusted": p,
            "p_equivalence_adjusted": p_eq,
            "comparisons": comparisons,
            "level": level,
            "notes": notes,
            "detectable": detectable_difference(va, na, vb, nb, level, rules.power),
            "seeds_needed": seeds_needed(va, vb, rules.detect, level, rules.power),
            "seeds_needed_range": tuple(
                seeds_needed(va * f, vb * f, rules.detect, level, rules.power) for f in (low, high)
            ),
            "p_beat": probability_of_improvement(d.diff, va, vb),
            "bootstrap": boot,
            "levels_agree": agree,
        }
    )


# 4. Power of the Welch test -------------------------------------------------------------------------------------


def welch_df(var_a, n_a: int, var_b, n_b: int):
    """Welch-Satterthwaite degrees of freedom of the difference of two means (arrays too)."""
    va, vb = var_a / n_a, var_b / n_b
    return (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))


def welch_power(delta: float, var_a: float, n_a: int, var_b: float, n_b: int, alpha: float) -> float:
    """The probability that the two-sided Welch test at level `alpha` rejects, for samples of `n_a` and `n_b` values
    from normal distributions with these variances (not both 0) whose means differ by `delta`.

    The test rejects when |D| > t(1 - alpha/2, nu) * se, where D, the difference of the sample means, is normal, and
    se and nu come from the two sample variances, which are independent of D and scaled chi-square. Given the
    sample variances the probability is exact (the normal distribution's two tails); it is integrated over both
    sample variances by Gauss-Legendre quadrature on their quantiles (32 x 32 nodes). This is the power of the
    test as it is run, with degrees of freedom drawn from the data: a noncentral t at fixed degrees of freedom
    overstates it at few seeds (at 3 seeds a side, its 80%-power difference has about 70% power)."""
    total = var_a + var_b
    critical, sd = _rejection_grid(var_a / total, n_a, n_b, alpha)  # for variances that sum to 1: scale delta instead
    z = delta / math.sqrt(total)
    rejects = stats.norm.sf((critical - z) / sd) + stats.norm.cdf((-critical - z) / sd)
    return float(_WEIGHTS @ rejects @ _WEIGHTS)


@functools.lru_cache(maxsize=4096)
def _rejection_grid(share_a: float, n_a: int, n_b: int, alpha: float) -> tuple[np.ndarray, float]:
    """For true variances share_a and 1 - share_a: the threshold on |D| at which the test rejects, at each pair of
    quadrature nodes of the two sample variances; and the standard deviation of D. The same for every delta (a
    search over delta computes it once)."""
    sa = share_a * stats.chi2.ppf(_NODES, n_a - 1) / (n_a - 1)
    sb = (1 - share_a) * stats.chi2.ppf(_NODES, n_b - 1) / (n_b - 1)
    sa, sb = np.meshgrid(sa, sb, indexing="ij")
    with np.errstate(invalid="ignore", divide="ignore"):
        critical = stats.t.ppf(1 - alpha / 2, welch_df(sa, n_a, sb, n_b)) * np.sqrt(sa / n_a + sb / n_b)
    critical = np.nan_to_num(critical, nan=0.0)  # both sample variances 0 (a side with none): no node of weight there
    critical.flags.writeable = False
    return critical, math.sqrt(share_a / n_a + (1 - share_a) / n_b)


def detectable_difference(var_a: float, n_a: int, var_b: float, n_b: int, alpha: float, power: float) -> float:
    """The smallest true difference that Welch's test on samples this size, from runs whose accuracy varies over
    seeds with these variances, detects with probability `power` at level `alpha`."""
    if var_a + var_b == 0:
        return 0.0

    def short(delta: float) -> float:
        return welch_power(delta, var_a, n_a, var_b, n_b, alpha) - power

    if short(0.0) >= 0:  # power at most the level (the settings are checked, so this is for direct callers)
        return 0.0
    high = math.sqrt(var_a / n_a + var_b / n_b)
    while short(high) < 0:
        high *= 2
    return optimize.brentq(short, 0.0, high, xtol=1e-12, rtol=1e-6)


def seeds_needed(
    var_a: float, var_b: float, effect: float, alpha: float, power: float, most: int = MOST_SEEDS
) -> Optional[int]:
    """The fewest seeds a side (the same on both sides, at least 2) at which Welch's test detects a true difference
    of `effect` with probability `power` at level `alpha`, for runs whose test accuracy varies over seeds with these
    variances (not both 0); None when more than `most` would be needed."""
    if var_a + var_b == 0:
        return 2

    def enough(n: int) -> bool:
        return welch_power(effect, var_a, n, var_b, n, alpha) >= power

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


def spread_factors(df: int, confidence: float) -> tuple[float, float]:
    """The confidence interval of a variance estimated with `df` degrees of freedom, as factors of the estimate
    (chi-square: [df / chi2(1 - a/2, df), df / chi2(a/2, df)]). With 3 seeds a side (df 4) at 95%: 0.36 to 8.3."""
    tail = (1 - confidence) / 2
    return df / float(stats.chi2.ppf(1 - tail, df)), df / float(stats.chi2.ppf(tail, df))


# 5. The test images: a two-level bootstrap, and the probability of beating the baseline ------------------------


def probability_of_improvement(diff: float, var_a: float, var_b: float) -> float:
    """P(candidate > baseline) for one new seed of each, when the seeds' accuracies are normal with these spreads
    and means `diff` apart: Phi(diff / sqrt(var_a + var_b)) (the probability of improvement of Agarwal et al. 2021,
    under the same normal model as Welch's t: at 3 seeds the share of seed pairs would say 1.00 for any clean
    separation)."""
    return float(stats.norm.cdf(diff / math.sqrt(var_a + var_b)))


def two_level_bootstrap(
    baseline: np.ndarray,
    candidate: np.ndarray,
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    paired: bool,
    draws: int,
    confidence: float,
    seed: int = BOOTSTRAP_SEED,
) -> Bootstrap:
    """Percentile intervals of candidate (b) minus baseline (a) accuracy, and of the probability of improvement, over
    draws of both levels of what the accuracies rest on:
    - the test images, resampled with replacement (the same draw for both sides when they scored the same images,
      `paired`): each draw shifts the difference by what those images give against the images scored;
    - the seeds, drawn from what the seeds show: the difference of their means from Welch's t distribution
      (diff + se * T(nu)), each side's variance from its scaled inverse chi-square. A resample of the seeds
      themselves would do at many seeds; at 3 it has 10 distinct outcomes and gives intervals far too narrow.
    With no image to resample the difference's interval is Welch's: the test images can only widen it.
    `baseline`, `candidate`: accuracy per seed; `correct_*`: seeds x test images, 1 where the seed's run classified
    the image right (a fraction where runs repeated a seed). Seeded: the same inputs give the same numbers."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(baseline, dtype=float), np.asarray(candidate, dtype=float)
    va, vb = float(a.var(ddof=1)), float(b.var(ddof=1))
    diff, se, df = b.mean() - a.mean(), math.sqrt(va / len(a) + vb / len(b)), float(welch_df(va, len(a), vb, len(b)))
    images = _image_shifts(
        rng, np.asarray(correct_a, dtype=float).mean(0), np.asarray(correct_b, dtype=float).mean(0), paired, draws
    )
    differences = diff + images + se * rng.standard_t(df, size=draws)
    spread = np.sqrt(_drawn_variance(rng, va, len(a), draws) + _drawn_variance(rng, vb, len(b), draws))
    tails = [50 * (1 - confidence), 50 * (1 + confidence)]
    ci, p_beat_ci = (
        tuple(float(x) for x in np.percentile(values, tails))
        for values in (differences, stats.norm.cdf(differences / spread))
    )
    return Bootstrap(draws, ci, p_beat_ci)


def _image_shifts(
    rng: np.random.Generator, right_a: np.ndarray, right_b: np.ndarray, paired: bool, draws: int, chunk: int = 250
) -> np.ndarray:
    """Per draw of the test images (with replacement): the candidate's minus the baseline's mean share of seeds right
    on them, less the same on the images as scored. `right_*`: per image, the share of that side's seeds right."""
    shifts = []
    for start in range(0, draws, chunk):
        k = min(chunk, draws - start)
        weights_a = rng.multinomial(len(right_a), np.full(len(right_a), 1 / len(right_a)), size=k) / len(right_a)
        weights_b = (
            weights_a
            if paired
            else rng.multinomial(len(right_b), np.full(len(right_b), 1 / len(right_b)), size=k) / len(right_b)
        )
        shifts.append(weights_b @ right_b - weights_a @ right_a)
    return np.concatenate(shifts) - (right_b.mean() - right_a.mean())


def _drawn_variance(rng: np.random.Generator, variance: float, n: int, draws: int) -> np.ndarray:
    """Variances that a sample variance `variance` of `n` values allows: variance * (n - 1) / chi-square(n - 1)."""
    return variance * (n - 1) / rng.chisquare(n - 1, size=draws)


def above_chance(accuracy: float, images: Optional[int], classes: int, confidence: float = 0.95) -> bool:
    """Whether `accuracy` on `images` test images is better than guessing among `classes` (1/classes): a one-sided
    binomial test at level 1 - confidence; without the count of images, whether it is above 1/classes at all."""
    if not images:
        return accuracy > 1 / classes
    correct = round(accuracy * images)
    return float(stats.binomtest(correct, images, 1 / classes, alternative="greater").pvalue) < 1 - confidence
