"""Finding things by name: one registry class and one did-you-mean for every registry and config error.

Sparsity methods, schedules, data sets and models are each kept in a ``Registry``; a lookup of an unknown name fails
in one line that names the config key, suggests the closest name and lists the valid ones.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")

HINT = " (did you mean '{}'?)"


def did_you_mean(word: object, choices: Iterable[object], form: str = HINT) -> str:
    """``form`` filled with the closest choice, or '' when none is close; every 'did you mean' hint comes from here,
    so a typo is matched the same way in every error (difflib, one match, cutoff 0.6, compared as text)."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return form.format(close[0]) if close else ""


class Registry(Generic[T]):
    """Entries (classes or builder functions) by name, registered by a decorator.

    ``kind`` names what is kept ("sparsity method") and ``key`` the config field that holds the name ("method"), so
    an unknown name reads like a config error. ``unknown`` and ``hint`` shape that message (fields: key, name, kind,
    hint, valid); ``stamp`` is the attribute that receives the registered name (None: leave entries untouched).
    """

    def __init__(self, kind: str, key: str = "name", *,
                 unknown: str = "{key} '{name}' is not a known {kind}{hint}; valid: {valid}",
                 hint: str = HINT, stamp: str | None = "name") -> None:
        self.kind, self.key = kind, key
        self.unknown, self.hint, self.stamp = unknown, hint, stamp
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator recording an entry under ``name``; names are unique so a typo cannot shadow an entry."""
        def add(entry: T) -> T:
            if name in self._entries:
                owner = getattr(self._entries[name], "__name__", repr(self._entries[name]))
                raise ValueError(f"{self.kind} '{name}' is already registered (by {owner}); pick a different name")
            if self.stamp is not None:
                setattr(entry, self.stamp, name)
            self._entries[name] = entry
            return entry
        return add

    def get(self, name: str) -> T:
        """The entry registered as ``name``, or a one-line ValueError with a did-you-mean and the valid names."""
        if name not in self._entries:
            hint = did_you_mean(name, self._entries, self.hint)
            raise ValueError(self.unknown.format(key=self.key, name=name, kind=self.kind, hint=hint,
                                                 valid=", ".join(self.names())))
        return self._entries[name]

    def names(self) -> list[str]:
        """Registered names, sorted, for error messages and registry-wide tests."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs sorted by name."""
        return sorted(self._entries.items(), key=lambda item: item[0])

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __delitem__(self, name: str) -> None:
        """Forget a name: for tests and plug-ins that register an entry only for a while."""
        del self._entries[name]
