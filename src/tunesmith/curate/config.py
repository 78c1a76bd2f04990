"""The `curate:` config: run options plus an ordered list of steps, each validated by its own
registered settings class (see `tunesmith.curate.base.STEPS`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from tunesmith.curate.base import STEPS, StepSettings
from tunesmith.registry import closest
from tunesmith.settings import Section


class CurateConfig(Section):
    steps: list[StepSettings] = Field(
        description="The pipeline, in order: each entry is `{name: STEP, ...settings}` or just the step's name."
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="On an unreadable record: stop with a one-line error (fail), or reject it and go on (skip)."
    )
    header: Literal["auto", "yes", "no"] = Field("auto", description="Whether CSV/TSV inputs start with a header row.")
    chunk_size: int = Field(1000, ge=1, description="Records read and passed through the steps at a time.")
    workers: int = Field(1, ge=1, description="Processes for the record-by-record steps (the CLI's --workers).")
    engine: Literal["local", "ray"] = Field(
        "local", description="Where the steps run: local processes, or Ray Data (ray); the CLI's --engine."
    )
    ray_address: str | None = Field(
        None, description="Ray cluster for engine: ray (e.g. ray://head:10001, or auto); unset: a local Ray with "
        "`workers` CPUs (the CLI's --ray-address)."
    )
    max_record_bytes: int = Field(10_000_000, ge=1, description="JSONL lines longer than this are rejected unread.")
    examples: int = Field(3, ge=0, description="Examples per removal reason and per cluster in the report.")
    seed: int = Field(0, description="Seed for sampling steps.")

    @field_validator("steps", mode="before")
    @classmethod
    def _build_steps(cls, steps: Any) -> list[StepSettings]:
        if not isinstance(steps, list) or not steps:
            raise ValueError("expected a non-empty list of steps, e.g. [normalise, exact_dedup]")
        built = []
        for position, entry in enumerate(steps):
            if isinstance(entry, StepSettings):
                built.append(entry)
                continue
            entry = {"name": entry} if isinstance(entry, str) else entry
            if not isinstance(entry, dict) or "name" not in entry:
                raise ValueError(f"step {position}: expected a step name or a mapping with `name`")
            name = entry["name"]
            if name not in STEPS:
                raise ValueError(
                    f"step {position}: unknown step {name!r}{closest(str(name), STEPS.names())}; "
                    f"known: {', '.join(sorted(STEPS.names()))}"
                )
            try:
                built.append(STEPS.get(name).settings.model_validate(entry))
            except ValidationError as error:
                first = error.errors()[0]
                key = ".".join(str(part) for part in first["loc"])
                message = first["msg"].removeprefix("Value error, ")
                if first["type"] == "extra_forbidden":
                    known = STEPS.get(name).settings.model_fields
                    message = f"unknown key{closest(str(first['loc'][-1]), known)}; known: {', '.join(known)}"
                raise ValueError(f"step {position} ({name}).{key}: {message}") from None
        return built
