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
