"""Sparsity methods, one small file each; importing this package registers them all."""

from pruning.methods import at_init, dense, gradual, lottery, union_mask, unit  # noqa: F401  (registers them)
from pruning.methods import grasp, snip, structured_snip, synflow  # noqa: F401  (pruning at init scorers)
from pruning.methods import dsr, dst  # noqa: F401  (dynamic sparse training: set, rigl, dsr)
from pruning.methods import deep_r  # noqa: F401  (deep_r, soft_deep_r)
from pruning.methods import grad_rewiring  # noqa: F401  (grad_rewiring: Gradient Rewiring, an Adam with a prior)
from pruning.methods import iterative  # noqa: F401  (iterative pruning from a dense model)
from pruning.methods import hashed  # noqa: F401  (hashednet: tied weights)
from pruning.methods import stripping  # noqa: F401  (synaptic_stripping: dead ReLU neurons, ViT)
from pruning.methods.base import (DecisionPass, MaskedMethod, MethodConfig, MethodContext, RunFacts, SparsityMethod,
                                  build_method, list_methods, method_class, register_method)

__all__ = ["DecisionPass", "MaskedMethod", "MethodConfig", "MethodContext", "RunFacts", "SparsityMethod",
           "build_method", "list_methods", "method_class", "register_method"]
