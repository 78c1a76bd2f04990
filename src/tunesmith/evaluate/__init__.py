"""Evaluation: task metrics with bootstrap CIs, base-vs-tuned comparison, forgetting, fairness.

Python API: `evaluate(targets, load_suite(path), output_dir, baseline=...)`; `EvalSuiteConfig` is the
`eval:` section of a run config; `register_text_metric` adds a generation metric.
"""

from tunesmith.evaluate.config import EvalSuiteConfig, builtin_suites, load_suite, validate_suite
from tunesmith.evaluate.metrics import TEXT_METRICS, register_text_metric
from tunesmith.evaluate.run import evaluate
from tunesmith.evaluate.tasks import TASKS

__all__ = [
    "EvalSuiteConfig", "TASKS", "TEXT_METRICS", "builtin_suites", "evaluate", "load_suite", "register_text_metric",
    "validate_suite",
]
