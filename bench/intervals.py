"""Confidence intervals the benchmarks report."""

from __future__ import annotations

import math

import numpy as np


def repeat_ratios(rows: list[dict], route: str, vs: str, metric: str) -> list[float]:
    """`metric` of `route` over that of `vs`, one ratio per repeat both have (the rows of one cell,
    each with "route" and "repeat")."""
    base = {r["repeat"]: r[metric] for r in rows if r["route"] == vs and r.get(metric)}
    return [r[metric] / base[r["repeat"]] for r in rows if r["route"] == route and r.get(metric) and r["repeat"] in base]


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval (Student, n-1 degrees of freedom); the interval is NaN for n < 2."""
    from scipy import stats

    a = np.asarray(xs, dtype=float)
    m = float(a.mean())
    if len(a) < 2:
        return m, math.nan, math.nan
    h = float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))
    return m, m - h, m + h


def median_interval(xs: list[float]) -> tuple[float, float, float]:
    """Median and its distribution-free 95 % interval (order statistics, `scipy.stats.quantile_test`).
    For paired ratios on a machine that switches between two speeds: a pair split across a switch
    is off by the switch's factor and swamps a t-interval, but moves the median by one rank."""
    from scipy import stats

    a = np.asarray(xs, dtype=float)
    m = float(np.median(a))
    if len(a) < 6:  # fewer pairs than a 95 % order-statistic interval needs
        return m, math.nan, math.nan
    ci = stats.quantile_test(a, q=m, p=0.5).confidence_interval(0.95)
    return m, float(ci.low), float(ci.high)
