"""Pure-Python helpers shared by pruning, models and engine (which must not import each other the wrong way).

Nothing here imports torch: registries by name with one did-you-mean, and one coercion of untyped config values
against type annotations.
"""

from common.coerce import CoercionError, NonFiniteError, coerce, type_name
from common.registry import Registry, did_you_mean

__all__ = ["CoercionError", "NonFiniteError", "Registry", "coerce", "did_you_mean", "type_name"]
