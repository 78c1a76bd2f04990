"""report.html for `tunesmith eval`, built from results.json alone (so it can be re-rendered)."""

from __future__ import annotations

from pathlib import Path

from tunesmith.report import Report


def _ci(metric: dict) -> str:
    low, high = metric.get("ci_low"), metric.get("ci_high")
    return "-" if low is None or high is None else f"[{low:.4g}, {high:.4g}]"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; figures are embedded as PNG
    import matplotlib.pyplot as plt

    return plt


def write_report(results: dict, path: Path) -> Path:
    systems = results["systems"]
    baseline = results.get("baseline")
    comparisons = {c["target"]: c for c in results.get("comparisons", [])}
    report = Report(f"tunesmith eval: {results['suite']['name']}")

    headline: dict = {}
    for comparison in comparisons.values():
        prefix = f"{comparison['target']}: " if len(comparisons) > 1 else ""
        for key in ("learning", "forgetting"):
            if comparison.get(key):
                headline[f"{prefix}{key} (target tasks)" if key == "learning" else f"{prefix}{key} (retain tasks)"] = \
                    comparison[key]["value"]
    for system in systems:
        for name, task in system["tasks"].items():
            headline[f"{name} {task['primary']}"] = task["metrics"][task["primary"]]["value"]
            if len(headline) >= 8:
                break
    report.headline(headline)
    if comparisons:
        report.text("Learning = mean gain of the primary metric on target tasks; forgetting = mean loss on retain "
                    "tasks (positive = ability lost), as in Biderman et al. 2024. Lower-is-better metrics "
                    "(perplexity) are sign-flipped so that a gain is always positive.")

    # Results table: every metric of every system, with the baseline and the paired delta.
    report.heading("Results", "results-heading")
    columns = ["system", "task", "role", "metric", "value", "95% CI"]
    if baseline:
        columns += ["baseline", "delta", "delta CI", "p (paired bootstrap)"]
    rows = []
    for system in systems:
        comparison = comparisons.get(system["name"])
        for name, task in system["tasks"].items():
            for metric_name, metric in task["metrics"].items():
                row = [system["name"], name, task["role"], metric_name, metric["value"], _ci(metric)]
                if baseline:
                    base_metric = baseline["tasks"].get(name, {}).get("metrics", {}).get(metric_name, {})
                    delta = (comparison or {}).get("tasks", {}).get(name, {}).get("metrics", {}).get(metric_name, {})
                    row += [base_metric.get("value"), delta.get("delta"),
                            _ci({"ci_low": delta.get("ci_low"), "ci_high": delta.get("ci_high")}),
                            delta.get("p_value")]
                rows.append(row)
    report.table(rows, columns, element_id="results")

    signatures = {f"{n}: {m}": s for system in systems for n, t in system["tasks"].items()
                  for m, s in t["details"].get("signatures", {}).items()}
    if signatures:
        report.preformatted("\n".join(f"sacrebleu {key}: {value}" for key, value in signatures.items()))

    _task_bars(report, systems, baseline)
    if comparisons:
        _learn_forget_plot(report, list(comparisons.values()))
    for system in systems:
        _classification_sections(report, system)
        for name, task in system["tasks"].items():
            if "per_subject_acc" in task["details"]:
                report.heading(f"{name}: accuracy per subject ({system['name']})")
                report.table(sorted(task["details"]["per_subject_acc"].items()), ["subject", "acc"])
            gaps = task["details"].get("per_pair_mean_gap")
            if gaps:
                measures = sorted({measure for values in gaps.values() for measure in values})
                report.heading(f"{name}: counterfactual gaps per term pair, first minus second ({system['name']})")
                report.table([[pair, *(values.get(measure) for measure in measures)] for pair, values in gaps.items()],
                             ["pair", *measures], element_id=f"counterfactual-{name}")
    _samples(report, systems, comparisons)
    return report.write(path)


def _task_bars(report: Report, systems: list[dict], baseline: dict | None) -> None:
    plt = _plt()
    task_names = list(systems[0]["tasks"]) if systems else []
    if not task_names:
        return
    report.heading("Per task", "per-task-heading")
    entries = ([baseline] if baseline else []) + systems
    figure, axes = plt.subplots(1, len(task_names), figsize=(3.2 * len(task_names) + 1, 3.2), squeeze=False)
    for axis, name in zip(axes[0], task_names, strict=True):
        primary = systems[0]["tasks"][name]["primary"]
        labels, values, lows, highs = [], [], [], []
        for index, entry in enumerate(entries):
            metric = entry["tasks"].get(name, {}).get("metrics", {}).get(primary)
            if metric is None or metric["value"] is None:
                continue
            labels.append("baseline" if baseline and index == 0 else f"target {index if baseline else index + 1}")
            values.append(metric["value"])
            lows.append(metric["value"] - (metric["ci_low"] if metric["ci_low"] is not None else metric["value"]))
            highs.append((metric["ci_high"] if metric["ci_high"] is not None else metric["value"]) - metric["value"])
        axis.bar(labels, values, yerr=[lows, highs], capsize=4, color=["#999"] * bool(baseline) + ["#3a7"] * 9)
        axis.set_title(f"{name}\n{primary}", fontsize=9)
        axis.tick_params(axis="x", labelsize=8, rotation=20)
    figure.tight_layout()
    report.figure(figure, "primary metric per task with its bootstrap CI (baseline grey)")


