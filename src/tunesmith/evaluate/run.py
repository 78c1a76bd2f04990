"""`tunesmith eval`: load each system, run every task of the suite on it, compare, write results.json
and report.html. Reads top to bottom: systems, tasks, comparisons, outputs."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from tunesmith.errors import ConfigError, DataError
from tunesmith.evaluate.compare import compare_task, learn_forget
from tunesmith.evaluate.config import EvalSuiteConfig
from tunesmith.evaluate.scoring import model_device
from tunesmith.evaluate.stats import bootstrap_ci
from tunesmith.evaluate.tasks import TASKS, System, TaskOutput
from tunesmith.training.memory import kept_freed_memory, memory_limit_mb


def _stderr(message: str) -> None:
    print(f"tunesmith eval: {message}", file=sys.stderr, flush=True)


# --- systems ---------------------------------------------------------------------------------------


def load_system(name: str, base_of: str | None = None) -> System:
    """A run dir, a model folder, a .gguf file or a built-in alias; `base_of` = a run whose base to load."""
    from tunesmith.config import ModelConfig
    from tunesmith.models import default_device, load_model, load_run, load_tokenizer, read_run, resolve_model

    if base_of is not None or (Path(name) / "config.yaml").is_file():
        run_dir = Path(base_of or name)
        run = read_run(run_dir)
        model, tokenizer = load_run(run_dir, base=base_of is not None)
        kind = "sequence_classification" if run.task == "classify" else "causal_lm"
        labels = [model.config.id2label[i] for i in range(len(model.config.id2label))] if kind != "causal_lm" else None
        return System(f"{run_dir} (base)" if base_of else str(run_dir), kind, model, tokenizer, labels)
    cfg = ModelConfig(name=name)
    folder = resolve_model(cfg)
    architectures = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    model = load_model(cfg, "classify" if classifier else "sft")
    model.to(default_device()).eval()
    labels = [model.config.id2label[i] for i in range(len(model.config.id2label))] if classifier else None
    return System(name, "sequence_classification" if classifier else "causal_lm", model, load_tokenizer(cfg), labels)


def read_predictions(path: Path) -> System:
    """A JSONL of outputs from any system: `prediction` with `reference`/`references`, or with `label`."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict) or "prediction" not in record:
                raise DataError(f"{path}:{number}: a record needs a `prediction` field")
            if not any(key in record for key in ("reference", "references", "label")):
                raise DataError(f"{path}:{number}: a record needs `reference`, `references` or `label`")
            records.append(record)
    if not records:
        raise DataError(f"{path}: holds no records")
    return System(str(path), "predictions", predictions=records)


def predictions_suite(system: System) -> EvalSuiteConfig:
    """The suite for `--predictions` without `--suite`: text metrics, or classification when records have labels."""
    first = system.predictions[0]
    if "label" in first:
        task = {"name": "predictions", "type": "classification", "data": "-"}
    else:
        task = {"name": "predictions", "type": "generation", "data": "-", "metrics": ["exact_match", "bleu", "chrf",
                                                                                       "rouge"]}
    return EvalSuiteConfig.model_validate({"name": "predictions", "tasks": [task]})


# --- running ---------------------------------------------------------------------------------------


def run_suite(system: System, suite: EvalSuiteConfig, log: Callable[[str], None] = _stderr) -> dict[str, TaskOutput]:
    # On a CPU, scoring batch after batch reuses the buffers the batch before freed, up to the resident-memory limit
    # (training/memory.py): MMLU scoring of SmolLM2-135M 2.4-5% faster (bench/README.md).
    on_cpu = system.model is not None and model_device(system.model).type == "cpu"  # predictions have no model
    with kept_freed_memory(memory_limit_mb()) if on_cpu else nullcontext():
        return _run_tasks(system, suite, log)


