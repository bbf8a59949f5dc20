"""JSON that every reader accepts: NaN and infinities become null, never the bare ``NaN`` Python writes by default.

``json.dump`` writes ``NaN`` / ``Infinity`` unless told otherwise, and those are not JSON: ``jq``, browsers and most
other languages refuse the whole file. A number that is not finite (a diverged loss, an accuracy never measured)
carries no value a reader could use, so it is written as null; ``allow_nan=False`` then guarantees nothing slipped
through. Every JSON file the project writes goes through :func:`dumps` (or :func:`dump`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import IO, Any

__all__ = ["dump", "dumps", "finite_or_null"]


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float (nested in dicts, lists and tuples) replaced by None; numpy and torch
    scalars (anything with ``item()`` and no length) become Python numbers first."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return finite_or_null(item())
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``value`` with non-finite numbers as null (``allow_nan=False`` underneath)."""
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)


def dump(value: Any, handle: IO[str], **kwargs: Any) -> None:
    """``json.dump`` of ``value`` with non-finite numbers as null (``allow_nan=False`` underneath)."""
    json.dump(finite_or_null(value), handle, allow_nan=False, **kwargs)
