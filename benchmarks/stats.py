"""Statistics of the benchmarks' figures: percentiles, the distribution summary every
result file uses, and a least-squares line for the scaling sweeps.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(values: Sequence[float], digits: int = 6) -> dict[str, float]:
    """n, min, p10, p50, p90, p99, max, mean of the values."""
    if not values:
        return {"n": 0}
    r = lambda v: round(v, digits)  # noqa: E731
    return {"n": len(values), "min": r(min(values)), "p10": r(percentile(values, 10)),
            "p50": r(percentile(values, 50)), "p90": r(percentile(values, 90)),
            "p99": r(percentile(values, 99)), "max": r(max(values)),
            "mean": r(statistics.fmean(values))}


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least squares y = intercept + slope * x, its R², and the largest relative residual."""
    n = len(xs)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else math.nan
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    residuals = [y - (intercept + slope * x) for x, y in zip(xs, ys)]
    r2 = 1 - sum(e * e for e in residuals) / ss_tot if ss_tot else math.nan
    worst = max((abs(e) / y for e, y in zip(residuals, ys) if y), default=math.nan)
    return {"points": n, "slope": slope, "intercept": intercept, "r2": round(r2, 5),
            "max_relative_residual": round(worst, 4)}
