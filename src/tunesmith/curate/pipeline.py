"""The curation run: read inputs in chunks, pass each chunk through the steps in order, write
kept.jsonl and rejected.jsonl as it goes, then report.json and report.html.

Memory holds one chunk plus what the stateful steps keep (dedup indexes, scan counters). Every
record read leaves in exactly one of the two files; `curate` checks the counts before returning.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from tunesmith.curate.base import STEPS, StepContext, StepOutput
from tunesmith.curate.config import CurateConfig
from tunesmith.curate.records import Record, Reject, read_inputs
from tunesmith.errors import DataError, UserError


@dataclass
class StepStats:
    name: str
    records_in: int = 0
    records_out: int = 0
    reasons: Counter = field(default_factory=Counter)
    counts: Counter = field(default_factory=Counter)
    seconds: float = 0.0


@dataclass
class CurateResult:
    output_dir: Path
    records_in: int
    kept: int
    rejected: int
    report: dict


def _records(config: CurateConfig, inputs: list[Path], read_stats: StepStats) -> Iterator[Record | Reject]:
    index = 0
    for raw in read_inputs(inputs, config.header, config.max_record_bytes):
        read_stats.records_in += 1
        if raw.fields is None:
            if config.on_error == "fail":
                raise DataError(f"{raw.source}: {raw.error} (set on_error: skip to reject such records and go on)")
            read_stats.reasons[raw.error.split(" (")[0]] += 1
            yield Reject(raw.source, "read", raw.error, {}, None, raw=raw.raw)
            continue
        read_stats.records_out += 1
        file = raw.source.rsplit(":", 1)[0]
        yield Record(raw.fields, raw.source, index, file)
        index += 1


# Worker processes build the steps once from the config, then run one step on one slice at a time.
_WORKER_STEPS: list = []


def _start_worker(config: CurateConfig, context: StepContext) -> None:
    _WORKER_STEPS[:] = [
        STEPS.get(s.name).build(s, context) if STEPS.get(s.name).parallel else None for s in config.steps
    ]


def _run_in_worker(position: int, records: list[Record]) -> StepOutput:
    return _WORKER_STEPS[position].process(records)


def curate(config: CurateConfig, inputs: list[Path], output_dir: Path) -> CurateResult:
    """Run the pipeline of `config` over `inputs`, writing kept.jsonl, rejected.jsonl, report.json
    and report.html into `output_dir`."""
    if not inputs:
        raise UserError("curate: give at least one input file or folder")
    if config.engine == "ray":
        raise UserError("--engine ray is not available yet; use --engine local (the default)")
    output_dir.mkdir(parents=True, exist_ok=True)
    context = StepContext(output_dir=output_dir, seed=config.seed, inputs=tuple(inputs), header=config.header)
    steps = [STEPS.get(settings.name).build(settings, context) for settings in config.steps]
    parallel = [STEPS.get(settings.name).parallel for settings in config.steps]
    stats = [StepStats(settings.name) for settings in config.steps]
    read_stats = StepStats("read")
    from tunesmith.curate.report import ReportBuilder

    report = ReportBuilder(config)
    pool = None
    if config.workers > 1 and any(parallel):
        pool = ProcessPoolExecutor(config.workers, initializer=_start_worker, initargs=(config, context))
    started = time.perf_counter()
    try:
        with open(output_dir / "kept.jsonl", "w", encoding="utf-8") as kept_file, \
                open(output_dir / "rejected.jsonl", "w", encoding="utf-8") as rejected_file:
            stream = _records(config, inputs, read_stats)
            while chunk := list(islice(stream, config.chunk_size)):
                records = [item for item in chunk if isinstance(item, Record)]
                rejects = [item for item in chunk if isinstance(item, Reject)]
                report.observe_input(records)
                for position, step in enumerate(steps):
                    if not records:
                        break
                    tick = time.perf_counter()
                    if pool is not None and parallel[position] and len(records) > 1:
                        output = _process_in_pool(pool, position, records, config.workers)
                    else:
                        output = step.process(records)
                    _check_accounting(config.steps[position].name, records, output)
                    stat = stats[position]
                    stat.seconds += time.perf_counter() - tick
                    stat.records_in += len(records)
                    stat.records_out += len(output.kept)
                    stat.counts.update(output.counts)
                    stat.reasons.update(_reason_key(item) for item in output.rejected)
                    rejects += output.rejected
                    records = output.kept
                report.observe_output(records, rejects)
                for record in records:
                    kept_file.write(json.dumps(record.output(), ensure_ascii=False) + "\n")
                for item in rejects:
                    rejected_file.write(json.dumps(item.output(), ensure_ascii=False, default=str) + "\n")
    finally:
        if pool is not None:
            pool.shutdown()
    if read_stats.records_in == 0:
        raise DataError(f"{', '.join(map(str, inputs))}: no records found (empty input)")
    seconds = time.perf_counter() - started
    summaries = {settings.name: step.summary() for settings, step in zip(config.steps, steps, strict=True)
                 if hasattr(step, "summary")}
    result = report.write(output_dir, read_stats, stats, summaries, seconds)
    if result["records_in"] != result["kept"] + result["rejected"]:
        raise RuntimeError(f"curate lost records: {result['records_in']} in, {result['kept']} kept, "
                           f"{result['rejected']} rejected")  # a bug, not bad input
    return CurateResult(output_dir, result["records_in"], result["kept"], result["rejected"], result)


def _reason_key(item: Reject) -> str:
    # Reasons carry measured values ("too short: 3 words < 5"); the part before ':' groups them.
    return item.reason.split(":")[0]


def _process_in_pool(pool: ProcessPoolExecutor, position: int, records: list[Record], workers: int) -> StepOutput:
    size = -(-len(records) // workers)
    slices = [records[start:start + size] for start in range(0, len(records), size)]
    merged = StepOutput(kept=[])
    # map() returns results in submission order, so output order equals input order.
    for output in pool.map(_run_in_worker, [position] * len(slices), slices):
        merged.kept += output.kept
        merged.rejected += output.rejected
        merged.counts.update(output.counts)
    return merged


def _check_accounting(name: str, records: list[Record], output: StepOutput) -> None:
    if len(output.kept) + len(output.rejected) != len(records):
        raise RuntimeError(f"curate step {name!r} returned {len(output.kept)} kept + {len(output.rejected)} "
                           f"rejected for {len(records)} records")  # a bug in the step, not bad input
