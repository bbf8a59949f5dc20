"""Scopes on tiny hand-computed tensors: budgets, carry, units, exact checks that name the group, the registry."""

from __future__ import annotations

import pytest
import torch

from pruning.scopes import BudgetError, build_scope, list_scopes
from pruning.selection import layer_counts

SHAPES = {"a": torch.Size([2, 4]), "b": torch.Size([3, 2])}
SCORES = {"a": torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.5, 6.0, 7.0, 8.0]]),
          "b": torch.tensor([[1.0, 2.0], [3.0, 1.5], [0.125, 0.25]])}


def kept(masks: dict[str, torch.Tensor]) -> dict[str, list[list[bool]]]:
    return {name: mask.tolist() for name, mask in masks.items()}


def test_global_layer_and_row_budgets_by_hand() -> None:
    # global: 7 of 14 with one threshold: 8, 7, 6, 4, 3 (a), 3 (b), then the first 2 by position (a's);
    # layer: 4 of 8 and 3 of 6; row: 2 of 4 in every row of a, 1 of 2 in every row of b
    assert kept(build_scope("global", SHAPES).select(SCORES, 0.5)) == {
        "a": [[False, True, True, True], [False, True, True, True]],
        "b": [[False, False], [True, False], [False, False]]}
    assert kept(build_scope("layer", SHAPES).select(SCORES, 0.5)) == {
        "a": [[False, True, False, False], [False, True, True, True]],
        "b": [[False, True], [True, True], [False, False]]}
    assert kept(build_scope("row", SHAPES).select(SCORES, 0.5)) == {
        "a": [[False, True, True, False], [False, False, True, True]],
        "b": [[False, True], [True, False], [False, True]]}


def test_carry_never_regrows_and_caps_budgets() -> None:
    previous = {"a": torch.tensor([[True, False, False, False], [True, False, False, False]]),
                "b": torch.ones(3, 2, dtype=torch.bool)}
    masks = build_scope("layer", SHAPES).select(SCORES, 0.5, kept=previous)
    assert kept(masks)["a"] == previous["a"].tolist()              # budget 4 capped at the 2 still kept
    assert int(masks["b"].sum()) == 3


def test_neuron_scopes_keep_whole_units_by_l2_norm() -> None:
    # unit norms: a rows 5.48, 11.9; b rows 2.24, 3.35, 0.28
    masks = build_scope("neuron_layer", SHAPES).select(SCORES, 0.5)
    assert kept(masks) == {"a": [[False] * 4, [True] * 4], "b": [[True, True], [True, True], [False, False]]}
    masks = build_scope("neuron_global", SHAPES).select(SCORES, 0.4)     # round(0.4 * 5) = 2 units of 5
    assert [m.all(1).tolist() for m in masks.values()] == [[True, True], [False, False, False]]
    whole = {"a": torch.tensor([[True] * 4, [False] * 4]), "b": torch.ones(3, 2, dtype=torch.bool)}
    with pytest.raises(BudgetError, match="^b keeps 3 units, the target is 2"):   # round(1.5) = 2
        build_scope("neuron_layer", SHAPES).check(whole, 0.5)


def test_kernel_slices_units_view_and_whole_masks() -> None:
    scope = build_scope("kernel", {"conv": torch.Size([2, 2, 1, 2]), "fc": torch.Size([3, 2])})
    assert scope.units("conv") == (4, 2) and scope.units("fc") == (6, 1)
    weights = torch.tensor([[[[0.5, 0.7]], [[0.05, -0.01]]], [[[-2.0, 1.0]], [[0.3, 0.3]]]])
    assert scope.unit_scores("conv", weights.abs()).tolist() == pytest.approx([0.6, 0.03, 1.5, 0.3])
    whole = scope.expand("conv", torch.tensor([True, False, True, True]))
    assert scope.is_whole("conv", whole) and not scope.is_whole("conv", whole & (weights > 0))


def test_check_names_the_group_that_misses() -> None:
    masks = build_scope("row", SHAPES).select(SCORES, 0.5)
    masks["a"][1, 0] = True
    with pytest.raises(BudgetError, match=r"^a row 1 keeps 3 weights, the target is 2 \(density 0.5\)"):
        build_scope("row", SHAPES).check(masks, 0.5)
    with pytest.raises(BudgetError, match="^all layers keeps 8 weights, the target is 7"):
        build_scope("global", SHAPES).check(masks, 0.5)
    build_scope("layer", SHAPES).check(build_scope("layer", SHAPES).select(SCORES, 0.5), 0.5)


def test_a_distribution_apportions_one_total_over_layers() -> None:
    scope = build_scope("layer", SHAPES, "erk")
    masks = scope.select(SCORES, 0.3)
    assert {n: int(m.sum()) for n, m in masks.items()} == layer_counts(SHAPES, 0.3, "erk")
    assert scope.targets(0.3) is not None and build_scope("global", SHAPES).targets(0.3) is None
    with pytest.raises(ValueError, match="distribution 'erk' sets per-layer budgets; the global scope has none"):
        build_scope("global", SHAPES, "erk")


def test_registry_lists_scopes_and_refuses_unknown_names() -> None:
    assert {"global", "layer", "row", "neuron_layer", "neuron_global", "neuron_fit", "kernel"} <= set(list_scopes())
    with pytest.raises(ValueError, match="did you mean 'layer'"):
        build_scope("layr", SHAPES)
