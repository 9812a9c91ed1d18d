"""Bootstrap confidence intervals for the rates the probes report.

A percentile bootstrap of the mean: resample the units (items, or questions for the free-form
suite) with replacement ``n_boot`` times, take the mean of each resample, and report the 2.5th
and 97.5th percentiles. The seed is fixed so a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_mean_ci(
    values: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``; ``(nan, nan)`` when empty."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(n_boot, arr.size))].mean(axis=1)  # [n_boot]
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)
