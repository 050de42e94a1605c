"""How a list of measurements is summarised everywhere: one nearest-rank percentile, and the
mean / p10 / p50 / p90 / p99 / max table that stats.json and the evaluation metrics share."""

from __future__ import annotations

import math
import statistics
from typing import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile (0 <= q <= 1) of `values`: an element of them; NaN if empty."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def describe(values: Sequence[float], digits: int = 4) -> dict[str, float]:
    """Mean (rounded to `digits`), p10, p50, p90, p99 and max; {} for no values."""
    if not values:
        return {}
    ordered = sorted(values)
    table = {"mean": round(statistics.fmean(ordered), digits)}
    table |= {f"p{round(q * 100)}": percentile(ordered, q) for q in (0.10, 0.50, 0.90, 0.99)}
    return table | {"max": ordered[-1]}