def _run_tasks(system: System, suite: EvalSuiteConfig, log: Callable[[str], None]) -> dict[str, TaskOutput]:
    outputs: dict[str, TaskOutput] = {}
    for task in suite.tasks:
        spec = TASKS.get(task.type)
        if system.kind == "predictions" and spec.needs_model:
            log(f"{task.name}: skipped ({task.type} scores log-likelihoods and needs a model)")
            continue
        torch.manual_seed(suite.seed)  # sampled decoding is reproducible per task
        started = time.perf_counter()
        output = spec.run(task, system)
        output.details["seconds"] = round(time.perf_counter() - started, 2)
        primary = output.metrics[output.primary].value()
        log(f"{system.name} · {task.name}: {output.primary} = {primary:.4f} "
            f"({len(output.records) or '-'} items, {output.details['seconds']:.1f} s)")
        outputs[task.name] = output
    return outputs


def _clean(value):
    """JSON-safe: NaN and infinities become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return _clean(value.item())
    return value


def summarize(system: System, outputs: dict[str, TaskOutput], suite: EvalSuiteConfig) -> dict:
    tasks = {}
    for name, output in outputs.items():
        metrics = {}
        for metric_name, stats in output.metrics.items():
            low, high = bootstrap_ci(stats, suite.bootstrap_samples, suite.seed, suite.confidence)
            metrics[metric_name] = {"value": stats.value(), "ci_low": low, "ci_high": high,
                                    "higher_is_better": stats.higher_is_better}
        tasks[name] = {"type": output.type, "role": output.role, "primary": output.primary,
                       "n_items": len(next(iter(output.metrics.values())).stats), "metrics": metrics,
                       "details": output.details, "samples": output.records[: suite.samples_shown]}
    return {"name": system.name, "kind": system.kind, "tasks": tasks}


def evaluate(
    targets: list[str],
    suite: EvalSuiteConfig | None,
    output_dir: Path,
    baseline: str | None = None,
    predictions: Path | None = None,
    log: Callable[[str], None] = _stderr,
) -> dict:
    """Evaluate each target (and the baseline) on the suite; write results.json and report.html."""
    from tunesmith.evaluate.report import write_report

    if predictions is not None and targets:
        raise ConfigError("give TARGET or --predictions, not both")
    if predictions is None and not targets:
        raise ConfigError("give a TARGET (run dir, model folder, .gguf or alias) or --predictions FILE")
    if predictions is not None and baseline is not None:
        raise ConfigError("--compare needs models; with --predictions, score each predictions file on its own")

    results: dict = {"suite": None, "systems": [], "comparisons": [], "seconds": None}
    started = time.perf_counter()
    baseline_outputs = None
    if baseline is not None:
        base_system = load_system(targets[0] if baseline == "base" else baseline,
                                  base_of=targets[0] if baseline == "base" else None)
        if suite is None:
            raise ConfigError("--suite is required with a model")
        baseline_outputs = run_suite(base_system, suite, log)
        results["baseline"] = summarize(base_system, baseline_outputs, suite)
        del base_system

    systems = [read_predictions(predictions)] if predictions is not None else targets
    for entry in systems:
        system = entry if isinstance(entry, System) else load_system(entry)
        if suite is None:
            if system.kind != "predictions":
                raise ConfigError("--suite is required with a model")
            suite = predictions_suite(system)
        outputs = run_suite(system, suite, log)
        results["systems"].append(summarize(system, outputs, suite))
        if baseline_outputs is not None:
            n, seed, level = suite.bootstrap_samples, suite.seed, suite.confidence
            results["comparisons"].append({
                "target": system.name, "baseline": results["baseline"]["name"],
                "tasks": {name: compare_task(outputs[name], baseline_outputs[name], n, seed, level, suite.samples_shown)
                          for name in outputs if name in baseline_outputs},
                **learn_forget(outputs, baseline_outputs, n, seed, level),
            })
        del system
    results["suite"] = suite.model_dump(mode="json")
    results["seconds"] = round(time.perf_counter() - started, 2)
    results = _clean(results)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    write_report(results, output_dir / "report.html")
    return results
