"""classify: cross-entropy of a sequence-classification head (encoder or decoder backbone)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score

from tunesmith.data.collate import collate_classification
from tunesmith.objectives.base import LossOutput, ObjectiveSpec, model_inputs, register


def classification_loss(model: torch.nn.Module, batch: dict, settings=None) -> LossOutput:
    logits = model(**model_inputs(batch)).logits.float()  # (B, C)
    losses = F.cross_entropy(logits, batch["class_labels"], reduction="none")  # (B,)
    # Per-record sample weights (data.sample_weights, e.g. fairness reweighing) scale each example's term.
    loss_sum = (losses * batch["sample_weights"]).sum() if "sample_weights" in batch else losses.sum()
    return LossOutput(loss_sum=loss_sum, num_loss_tokens=batch["num_loss_tokens"])


def classification_eval_sums(model: torch.nn.Module, batch: dict, settings=None) -> dict:
    logits = model(**model_inputs(batch)).logits.float()  # (B, C)
    return {
        "loss": F.cross_entropy(logits, batch["class_labels"], reduction="sum"),
        "predictions": logits.argmax(-1).tolist(),
        "references": batch["class_labels"].tolist(),
    }


def classification_metrics(totals: dict) -> dict[str, float]:
    predictions, references = totals.get("predictions", []), totals.get("references", [])
    return {
        "eval_loss": float(totals.get("loss", 0.0)) / max(len(references), 1),
        "accuracy": float(accuracy_score(references, predictions)) if references else 0.0,
        "f1_macro": float(f1_score(references, predictions, average="macro", zero_division=0)) if references else 0.0,
        "eval_examples": len(references),
    }


register(
    ObjectiveSpec(
        name="classify",
        model_kind="sequence_classification",
        collate=collate_classification,
        loss=classification_loss,
        eval_sums=classification_eval_sums,
        eval_metrics=classification_metrics,
        rows_independent=True,
    )
)
