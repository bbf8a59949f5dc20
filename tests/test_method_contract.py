"""The contract of every registered sparsity method, checked for each on a tiny conv net with a few steps.

A method added later is tested by being registered; give it options in ``OPTIONS`` only when its defaults cannot act
within ``STEPS`` steps. Checked for each: pruned weights are exactly zero after every step (masked methods); the
state round-trips (a fresh method given the restored masks and ``load_state_dict`` has the same state and continues
exactly as the original: the same masks after every step, the same weights); and methods that change their masks
while training (``CHANGING``) actually change them after the resume point.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import models
from pruning.methods import MethodContext, SparsityMethod, build_method, list_methods, method_class
from pruning.schedules import LinearConfig

SPE, EPOCHS = 3, 4                  # 12 optimizer steps in the run
RESUME_AT, STEPS = 6, 10            # steps before the state is saved; steps in all


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 8, 8, generator=generator), torch.arange(8) % 4) for _ in range(3)]


BATCHES = make_batches()
CONTEXT = MethodContext(seed=1, steps_per_epoch=SPE, epochs=EPOCHS, batches=lambda: BATCHES, input_shape=(1, 8, 8))
OPTIONS: dict[str, dict[str, Any]] = {
    "set": dict(period=2),
    "rigl": dict(period=2),
    "dsr": dict(period=2, period_epochs=[], periods=[], target_pruned=4),
    "gradual": dict(schedule=LinearConfig(final_sparsity=0.8, start=1, end=10, prune_freq=2)),
    "unit": dict(schedule=LinearConfig(final_sparsity=0.5, start=1, end=10, prune_freq=2)),
    "union_mask": dict(density=0.2, start=0, end=10, cycles=3, prune_freq=1),
    "iterative": dict(prunes=3, every_epochs=1, start_epoch=1),
    "deep_r": dict(temperature=1e-3, l1=1e-4),
    "soft_deep_r": dict(temperature=1e-3, l1=1e-3),
    "synflow": dict(iterations=5),
    "snip": dict(samples_per_class=2),
    "grasp": dict(samples_per_class=2),
    "structured_snip": dict(samples_per_class=2),
}
CHANGING = {"set", "rigl", "dsr", "deep_r", "soft_deep_r", "gradual", "unit", "union_mask", "iterative"}


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# methods that only apply to some architectures get one they apply to (the rest share the small conv net)
MODELS = {"synaptic_stripping": ("mlp", {"hidden": [16, 16]})}


def build(name: str) -> tuple[nn.Module, torch.optim.Optimizer, SparsityMethod]:
    """The same model, optimizer and method every time for ``name``."""
    cls = method_class(name)
    config = cls.Config(method=name, **OPTIONS.get(name, {}))
    torch.manual_seed(0)
    arch, options = MODELS.get(name, ("conv", {"width": 4}))
    model = models.build_model(arch, in_channels=1, image_size=8, num_classes=4, **options)
    model = cls.prepare_model(config, model, CONTEXT)
    optimizer = cls.make_optimizer(config, model, lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))
    return model, optimizer, build_method(config, model, optimizer, CONTEXT)


def masks_of(method: SparsityMethod) -> dict[str, torch.Tensor]:
    return {} if method.masks is None else {name: mask.clone() for name, mask in method.masks.items()}


def train(model: nn.Module, optimizer: torch.optim.Optimizer, method: SparsityMethod,
          steps: range) -> list[dict[str, torch.Tensor]]:
    """Run ``steps`` through every loop point; the masks after each step. Pruned weights must stay exactly zero."""
    trace = []
    for step in steps:
        inputs, targets = BATCHES[step % len(BATCHES)]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        method.before_step(step)
        optimizer.step()
        method.after_step(step)
        if (step + 1) % SPE == 0:
            method.end_epoch((step + 1) // SPE - 1)
        trace.append(masks_of(method))
        for name, mask in trace[-1].items():
            assert (method.params[name].detach()[~mask] == 0).all(), f"{name}: a pruned weight moved at step {step}"
    return trace


def same(a: Any, b: Any) -> bool:
    """Equality of nested state: tensors by value, dicts and sequences element by element."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", list_methods())
def test_method_contract(name: str) -> None:
    model, optimizer, method = build(name)
    method.setup()
    train(model, optimizer, method, range(RESUME_AT))
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "masks": None if method.masks is None else method.masks.state_dict(),
                           "method": method.state_dict()})
    assert saved["method"].get("masks") is None, "masks are saved by the trainer, not in the method's state"
    straight = train(model, optimizer, method, range(RESUME_AT, STEPS))

    model_b, optimizer_b, resumed = build(name)
    model_b.load_state_dict(saved["model"])
    optimizer_b.load_state_dict(saved["optimizer"])
    assert (resumed.masks is None) == (saved["masks"] is None)
    if resumed.masks is not None:
        resumed.masks.load_state_dict(saved["masks"])
    resumed.load_state_dict(copy.deepcopy(saved["method"]))
    assert same(resumed.state_dict(), saved["method"]), f"{name}: state_dict does not round-trip"
    again = train(model_b, optimizer_b, resumed, range(RESUME_AT, STEPS))

    for step, (a, b) in enumerate(zip(straight, again), start=RESUME_AT):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), f"{name}: masks differ at {step}"
    for key, value in model.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), f"{name}: {key} differs after the resume"
    if name in CHANGING:
        before = saved["masks"]
        changed = [any(not torch.equal(t[n].cpu(), before[n]) for n in t) for t in straight]
        assert any(changed), f"{name} changed no mask after the resume point; its options must make it act"
