"""The curation run: read inputs in chunks, pass each chunk through the steps in order, write
kept.jsonl and rejected.jsonl as it goes, then report.json and report.html.

An engine moves the chunks through the steps: `run_local` here (worker processes for the
record-by-record steps), or `run_on_ray` (`engine: ray`, see ray_engine.py). Both take the chunks
in order and give them back in order, each step applied by `run_step`, so the files are the same.

Memory holds one chunk plus what the stateful steps keep (dedup indexes, scan counters). Every
record read leaves in exactly one of the two files; `curate` checks the counts before returning.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
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
    added: int = 0
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


@dataclass
class Chunk:
    """Up to `chunk_size` records on their way through the steps: those still kept, and every reject
    so far in the order written (read errors first, then each step's, in step order)."""

    records: list[Record]
    rejects: list[Reject]


def read_chunks(config: CurateConfig, inputs: list[Path], read_stats: StepStats, report) -> Iterator[Chunk]:
    """The inputs in chunks, each observed for the report's "before" figures before any step edits it."""
    stream = _records(config, inputs, read_stats)
    while items := list(islice(stream, config.chunk_size)):
        chunk = Chunk([item for item in items if isinstance(item, Record)],
                      [item for item in items if isinstance(item, Reject)])
        report.observe_input(chunk.records)
        yield chunk


def run_step(name: str, process: Callable[[list[Record]], StepOutput], chunk: Chunk, stat: StepStats) -> None:
    """One step on a chunk: checks that every record came back once, moves its rejects over, counts."""
    if not chunk.records:
        return
    tick = time.perf_counter()
    output = process(chunk.records)
    if len(output.kept) + len(output.rejected) != len(chunk.records) + output.added:
        raise RuntimeError(f"curate step {name!r} returned {len(output.kept)} kept + {len(output.rejected)} "
                           f"rejected for {len(chunk.records)} records and {output.added} added")  # a bug in the step
    stat.seconds += time.perf_counter() - tick
    stat.records_in += len(chunk.records)
    stat.records_out += len(output.kept)
    stat.added += output.added
    stat.counts.update(output.counts)
    stat.reasons.update(_reason_key(item) for item in output.rejected)
    chunk.rejects += output.rejected
    chunk.records = output.kept


# Worker processes build the steps once from the config, then run one step on one slice at a time.
_WORKER_STEPS: list = []


def _start_worker(config: CurateConfig, context: StepContext) -> None:
    _WORKER_STEPS[:] = [
        STEPS.get(s.name).build(s, context) if STEPS.get(s.name).parallel else None for s in config.steps
    ]


def _run_in_worker(position: int, records: list[Record]) -> StepOutput:
    return _WORKER_STEPS[position].process(records)


def run_local(config: CurateConfig, context: StepContext, steps: list, stats: list[StepStats],
              chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """The local engine: each chunk through every step in order; record-by-record steps split the
    chunk over `workers` processes."""
    parallel = [STEPS.get(settings.name).parallel for settings in config.steps]
    pool = None
    if config.workers > 1 and any(parallel):
        pool = ProcessPoolExecutor(config.workers, initializer=_start_worker, initargs=(config, context))
    try:
        for chunk in chunks:
            for position, step in enumerate(steps):
                process = step.process
                if pool is not None and parallel[position] and len(chunk.records) > 1:
                    process = partial(_process_in_pool, pool, position, workers=config.workers)
                run_step(config.steps[position].name, process, chunk, stats[position])
            yield chunk
    finally:
        if pool is not None:
            pool.shutdown()


def curate(config: CurateConfig, inputs: list[Path], output_dir: Path) -> CurateResult:
    """Run the pipeline of `config` over `inputs`, writing kept.jsonl, rejected.jsonl, report.json
    and report.html into `output_dir`."""
    if not inputs:
        raise UserError("curate: give at least one input file or folder")
    engine = run_local
    if config.engine == "ray":
        from tunesmith.curate.ray_engine import import_ray, run_on_ray

        import_ray()  # a missing Ray is a one-line error before any work starts
        engine = run_on_ray
    output_dir.mkdir(parents=True, exist_ok=True)
    context = StepContext(output_dir=output_dir, seed=config.seed, inputs=tuple(inputs), header=config.header)
    # Every step is built here, also those that run elsewhere: a bad setting fails before any work,
    # and summaries come from here.
    steps = [STEPS.get(settings.name).build(settings, context) for settings in config.steps]
    stats = [StepStats(settings.name) for settings in config.steps]
    read_stats = StepStats("read")
    from tunesmith.curate.report import ReportBuilder

    report = ReportBuilder(config)
    started = time.perf_counter()
    with open(output_dir / "kept.jsonl", "w", encoding="utf-8") as kept_file, \
            open(output_dir / "rejected.jsonl", "w", encoding="utf-8") as rejected_file:
        chunks = read_chunks(config, inputs, read_stats, report)
        for chunk in engine(config, context, steps, stats, chunks):
            report.observe_output(chunk.records, chunk.rejects)
            for record in chunk.records:
                kept_file.write(json.dumps(record.output(), ensure_ascii=False) + "\n")
            for item in chunk.rejects:
                rejected_file.write(json.dumps(item.output(), ensure_ascii=False, default=str) + "\n")
    if read_stats.records_in == 0:
        raise DataError(f"{', '.join(map(str, inputs))}: no records found (empty input)")
    seconds = time.perf_counter() - started
    summaries = {settings.name: step.summary() for settings, step in zip(config.steps, steps, strict=True)
                 if hasattr(step, "summary")}
    result = report.write(output_dir, read_stats, stats, summaries, seconds)
    if result["records_in"] + result["added"] != result["kept"] + result["rejected"]:
        raise RuntimeError(f"curate lost records: {result['records_in']} in, {result['added']} added, "
                           f"{result['kept']} kept, {result['rejected']} rejected")  # a bug, not bad input
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
