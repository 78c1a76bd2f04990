"""Bootstrap confidence intervals and paired bootstrap tests over additive per-item statistics.

Every metric in tunesmith is computed from per-item sufficient statistics that SUM over a corpus
(an item's correctness, its NLL and token count, its BLEU n-gram counts, its confusion-matrix cell),
followed by a `finalize` step (mean, exp(nll / tokens), BLEU's formula, F1 from the confusion matrix).
A bootstrap replicate is then a vector of resampling counts `w` (B, n): the replicate's statistics
are `w @ stats` (B, k), so a thousand replicates of any metric cost one matrix product, and a paired
test reuses the same `w` for both systems (Koehn 2004, "Statistical significance tests for MT").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Finalize = Callable[[np.ndarray], np.ndarray]
"""(B, k) summed statistics -> (B,) metric values."""


@dataclass
class MetricStats:
    """A metric's per-item statistics and how to turn their sum into the metric."""

    stats: np.ndarray
    """(n_items, k) additive statistics."""
    finalize: Finalize
    higher_is_better: bool = True
    signature: str | None = None
    """How the metric was computed, for reproducibility (sacrebleu's signature)."""

    def value(self) -> float:
        return float(self.finalize(self.stats.sum(axis=0, keepdims=True))[0])


def resample_counts(n_items: int, n_samples: int, seed: int) -> np.ndarray:
    """(n_samples, n_items) counts of how often each item is drawn in each bootstrap replicate."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_items, size=(n_samples, n_items))
    counts = np.zeros((n_samples, n_items), dtype=np.float64)
    np.add.at(counts, (np.arange(n_samples)[:, None], draws), 1.0)
    return counts


def bootstrap_ci(metric: MetricStats, n_samples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13) over items."""
    n_items = len(metric.stats)
    if n_items == 0 or n_samples <= 0:
        return (float("nan"), float("nan"))
    values = metric.finalize(resample_counts(n_items, n_samples, seed) @ metric.stats)
    return _percentiles(values, level)


def paired_bootstrap(
    target: MetricStats, baseline: MetricStats, n_samples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Delta target - baseline on the SAME items, its CI, and a two-sided p-value.

    Both systems are resampled with the same counts, so item difficulty cancels. The p-value is
    2 x the share of replicates whose delta falls on the other side of zero (clipped to 1): the
    percentile form of the paired bootstrap test.
    """
    if len(target.stats) != len(baseline.stats):
        raise ValueError("paired_bootstrap: the two systems were scored on different numbers of items")
    delta = target.value() - baseline.value()
    counts = resample_counts(len(target.stats), n_samples, seed)
    deltas = target.finalize(counts @ target.stats) - baseline.finalize(counts @ baseline.stats)
    deltas = deltas[np.isfinite(deltas)]
    low, high = _percentiles(deltas, level)
    if len(deltas) == 0:
        p_value = float("nan")
    else:
        p_value = float(min(1.0, 2 * min(np.mean(deltas <= 0), np.mean(deltas >= 0))))
    return {"delta": delta, "ci_low": low, "ci_high": high, "p_value": p_value}


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return (float("nan"), float("nan"))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return (float(low), float(high))


# --- common finalize functions ---------------------------------------------------------------------


def mean_stats(values) -> MetricStats:
    """A metric that is the mean of one number per item (accuracy, exact match, ROUGE F): the
    statistics are (value, 1), so resampled means weight each drawn item once per draw."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    return MetricStats(np.stack([values, np.ones_like(values)], axis=1), ratio)


def ratio(summed: np.ndarray) -> np.ndarray:
    """(B, 2) -> (B,) first column over second."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return summed[:, 0] / summed[:, 1]
