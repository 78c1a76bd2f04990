"""Errors that reach the user as one line and exit code 2, never as a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad config or input: the message names the key, file or line, and says what is wrong.

    The CLI prints `error: <message>` and exits with code 2. Raise it before expensive work starts.
    """

    exit_code = 2


class ConfigError(UserError):
    """A config key is unknown, has the wrong type, or an impossible value."""


class DataError(UserError):
    """A data file is missing or a record cannot be read; the message starts with `file:line:`."""


class ModelError(UserError):
    """A model cannot be found or loaded under the current safety settings."""
