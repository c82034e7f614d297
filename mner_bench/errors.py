"""The one small error hierarchy of mner-bench.

Every error a user can cause (bad data, bad config, an unknown name, a broken plugin)
is an :class:`MnerBenchError`: the CLI prints its message without a traceback and exits
non-zero. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MnerBenchError(Exception):
    """Base class of all errors a user can cause and fix."""


class DataError(MnerBenchError):
    """A data file is missing or malformed. The message names file and line."""

    def __init__(self, message: str, path: object | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


class ConfigError(MnerBenchError):
    """A configuration key or value is wrong. The message names the key."""


class PluginError(MnerBenchError):
    """A plugin cannot be loaded or does not match the hook specifications."""


class UnknownNameError(ConfigError):
    """A component, method or data set name that no plugin registered."""

    def __init__(self, kind: str, name: str, available: Iterable[str]):
        available = sorted(available)
        close = difflib.get_close_matches(name, available, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        listing = ", ".join(available) if available else "(none registered)"
        super().__init__(f"unknown {kind} '{name}'.{hint} Available: {listing}.")
        self.kind = kind
        self.name = name
        self.available = available


class TrainingError(MnerBenchError):
    """Training cannot go on (for example the loss became NaN)."""


def closest(name: str, options: Iterable[str]) -> str | None:
    """The closest match of ``name`` among ``options``, or None."""
    found = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return found[0] if found else None
