"""Named registries for methods and objectives: one `register(...)` call per entry, checked."""

from __future__ import annotations

import difflib
import re
from typing import Generic, TypeVar

from tunesmith.errors import ConfigError

T = TypeVar("T")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def closest(word: str, choices) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


class Registry(Generic[T]):
    """A name -> entry table that refuses bad or duplicate names and suggests the closest on a miss."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lower_snake_case (letters, digits, _)")
        if name in self._entries:
            raise ValueError(
                f"{self.kind} {name!r} is already registered; pick another name or remove the older entry"
            )
        self._entries[name] = entry
        return entry

    def get(self, name: str, key: str | None = None) -> T:
        try:
            return self._entries[name]
        except KeyError:
            where = f"{key}: " if key else ""
            known = ", ".join(sorted(self._entries))
            raise ConfigError(
                f"{where}unknown {self.kind} {name!r}{closest(name, self._entries)}; known: {known}"
            ) from None

    def known(self, name: str) -> str:
        """`name` when registered, else ValueError naming the closest entry (for pydantic validators,
        which prefix the config key)."""
        if name not in self._entries:
            known = ", ".join(self._entries)
            raise ValueError(f"unknown {self.kind} {name!r}{closest(name, self._entries)}; known: {known}")
        return name

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
