"""Objectives: what a batch's loss is. Importing this package registers every built-in objective."""

from tunesmith.objectives import causal_lm, classify, distill, preference, reward, rl  # noqa: F401  (registration side effect)
from tunesmith.objectives.base import OBJECTIVES, LossOutput, ObjectiveSettings, ObjectiveSpec, register

__all__ = ["OBJECTIVES", "LossOutput", "ObjectiveSettings", "ObjectiveSpec", "register"]
