"""Target vs baseline on the same items: per-metric deltas with paired-bootstrap CIs and p-values,
items where the two differ, and the two headline numbers of Biderman et al. 2024 ("LoRA Learns
Less and Forgets Less", section 3): learning = gain on the target tasks, forgetting = loss on the
retain tasks.
"""

from __future__ import annotations

import numpy as np

from tunesmith.errors import UserError
from tunesmith.evaluate.stats import paired_bootstrap, resample_counts
from tunesmith.evaluate.tasks import TaskOutput


def oriented(delta: float | np.ndarray, higher_is_better: bool):
    """A delta where positive always means 'target is better' (perplexity going down is a gain)."""
    return delta if higher_is_better else -delta


def compare_task(target: TaskOutput, baseline: TaskOutput, n_samples: int, seed: int, level: float,
                 samples_shown: int) -> dict:
    if len(target.records) != len(baseline.records):
        raise UserError(f"task {target.name!r}: target and baseline were scored on different items "
                        f"({len(target.records)} vs {len(baseline.records)})")
    metrics = {}
    for name, stats in target.metrics.items():
        if name not in baseline.metrics:
            continue
        result = paired_bootstrap(stats, baseline.metrics[name], n_samples, seed, level)
        result["significant"] = bool(result["p_value"] < 1 - level)
        result["higher_is_better"] = stats.higher_is_better
        metrics[name] = result
    differing = [
        {"input": t.get("input", ""), "target": t.get("prediction", ""), "baseline": b.get("prediction", ""),
         "reference": t.get("reference", ""), "target_correct": t.get("correct"), "baseline_correct": b.get("correct")}
        for t, b in zip(target.records, baseline.records, strict=True)
        if t.get("prediction") != b.get("prediction") or t.get("correct") != b.get("correct")
    ]
    # Items where exactly one side is right come first: they are what the delta is made of.
    differing.sort(key=lambda row: row["target_correct"] == row["baseline_correct"])
    return {"role": target.role, "primary": target.primary, "metrics": metrics, "n_differing": len(differing),
            "differing": differing[:samples_shown]}


def learn_forget(target: dict[str, TaskOutput], baseline: dict[str, TaskOutput], n_samples: int, seed: int,
                 level: float) -> dict:
    """Mean oriented primary-metric delta over target tasks (learning) and minus the same over retain
    tasks (forgetting), each with a bootstrap CI. Tasks are resampled independently (different
    items), so a replicate's average is the average of each task's replicate delta.

    Departure from the paper: Biderman et al. report one metric per domain; a suite may mix
    metrics of different scales (accuracy, perplexity), which this plain average does not rescale.
    """
    result = {}
    for role, sign, key in (("target", 1.0, "learning"), ("retain", -1.0, "forgetting")):
        names = [name for name, task in target.items() if task.role == role and name in baseline]
        if not names:
            result[key] = None
            continue
        points, replicates = [], []
        for index, name in enumerate(names):
            t, b = target[name], baseline[name]
            stats_t, stats_b = t.metrics[t.primary], b.metrics[t.primary]
            counts = resample_counts(len(stats_t.stats), n_samples, seed + index)
            points.append(oriented(stats_t.value() - stats_b.value(), stats_t.higher_is_better))
            replicate = stats_t.finalize(counts @ stats_t.stats) - stats_b.finalize(counts @ stats_b.stats)
            replicates.append(oriented(replicate, stats_t.higher_is_better))
        averaged = sign * np.mean(np.stack(replicates), axis=0)
        averaged = averaged[np.isfinite(averaged)]
        tail = (1 - level) / 2 * 100
        low, high = np.percentile(averaged, [tail, 100 - tail]) if len(averaged) else (np.nan, np.nan)
        result[key] = {"value": float(sign * np.mean(points)), "ci_low": float(low), "ci_high": float(high),
                       "tasks": names}
    return result
