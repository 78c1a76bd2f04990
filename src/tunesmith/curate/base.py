"""What a curation step is, and the registry that names them.

A step is built once from its typed settings and then sees the records chunk by chunk, in input
order. `process` returns the records it keeps (possibly edited), the ones it removes (as `Reject`s
with a reason and evidence) and counters for the report; every record it was given must come back
in exactly one of the two lists, which the pipeline checks, so input = kept + rejected holds. A
step that creates records (augment) puts them among the kept and says how many in `added`: then
input + added = kept + rejected.

A step registered with `parallel=True` judges each record on its own, so the pipeline may split a
chunk across worker processes. Steps with state across records (dedup, scans) run in the main
process, and may add a `summary()` for the report.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tunesmith.curate.records import Record, Reject
from tunesmith.registry import Registry
from tunesmith.settings import Section


class StepSettings(Section):
    """Base of every step's settings; `name` (a Literal in each subclass) selects the step."""

    name: str


@dataclass
class StepOutput:
    kept: list[Record]
    rejected: list[Reject] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    added: int = 0  # records among `kept` that the step created


@dataclass
class StepContext:
    """What a step may need beyond its settings: where outputs go (for spill files), the seed, and
    the run's inputs (for a step that must count something over the whole input before it decides,
    such as `balance` resampling to a target label distribution)."""

    output_dir: Path
    seed: int = 0
    inputs: tuple[Path, ...] = ()
    header: str = "auto"


class Step(Protocol):
    name: str

    def process(self, records: list[Record]) -> StepOutput: ...


@dataclass(frozen=True)
class StepSpec:
    settings: type[StepSettings]
    build: Callable[[StepSettings, StepContext], Step]
    parallel: bool
    description: str


STEPS: Registry[StepSpec] = Registry("curate step")


def register_step(
    settings: type[StepSettings], build: Callable[[StepSettings, StepContext], Step], *, parallel: bool
) -> StepSpec:
    """One call per step; the name comes from the settings' `name` default, so it cannot drift."""
    name = settings.model_fields["name"].default
    description = (settings.__doc__ or "").strip().split("\n")[0]
    return STEPS.register(name, StepSpec(settings, build, parallel, description))


def reject(record: Record, step: str, reason: str, **evidence) -> Reject:
    return Reject(source=record.source, step=step, reason=reason, evidence=evidence, record=record)


class RecordFilter:
    """A step that judges each record alone: subclasses give `check(record) -> Reject | None` and
    may edit the record in place (counting edits in `self.counts`)."""

    name: str

    def process(self, records: list[Record]) -> StepOutput:
        self.counts: Counter = Counter()
        output = StepOutput(kept=[], counts=self.counts)
        for record in records:
            removed = self.check(record)
            if removed is None:
                output.kept.append(record)
            else:
                output.rejected.append(removed)
        return output

    def check(self, record: Record) -> Reject | None:
        raise NotImplementedError