def _learn_forget_plot(report: Report, comparisons: list[dict]) -> None:
    plt = _plt()
    report.heading("Learning vs forgetting", "learn-forget")
    figure, axis = plt.subplots(figsize=(5, 4))
    for comparison in comparisons:
        learn, forget = comparison.get("learning"), comparison.get("forgetting")
        x = learn["value"] if learn else 0.0
        y = forget["value"] if forget else 0.0
        xerr = [[x - learn["ci_low"]], [learn["ci_high"] - x]] if learn and learn["ci_low"] is not None else None
        yerr = [[y - forget["ci_low"]], [forget["ci_high"] - y]] if forget and forget["ci_low"] is not None else None
        axis.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", capsize=3)
        axis.annotate(Path(comparison["target"]).name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axis.axhline(0, color="#ccc", lw=1)
    axis.axvline(0, color="#ccc", lw=1)
    axis.set_xlabel("learning (gain on target tasks)")
    axis.set_ylabel("forgetting (loss on retain tasks)")
    report.figure(figure, "runs on the learn/forget plane (better: right and down)")
    report.table([[c["target"], (c.get("learning") or {}).get("value"), _ci(c.get("learning") or {}),
                   (c.get("forgetting") or {}).get("value"), _ci(c.get("forgetting") or {})] for c in comparisons],
                 ["target", "learning", "CI", "forgetting", "CI"], element_id="learn-forget-table")


def _classification_sections(report: Report, system: dict) -> None:
    plt = _plt()
    for name, task in system["tasks"].items():
        classification = task["details"].get("classification")
        if classification:
            report.heading(f"{name}: confusion matrix ({system['name']})", f"confusion-{name}")
            labels, matrix = classification["labels"], classification["confusion_matrix"]
            figure, axis = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1 + 0.6 * len(labels)))
            axis.imshow(matrix, cmap="Blues")
            for i, row in enumerate(matrix):
                for j, count in enumerate(row):
                    axis.text(j, i, str(count), ha="center", va="center", fontsize=8)
            axis.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
            axis.set_yticks(range(len(labels)), labels, fontsize=8)
            axis.set_xlabel("predicted")
            axis.set_ylabel("true")
            report.figure(figure, f"{name} confusion matrix")
            report.table([[label, v["precision"], v["recall"], v["f1"], v["support"]]
                          for label, v in classification["per_class"].items()],
                         ["class", "precision", "recall", "F1", "support"])
        fairness = task["details"].get("fairness")
        if fairness:
            report.heading(f"{name}: fairness by group ({system['name']})", "fairness")
            report.table([[group, v["count"], v["accuracy"], v["selection_rate"], v["tpr"], v["fpr"]]
                          for group, v in fairness["by_group"].items()],
                         ["group", "count", "accuracy", "selection rate", "TPR", "FPR"], element_id=f"fairness-{name}")
            report.table([[key, value, _ci(task["metrics"].get(f"fair_{key}", {}))]
                          for key, value in fairness["overall"].items()], ["disparity (fairlearn)", "value", "95% CI"])


def _samples(report: Report, systems: list[dict], comparisons: dict) -> None:
    report.heading("Sampled outputs", "samples")
    for system in systems:
        comparison = comparisons.get(system["name"])
        for name, task in system["tasks"].items():
            if comparison and name in comparison["tasks"]:
                differing = comparison["tasks"][name]
                if not differing["differing"]:
                    continue
                report.text(f"{name}: {differing['n_differing']} items differ between {system['name']} and "
                            f"the baseline; a sample:")
                report.table([[d["input"], d["baseline"], d["target"], d["reference"]] for d in differing["differing"]],
                             ["input", "baseline", "target", "reference"])
            elif task["samples"]:
                report.text(f"{name} ({system['name']}):")
                report.table([[s.get("input", ""), s.get("prediction", ""), s.get("reference", "")]
                              for s in task["samples"]], ["input", "output", "reference"])
