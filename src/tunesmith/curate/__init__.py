"""`tunesmith curate`: raw files -> kept.jsonl, rejected.jsonl, report.json, report.html.

Importing this package registers every built-in step (one module per family of steps).
"""

# noqa below: importing the modules registers the steps.
from tunesmith.curate import (  # noqa: F401
    augment,
    balance,
    decontam,
    dedup,
    diversity,
    filters,
    language,
    normalise,
    pii,
    schema,
    semantic,
)
from tunesmith.curate.base import STEPS, StepSettings, register_step
from tunesmith.curate.config import CurateConfig
from tunesmith.curate.pipeline import CurateResult, curate

__all__ = ["STEPS", "CurateConfig", "CurateResult", "StepSettings", "curate", "load_curate_config", "register_step"]


def load_curate_config(path, **overrides) -> CurateConfig:
    """A curate config from YAML: a file holding the curate settings themselves, or a run config
    with a `curate:` section. `overrides` (e.g. workers=4) replace keys of the file."""
    from pydantic import ValidationError

    from tunesmith.config import read_yaml
    from tunesmith.errors import ConfigError

    raw = read_yaml(path)
    prefix = ""
    if "curate" in raw:
        raw, prefix = raw["curate"] or {}, "curate."
    raw = {**raw, **{key: value for key, value in overrides.items() if value is not None}}
    try:
        return CurateConfig.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "config"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            from tunesmith.registry import closest

            message = f"unknown key{closest(str(first['loc'][-1]), CurateConfig.model_fields)}"
        elif first["type"] == "missing":
            message = "required but missing"
        raise ConfigError(f"{path}: {prefix}{key}: {message}") from None
