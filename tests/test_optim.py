"""Optimizer construction: fused SGD survives a first step that the fp16 loss scaler skips."""

from __future__ import annotations

import torch
from torch import nn

from engine.optim import OptimConfig, build_optimizer


def _skip_step(optimizer: torch.optim.Optimizer) -> None:
    """What GradScaler.step does on overflow with a fused optimizer: call step with found_inf set."""
    optimizer.grad_scale = None
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    del optimizer.found_inf


def test_fused_sgd_after_a_skipped_first_step_moves_nothing_that_had_no_gradient() -> None:
    layer = nn.Linear(100, 10, bias=False)
    nn.init.zeros_(layer.weight)
    optimizer = build_optimizer(layer, OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.0))
    assert optimizer.defaults["fused"]
    layer.weight.grad = torch.full_like(layer.weight, float("inf"))
    _skip_step(optimizer)
    layer.weight.grad = torch.zeros_like(layer.weight)   # a pruned weight's masked gradient
    optimizer.step()
    assert torch.equal(layer.weight.detach(), torch.zeros_like(layer.weight))   # torch alone leaves garbage here


def test_zero_first_buffers_give_the_same_first_update_as_torch() -> None:
    torch.manual_seed(0)
    ours, plain = nn.Linear(20, 5), nn.Linear(20, 5)
    plain.load_state_dict(ours.state_dict())
    cfg = OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    optimizers = [build_optimizer(ours, cfg),
                  torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                  fused=True)]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ours.parameters()]
        for model, optimizer in zip((ours, plain), optimizers):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(ours.parameters(), plain.parameters()):
        assert torch.equal(a, b)
