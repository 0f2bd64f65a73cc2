"""Statistics over seeds: mean, standard deviation, 95% confidence intervals (Student t), paired differences."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats as scipy_stats


@dataclass(frozen=True)
class Summary:
    """mean, sample std and the 95% CI half-width of n values (std and CI are 0 and nan for n = 1)."""

    mean: float
    std: float
    ci: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.ci:.2f}" if self.n > 1 else f"{self.mean:.2f}"


def summarize(values: list[float]) -> Summary:
    n = len(values)
    if n == 0:
        raise ValueError("summarize needs at least one value")
    mean = statistics.fmean(values)
    if n == 1:
        return Summary(mean, 0.0, math.nan, 1)
    std = statistics.stdev(values)
    return Summary(mean, std, scipy_stats.t.ppf(0.975, n - 1) * std / math.sqrt(n), n)


def paired(a: dict[int, float], b: dict[int, float]) -> Summary:
    """a - b over the seeds both have (same seed = same initialisation stream and data order)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("paired comparison needs at least one common seed")
    return summarize([a[s] - b[s] for s in seeds])


def pooled_std(groups: list[list[float]]) -> float:
    """sqrt of the degrees-of-freedom-weighted mean of the groups' variances (groups of one are left out)."""
    usable = [g for g in groups if len(g) > 1]
    dof = sum(len(g) - 1 for g in usable)
    if dof == 0:
        return math.nan
    return math.sqrt(sum((len(g) - 1) * statistics.variance(g) for g in usable) / dof)


def verdict(difference: Summary) -> str:
    """Where a Conv+ variant stands against the upper envelope of conv and attention, from the paired
    difference (Conv+ - best baseline): above it (the CI above 0), short of it (the CI below 0), or, when
    the CI contains 0, level with it (mean >= 0) or not shown to fall short (mean < 0: a wide interval says
    that the seeds disagree, not that the two are equal)."""
    if difference.n < 2 or math.isnan(difference.ci):
        return f"{difference.mean:+.2f} (one seed: no interval)"
    if difference.mean - difference.ci > 0:
        return f"exceeds the upper envelope by {difference.mean:.2f} ± {difference.ci:.2f}"
    if difference.mean + difference.ci < 0:
        return f"falls short by {-difference.mean:.2f} ± {difference.ci:.2f}"
    if difference.mean >= 0:
        return f"reaches the upper envelope ({difference.mean:+.2f} ± {difference.ci:.2f})"
    return f"not shown to fall short ({difference.mean:+.2f} ± {difference.ci:.2f}: the interval contains 0)"
