"""Fairness: group metrics for classification (fairlearn), and reweighing weights for training.

Point estimates come from fairlearn's MetricFrame and its disparity functions (the reference); the
bootstrap intervals come from the same quantities recomputed from per-item, per-group confusion
counts (additive, see stats.py), which a test checks equal fairlearn on the full data.
Disparities are fairlearn's default `between_groups` form: largest minus smallest group value
(ratio: smallest over largest).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from tunesmith.evaluate.stats import MetricStats

# Cells per group in the statistics: true positives, false positives, true negatives, false negatives.
_TP, _FP, _TN, _FN = range(4)


def group_confusion_stats(y_true: np.ndarray, y_pred: np.ndarray, groups: list[str], group_names: list[str]):
    """(n, G*4): each item's one-hot (group, confusion cell) for binary y (1 = favourable)."""
    column = {name: index for index, name in enumerate(group_names)}
    cell = np.where(y_pred == 1, np.where(y_true == 1, _TP, _FP), np.where(y_true == 0, _TN, _FN))
    stats = np.zeros((len(y_true), 4 * len(group_names)))
    stats[np.arange(len(y_true)), [4 * column[g] for g in groups] + cell] = 1.0
    return stats


def group_rates(summed: np.ndarray, n_groups: int) -> dict[str, np.ndarray]:
    """(B, G*4) -> per-group (B, G) accuracy, selection rate, TPR and FPR (NaN where undefined)."""
    cells = summed.reshape(-1, n_groups, 4)
    tp, fp, tn, fn = (cells[..., index] for index in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        total = tp + fp + tn + fn
        return {
            "accuracy": (tp + tn) / total,
            "selection_rate": (tp + fp) / total,
            "tpr": tp / (tp + fn),
            "fpr": fp / (fp + tn),
        }


def _spread(values: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.nanmax(values, axis=1) - np.nanmin(values, axis=1)


def disparity_finalizers(n_groups: int) -> dict[str, callable]:
    def demographic_parity_difference(summed):
        return _spread(group_rates(summed, n_groups)["selection_rate"])

    def demographic_parity_ratio(summed):
        rates = group_rates(summed, n_groups)["selection_rate"]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.nanmin(rates, axis=1) / np.nanmax(rates, axis=1)

    def equalized_odds_difference(summed):
        rates = group_rates(summed, n_groups)
        return np.maximum(_spread(rates["tpr"]), _spread(rates["fpr"]))

    def equal_opportunity_difference(summed):
        return _spread(group_rates(summed, n_groups)["tpr"])

    def accuracy_difference(summed):
        return _spread(group_rates(summed, n_groups)["accuracy"])

    return {
        "demographic_parity_difference": demographic_parity_difference,
        "demographic_parity_ratio": demographic_parity_ratio,
        "equalized_odds_difference": equalized_odds_difference,
        "equal_opportunity_difference": equal_opportunity_difference,
        "accuracy_difference": accuracy_difference,
    }


def group_fairness(gold: np.ndarray, predicted: np.ndarray, groups: list[str], positive: int):
    """(details for results.json, {metric: MetricStats}) for one classification task.

    Multiclass labels are reduced to favourable (= `positive`) vs the rest, as fairlearn's
    selection rate and TPR/FPR are defined for a binary decision.
    """
    import warnings

    from fairlearn.metrics import (
        MetricFrame,
        count,
        demographic_parity_difference,
        demographic_parity_ratio,
        equal_opportunity_difference,
        equalized_odds_difference,
        false_positive_rate,
        selection_rate,
        true_positive_rate,
    )
    from sklearn.metrics import accuracy_score

    y_true = (np.asarray(gold) == positive).astype(int)
    y_pred = (np.asarray(predicted) == positive).astype(int)
    sensitive = np.asarray(groups)
    group_names = sorted(set(groups))
    with warnings.catch_warnings():  # a group without positives makes TPR undefined; it is reported as NaN
        warnings.simplefilter("ignore")
        frame = MetricFrame(
            metrics={"accuracy": accuracy_score, "selection_rate": selection_rate, "tpr": true_positive_rate,
                     "fpr": false_positive_rate, "count": count},
            y_true=y_true, y_pred=y_pred, sensitive_features=sensitive,
        )
        by_group = {str(group): {name: float(value) for name, value in row.items()}
                    for group, row in frame.by_group.to_dict(orient="index").items()}
        disparities = {
            "demographic_parity_difference": demographic_parity_difference,
            "demographic_parity_ratio": demographic_parity_ratio,
            "equalized_odds_difference": equalized_odds_difference,
            "equal_opportunity_difference": equal_opportunity_difference,
        }
        overall = {
            **{name: function(y_true, y_pred, sensitive_features=sensitive) for name, function in disparities.items()},
            "accuracy_difference": float(frame.difference()["accuracy"]),
        }
    stats = group_confusion_stats(y_true, y_pred, groups, group_names)
    metrics = {
        f"fair_{name}": MetricStats(stats, finalize, higher_is_better=name.endswith("ratio"))
        for name, finalize in disparity_finalizers(len(group_names)).items()
    }
    details = {"by_group": by_group, "overall": {k: float(v) for k, v in overall.items()}, "groups": group_names}
    return details, metrics


# --- reweighing (Kamiran & Calders 2012) ------------------------------------------------------------


def reweighing_weights(groups: list[str], labels: list[str]) -> np.ndarray:
    """w(g, y) = P(g) P(y) / P(g, y): the weight that makes group and label independent in the
    weighted data (Kamiran & Calders 2012, "Data preprocessing techniques for classification
    without discrimination", section 4.2). Weights average to 1 over the records."""
    n = len(groups)
    group_counts, label_counts = Counter(groups), Counter(labels)
    joint = Counter(zip(groups, labels, strict=True))
    return np.array([group_counts[g] * label_counts[y] / (n * joint[(g, y)]) for g, y in zip(groups, labels,
                                                                                              strict=True)])


def write_reweighing(data: Path, group_field: str, label_field: str, out: Path, header: str = "auto") -> Path:
    """Write one JSON line per record of `data`, in read order: {"index", "source", "group", "label", "weight"}."""
    from tunesmith.evaluate.tasks import _field, read_items

    items = read_items(data, header=header)
    groups = [str(_field(item, group_field, "--group-field")) for item in items]
    labels = [str(_field(item, label_field, "--label-field")) for item in items]
    weights = reweighing_weights(groups, labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for index, (item, group, label, weight) in enumerate(zip(items, groups, labels, weights, strict=True)):
            handle.write(json.dumps({"index": index, "source": item["_source"], "group": group, "label": label,
                                     "weight": float(weight)}) + "\n")
    return out
