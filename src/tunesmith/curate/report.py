"""report.json and report.html for a curation run, built from what streams past (bounded: fixed
histogram bins, a few examples per reason and cluster)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from tunesmith.curate.records import Record, Reject
from tunesmith.report.html import Report

# Character-length bins, roughly logarithmic, fixed so that histograms add up chunk by chunk.
LENGTH_BINS = np.array([0, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 50_000, np.inf])
MAX_CLUSTERS_SHOWN = 200
SNIPPET = 160


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET else text[:SNIPPET - 1] + "…"


def _label(record: Record) -> str | None:
    label = record.fields.get("label")
    return None if label is None or isinstance(label, (dict, list)) else str(label)


class ReportBuilder:
    def __init__(self, config):
        self.config = config
        self.lengths = {"before": np.zeros(len(LENGTH_BINS) - 1, dtype=np.int64),
                        "after": np.zeros(len(LENGTH_BINS) - 1, dtype=np.int64)}
        self.labels = {"before": Counter(), "after": Counter()}
        self.examples: dict[str, list[dict]] = {}
        self.clusters: dict[str, list[str]] = {}
        self.cluster_sizes: Counter = Counter()
        self.kept = self.rejected = self.kept_augmented = 0

    def _observe(self, records: list[Record], when: str) -> None:
        lengths = [len(record.text()) for record in records]
        self.lengths[when] += np.histogram(lengths, bins=LENGTH_BINS)[0]
        self.labels[when].update(label for record in records if (label := _label(record)) is not None)

    def observe_input(self, records: list[Record]) -> None:
        self._observe(records, "before")

    def observe_output(self, kept: list[Record], rejected: list[Reject]) -> None:
        self._observe(kept, "after")
        self.kept += len(kept)
        self.kept_augmented += sum(isinstance(record.fields.get("augmented"), dict) for record in kept)
        self.rejected += len(rejected)
        for item in rejected:
            key = f"{item.step}: {item.reason.split(':')[0]}"
            shown = self.examples.setdefault(key, [])
            if len(shown) < self.config.examples:
                text = item.record.text() if item.record is not None else (item.raw or "")
                shown.append({"source": item.source, "text": _snippet(text), "evidence": item.evidence,
                              "duplicate_of": item.duplicate_of})
            if item.duplicate_of is not None:
                self.cluster_sizes[item.duplicate_of] += 1
                if item.duplicate_of in self.clusters or len(self.clusters) < MAX_CLUSTERS_SHOWN:
                    members = self.clusters.setdefault(item.duplicate_of, [])
                    if len(members) < self.config.examples and item.record is not None:
                        members.append(_snippet(item.record.text()))

    def write(self, output_dir: Path, read_stats, stats, summaries: dict, seconds: float) -> dict:
        # A step's "added" records (augmentation) are counted apart: removed = in + added - out.
        funnel = [{"step": "read", "in": read_stats.records_in, "out": read_stats.records_out,
                   "removed": read_stats.records_in - read_stats.records_out, "added": 0}]
        funnel += [{"step": stat.name, "in": stat.records_in, "out": stat.records_out,
                    "removed": stat.records_in + stat.added - stat.records_out, "added": stat.added,
                    "seconds": round(stat.seconds, 3)} for stat in stats]
        biggest = self.cluster_sizes.most_common(20)
        report = {
            "records_in": read_stats.records_in,
            "added": sum(stat.added for stat in stats),
            "kept": self.kept,
            "kept_augmented": self.kept_augmented,
            "rejected": self.rejected,
            "seconds": round(seconds, 3),
            "records_per_s": round(read_stats.records_in / seconds, 1) if seconds else None,
            "funnel": funnel,
            "reasons": {stat.name: dict(stat.reasons) for stat in [read_stats, *stats] if stat.reasons},
            "counts": {stat.name: dict(stat.counts) for stat in stats if stat.counts},
            "examples": self.examples,
            "length_histogram": {"bins": [float(edge) for edge in LENGTH_BINS],
                                 **{when: counts.tolist() for when, counts in self.lengths.items()}},
            "labels": {when: dict(counts) for when, counts in self.labels.items()},
            "duplicate_clusters": [{"kept": kept, "duplicates": size, "examples": self.clusters.get(kept, [])}
                                   for kept, size in biggest],
            "steps": summaries,
        }
        (output_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str),
                                                encoding="utf-8")
        render_html(report).write(output_dir / "report.html")
        return report


def render_html(report: dict) -> Report:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    page = Report("tunesmith curate")
    headline = {"records in": report["records_in"], "kept": report["kept"], "rejected": report["rejected"],
                "records/s": report["records_per_s"] or 0.0}
    if report["added"]:
        headline |= {"augmented added": report["added"], "augmented kept": report["kept_augmented"]}
    page.headline(headline)
    for warning in report["steps"].get("balance", {}).get("warnings", []):
        page.warning(warning)
    page.heading("Funnel: records in and out of each step", element_id="funnel")
    page.table([(row["step"], row["in"], row["out"], row["removed"], row["added"]) for row in report["funnel"]],
               ["step", "in", "out", "removed", "added (augmented)"], element_id="funnel-table")
    figure, axis = plt.subplots(figsize=(8, 0.4 * len(report["funnel"]) + 1))
    names = [row["step"] for row in report["funnel"]][::-1]
    axis.barh(names, [row["out"] for row in report["funnel"]][::-1], color="#4c72b0")
    axis.set_xlabel("records remaining after the step")
    page.figure(figure, "records remaining after each step")

    page.heading("Why records were removed", element_id="reasons")
    rows = [(step, reason, count) for step, reasons in report["reasons"].items() for reason, count in reasons.items()]
    page.table(rows, ["step", "reason", "records"])
    for key, shown in report["examples"].items():
        page.table([(item["source"], item["text"], json.dumps(item["evidence"], default=str)) for item in shown],
                   [f"{key}: source", "text", "evidence"])
    counts = [(step, name, value) for step, named in report["counts"].items() for name, value in named.items()]
    if counts:
        page.heading("Edits made")
        page.table(counts, ["step", "what", "records"])

    page.heading("Length (characters) before and after", element_id="lengths")
    histogram = report["length_histogram"]
    labels = [f"<{int(edge)}" if edge != float("inf") else "more" for edge in histogram["bins"][1:]]
    figure, axis = plt.subplots(figsize=(8, 3))
    positions = np.arange(len(labels))
    axis.bar(positions - 0.2, histogram["before"], 0.4, label="before")
    axis.bar(positions + 0.2, histogram["after"], 0.4, label="after")
    axis.set_xticks(positions, labels, rotation=45)
    axis.legend()
    page.figure(figure, "record length in characters, before and after curation")
    if report["labels"]["before"]:
        page.heading("Labels before and after", element_id="labels")
        names = sorted(set(report["labels"]["before"]) | set(report["labels"]["after"]))
        page.table([(name, report["labels"]["before"].get(name, 0), report["labels"]["after"].get(name, 0))
                    for name in names], ["label", "before", "after"])
    if report["duplicate_clusters"]:
        page.heading("Largest duplicate clusters", element_id="clusters")
        page.table([(cluster["kept"], cluster["duplicates"], " | ".join(cluster["examples"]))
                    for cluster in report["duplicate_clusters"]], ["kept record", "duplicates removed", "examples"])
    for step, summary in report["steps"].items():
        page.heading(f"{step}", element_id=f"step-{step}")
        for title, value in summary.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                page.table([list(row.values()) for row in value], list(value[0]), element_id=None)
            elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
                columns = sorted({key for row in value.values() for key in row})
                page.table([(name, *(row.get(key) for key in columns)) for name, row in value.items()],
                           [title, *columns])
            elif title != "warnings":
                page.text(f"{title}: {value}")
    return page
