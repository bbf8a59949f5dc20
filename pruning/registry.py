"""Finding classes by name: sparsity methods and sparsity schedules each keep one ``Registry``."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes by name; a lookup of an unknown name fails in one line with a did-you-mean and the valid names.

    ``key`` is the config field that holds the name, so the message reads like a config error
    ("method 'magnitud' is not a known sparsity method ...").
    """

    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind
        self.key = key
        self._classes: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: record the class under ``name`` (and set its ``name`` attribute)."""
        def add(cls: T) -> T:
            if name in self._classes:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            cls.name = name
            self._classes[name] = cls
            return cls
        return add

    def get(self, name: str) -> T:
        if name not in self._classes:
            close = difflib.get_close_matches(str(name), list(self._classes), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"{self.key} '{name}' is not a known {self.kind}{hint}; valid: {', '.join(self.names())}")
        return self._classes[name]

    def names(self) -> list[str]:
        return sorted(self._classes)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._classes.items())
