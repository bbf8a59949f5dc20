"""Sparsity methods, one small file each; importing this package registers them all."""

from pruning.methods import at_init, dense  # noqa: F401  (registration side effects)
from pruning.methods.base import (MethodConfig, MethodContext, SparsityMethod, build_method, list_methods,
                                  method_class, register_method)

__all__ = ["MethodConfig", "MethodContext", "SparsityMethod", "build_method", "list_methods", "method_class",
           "register_method"]
