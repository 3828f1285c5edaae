"""The studies' statistics, without scipy: Student t intervals and p-values (from the regularised incomplete beta
function), Holm's correction, and the tables' number format. Shared by experiments/run.py (the sorting-task
studies) and experiments/real_report.py (the real-data study); it imports neither, so neither imports the other
for them. Tested against hand computations in tests/test_experiments.py.
"""

import functools
import math


def betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, by its continued fraction (modified Lentz)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below the mean; use the symmetry above it
        return 1.0 - betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return front * f


def t_pvalue(t: float, df: int) -> float:
    """Two-sided P(|T| ≥ |t|) for Student's t with df degrees of freedom = I_{df/(df+t²)}(df/2, 1/2)."""
    return betainc(df / 2, 0.5, df / (df + t * t))


@functools.lru_cache
def t_quantile(df: int, level: float = 0.95) -> float:
    """t with P(|T| ≤ t) = level, by bisection on t_pvalue (cached: tables ask for the same few df)."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_pvalue(mid, df) > 1 - level else (lo, mid)
    return (lo + hi) / 2


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, unbiased standard deviation; nan for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% interval) = (x̄, t_{0.975, n−1} · s/√n), s the unbiased std. One value: nan."""
    n = len(values)
    mean, s = mean_std(values)
    return mean, (t_quantile(n - 1) * s / math.sqrt(n) if n > 1 else math.nan)


def t_test(values: list[float]) -> tuple[float, float, float]:
    """One-sample t test of mean 0 (for paired differences): (mean, 95% half-width, two-sided p)."""
    n = len(values)
    mean, half = mean_ci(values)
    if n < 2:
        return mean, math.nan, math.nan
    s = mean_std(values)[1]
    if s == 0:  # every difference the same: no evidence of spread; p = 1 if they are all 0, else 0
        return mean, half, 1.0 if mean == 0 else 0.0
    return mean, half, t_pvalue(mean / (s / math.sqrt(n)), n - 1)


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (family-wise error), in the input order; nan stays nan."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted, running = [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def fmt(mean: float, half: float = math.nan, digits: int = 3) -> str:
    mean = 0.0 if abs(mean) < 0.5 * 10**-digits else mean  # no "-0.000"
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def fmt_p(p: float) -> str:
    return "–" if math.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")
