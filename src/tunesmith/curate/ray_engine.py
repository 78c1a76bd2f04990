"""The Ray engine (`--engine ray`): the same steps on Ray Data, for data that outgrows one machine.

The pipeline is cut into stages. Each run of consecutive record-by-record steps (registered with
`parallel=True`) is one Ray Data `map` over chunks, spread over the cluster's CPUs. Each step with
state across records (exact and near dedup, balance, diversity, semantic dedup) is a global stage
that runs in this process over the chunks in input order: keeping the earliest of a set of
duplicates needs every earlier kept record's signature, and only the MinHash and filter work, not
the index look-ups, parallelises.

Chunks cross to Ray in windows of a few per CPU, so memory stays bounded as on the local engine,
and they keep their `chunk_size` boundaries and their order, which makes kept.jsonl and
rejected.jsonl identical to the local engine's, line for line. Records travel as JSON text (Arrow
strings), not as pickled objects. On a cluster every node needs tunesmith installed, as the
workers build the steps from the config.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from itertools import islice

from tunesmith.curate.base import STEPS, StepContext
from tunesmith.curate.config import CurateConfig
from tunesmith.curate.pipeline import Chunk, StepStats, run_step
from tunesmith.curate.records import Record, Reject
from tunesmith.errors import UserError

RAY_MISSING = "--engine ray needs Ray Data: pip install 'tunesmith[ray]' (or: pip install 'ray[data]')"
# Chunks sent to Ray at a time, per CPU of the cluster: enough to keep every CPU busy while one
# window's slowest chunk finishes, few enough that memory stays a few chunks per CPU.
CHUNKS_PER_CPU = 4


def import_ray():
    """Ray with Ray Data, or a one-line error saying how to install them."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is an extra of ray; without it ray imports alone
    except ImportError:
        raise UserError(RAY_MISSING) from None
    return ray


def plan_stages(config: CurateConfig) -> list[tuple[bool, list[int]]]:
    """(on Ray, step positions) in pipeline order: runs of record-by-record steps go to Ray together;
    every other step is a stage of its own in this process."""
    stages: list[tuple[bool, list[int]]] = []
    for position, settings in enumerate(config.steps):
        parallel = STEPS.get(settings.name).parallel
        if stages and stages[-1][0] and parallel:
            stages[-1][1].append(position)
        else:
            stages.append((parallel, [position]))
    return stages


def run_on_ray(config: CurateConfig, context: StepContext, steps: list, stats: list[StepStats],
               chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """The Ray engine, with the local engine's contract: the chunks, in order, through every step."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=config.ray_address, num_cpus=None if config.ray_address else config.workers,
                 include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    data_context = ray.data.DataContext.get_current()
    data_context.execution_options.preserve_order = True
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    try:
        window = CHUNKS_PER_CPU * max(1, int(ray.cluster_resources().get("CPU", 1)))
        stages = plan_stages(config)
        run_id = uuid.uuid4().hex  # lets Ray workers reuse the steps they built for this run
        while batch := list(islice(chunks, window)):
            for on_ray, positions in stages:
                if on_ray:
                    batch = _map_on_ray(ray, config, context, positions, batch, stats, run_id)
                    continue
                for chunk in batch:
                    for position in positions:
                        run_step(config.steps[position].name, steps[position].process, chunk, stats[position])
            yield from batch
    finally:
        if started_here:
            ray.shutdown()


def _map_on_ray(ray, config: CurateConfig, context: StepContext, positions: list[int], batch: list[Chunk],
                stats: list[StepStats], run_id: str) -> list[Chunk]:
    """One stage of record-by-record steps over a window of chunks, one Ray task per chunk."""
    rows = [{"chunk": number, "payload": pack(chunk)} for number, chunk in enumerate(batch)]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    mapped = dataset.map(run_steps_on_worker, fn_kwargs={"config": config, "context": context,
                                                          "positions": positions, "run_id": run_id})
    results = []
    for row in sorted(mapped.take_all(), key=lambda row: row["chunk"]):
        chunk, step_stats = unpack(row["payload"])
        for position, counted in zip(positions, step_stats, strict=True):
            merge_stats(stats[position], counted)
        results.append(chunk)
    return results


# A Ray worker process keeps the steps it built for the current run's stages (by run id and step
# positions): a step such as langid loads its model once, not once per chunk.
_WORKER_STEPS: dict[tuple[str, tuple[int, ...]], list] = {}


def run_steps_on_worker(row: dict, config: CurateConfig, context: StepContext, positions: list[int],
                        run_id: str) -> dict:
    """Runs on a Ray worker: one chunk through the steps at `positions`, with their statistics."""
    key = (run_id, tuple(positions))
    if key not in _WORKER_STEPS:
        for earlier in [earlier for earlier in _WORKER_STEPS if earlier[0] != run_id]:
            del _WORKER_STEPS[earlier]
        _WORKER_STEPS[key] = [STEPS.get(config.steps[position].name).build(config.steps[position], context)
                              for position in positions]
    chunk, _ = unpack(row["payload"])
    counted = []
    for position, step in zip(positions, _WORKER_STEPS[key], strict=True):
        stat = StepStats(config.steps[position].name)
        run_step(stat.name, step.process, chunk, stat)
        counted.append(stat)
    return {"chunk": row["chunk"], "payload": pack(chunk, counted)}


def pack(chunk: Chunk, stats: list[StepStats] | None = None) -> str:
    """A chunk (and step statistics) as JSON text. Evidence values JSON cannot hold become strings,
    as they would in rejected.jsonl."""
    return json.dumps({"records": [asdict(record) for record in chunk.records],
                       "rejects": [asdict(item) for item in chunk.rejects],
                       "stats": [stat_fields(stat) for stat in stats or []]}, ensure_ascii=False, default=str)


def stat_fields(stat: StepStats) -> dict:
    # Not dataclasses.asdict: it rebuilds a Counter from (key, count) pairs, counting the pairs.
    return {"records_in": stat.records_in, "records_out": stat.records_out, "added": stat.added,
            "seconds": stat.seconds, "reasons": dict(stat.reasons), "counts": dict(stat.counts)}


def unpack(payload: str) -> tuple[Chunk, list[dict]]:
    data = json.loads(payload)
    rejects = []
    for item in data["rejects"]:
        stored = item.pop("record")
        rejects.append(Reject(**item, record=Record(**stored) if stored is not None else None))
    return Chunk([Record(**record) for record in data["records"]], rejects), data["stats"]


def merge_stats(stat: StepStats, counted: dict) -> None:
    stat.records_in += counted["records_in"]
    stat.records_out += counted["records_out"]
    stat.added += counted["added"]
    stat.seconds += counted["seconds"]
    stat.reasons.update(counted["reasons"])
    stat.counts.update(counted["counts"])
