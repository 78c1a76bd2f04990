"""The base of every typed config section (unknown keys are errors, assignments are validated), and the YAML reader
of config files."""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load with YAML 1.2's booleans, `true` and `false` only. YAML 1.1 also reads yes / no / on / off as
    booleans, so `mixed_precision: no` or `header: yes` would reach the config as False / True instead of the words
    those keys take; a yes / no given to a boolean key is still read as one (pydantic takes the words)."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def parse_yaml(text: str) -> Any:
    """The value of a YAML document, as `yaml.safe_load` reads it but for the booleans (see `_ConfigLoader`)."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass: no arbitrary objects
