"""Sparsity schedules: the sparsity at chosen steps, computed by hand, and the exact target at ``end``."""

from __future__ import annotations

import math

import pytest

from engine.config import ConfigError, build
from pruning.methods.gradual import GradualConfig
from pruning.schedules import (CubicConfig, CyclicalConfig, ExponentialConfig, LinearConfig, OneShotConfig,
                               OneShotInitConfig, build_schedule, list_schedules, to_steps)


def test_registry_lists_every_schedule() -> None:
    assert list_schedules() == ["cubic", "cyclical", "exponential", "linear", "one_shot", "one_shot_init"]


def test_one_shot_before_training_prunes_at_step_zero_only() -> None:
    s = build_schedule(OneShotInitConfig(final_sparsity=0.9), 100)
    assert s.prune_steps() == [0]
    assert [s.is_prune_step(t) for t in (0, 1, 100)] == [True, False, False]
    assert s.sparsity(0) == s.sparsity(100) == 0.9


def test_one_shot_during_training_at_start_fraction() -> None:
    s = build_schedule(OneShotConfig(final_sparsity=0.8, start=0.25), 200)   # 0.25 * 200 = step 50
    assert s.prune_steps() == [50]
    assert s.sparsity(49) == 0.0 and s.sparsity(50) == 0.8 and s.sparsity(200) == 0.8


def test_linear_ramp_by_hand() -> None:
    # s_i 0.1 at t=10 -> s_f 0.9 at t=50, every 15 steps: prune times 10, 25, 40, 50.
    s = build_schedule(LinearConfig(final_sparsity=0.9, initial_sparsity=0.1, start=10, end=50, prune_freq=15), 60)
    assert s.prune_steps() == [10, 25, 40, 50]
    assert s.sparsity(9) == 0.0
    assert s.sparsity(10) == pytest.approx(0.1)
    assert s.sparsity(24) == pytest.approx(0.1)                      # held between prunes
    assert s.sparsity(25) == pytest.approx(0.1 + 0.8 * 15 / 40)      # 0.4
    assert s.sparsity(40) == pytest.approx(0.1 + 0.8 * 30 / 40)      # 0.7
    assert s.sparsity(49) == pytest.approx(0.7)
    assert s.sparsity(50) == 0.9 and s.sparsity(60) == 0.9           # exactly the target at end, not short of it


def test_cubic_by_hand() -> None:
    # s(t) = 0.8 + (0 - 0.8) (1 - (t - 0)/40)^3 at prune times 0, 10, 20, 30, 40.
    s = build_schedule(CubicConfig(final_sparsity=0.8, start=0, end=40, prune_freq=10), 40)
    assert s.sparsity(0) == pytest.approx(0.0)
    assert s.sparsity(10) == pytest.approx(0.8 - 0.8 * 0.75 ** 3)   # 0.4625
    assert s.sparsity(20) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)    # 0.7
    assert s.sparsity(39) == pytest.approx(0.8 - 0.8 * 0.25 ** 3)   # 0.7875
    assert s.sparsity(40) == 0.8


def test_exponential_each_prune_removes_the_same_fraction() -> None:
    # prune times 10, 20, 30, 40 (n = 4), s_f = 0.9375 = 1 - 1/16: each prune keeps half of what is left.
    s = build_schedule(ExponentialConfig(final_sparsity=0.9375, start=10, end=40, prune_freq=10), 50)
    assert s.prune_steps() == [10, 20, 30, 40]
    assert [s.sparsity(t) for t in (9, 10, 20, 30, 40)] == pytest.approx([0.0, 0.5, 0.75, 0.875, 0.9375])
    assert s.sparsity(40) == 0.9375


def test_exponential_uneven_last_interval_still_ends_on_target() -> None:
    s = build_schedule(ExponentialConfig(final_sparsity=0.75, start=0, end=25, prune_freq=10), 25)
    assert s.prune_steps() == [0, 10, 20, 25]                       # n = 4, f = 1 - 0.25^(1/4)
    assert s.sparsity(10) == pytest.approx(1 - 0.25 ** 0.5)
    assert s.sparsity(25) == 0.75


def test_half_cycle_ramp_by_hand() -> None:
    # C = 20, prune every 5: phase 5/20, 10/20, 15/20, 20/20 (the boundary ends its cycle), then again.
    s = build_schedule(CyclicalConfig(final_sparsity=0.8, start=0, end=40, prune_freq=5, cycle=20), 40)
    assert s.sparsity(0) == 0.0
    assert s.sparsity(5) == pytest.approx(0.8 * math.sin(math.pi / 8))
    assert s.sparsity(10) == pytest.approx(0.8 * math.sin(math.pi / 4))
    assert s.sparsity(20) == pytest.approx(0.8)                      # cycle end: exactly s_f
    assert s.sparsity(25) == pytest.approx(0.8 * math.sin(math.pi / 8))   # next cycle starts low
    assert s.sparsity(40) == 0.8


def test_full_cycle_ramp_by_hand() -> None:
    # s_f |sin(pi/2 * t / C)|, C = 10: up to s_f at 10, down to 0 at 20, up again to s_f at end = 30.
    s = build_schedule(CyclicalConfig(final_sparsity=0.6, start=0, end=30, prune_freq=5, cycle=10, mode="full"), 30)
    assert [s.sparsity(t) for t in (5, 10, 15, 20, 25, 30)] == pytest.approx(
        [0.6 * math.sin(math.pi / 4), 0.6, 0.6 * math.sin(math.pi / 4), 0.0, 0.6 * math.sin(math.pi / 4), 0.6])


def test_cycle_boundaries_are_prune_times_whatever_the_frequency() -> None:
    s = build_schedule(CyclicalConfig(final_sparsity=0.5, start=0, end=14, prune_freq=4, cycle=7), 14)
    assert s.prune_steps() == [0, 4, 7, 8, 12, 14]
    assert s.sparsity(7) == pytest.approx(0.5) and s.sparsity(8) == pytest.approx(0.5 * math.sin(math.pi / 14))


def test_cyclical_end_must_be_on_a_peak() -> None:
    with pytest.raises(ValueError, match="cycle: end - start"):
        build_schedule(CyclicalConfig(final_sparsity=0.5, start=0, end=30, cycle=20), 30)
    with pytest.raises(ValueError, match="odd multiple"):
        build_schedule(CyclicalConfig(final_sparsity=0.5, start=0, end=20, cycle=10, mode="full"), 20)


def test_fractions_convert_with_the_run_length() -> None:
    assert to_steps(0.5, 391 * 10) == 1955 and to_steps(7, 3910) == 7 and to_steps(1.0, 3910) == 3910
    s = build_schedule(LinearConfig(final_sparsity=0.5, start=0.1, end=0.5, prune_freq=0.1), 1000)
    assert (s.start, s.end, s.freq) == (100, 500, 100)
    assert s.prune_steps() == [100, 200, 300, 400, 500]


def test_bad_configs_fail_naming_the_field() -> None:
    with pytest.raises(ValueError, match="^end 1.5 is a float"):
        LinearConfig(end=1.5)
    with pytest.raises(ValueError, match="^prune_freq must be at least 1"):
        LinearConfig(prune_freq=0)
    with pytest.raises(ValueError, match="^final_sparsity must be in"):
        LinearConfig(final_sparsity=1.0)
    with pytest.raises(ValueError, match="^initial_sparsity"):
        CubicConfig(final_sparsity=0.5, initial_sparsity=0.6)
    with pytest.raises(ValueError, match="^start"):
        LinearConfig(start=50, end=10)
    with pytest.raises(ValueError, match="never be reached"):
        build_schedule(LinearConfig(start=0, end=200), 100)


def test_schedule_configs_load_by_name_with_their_own_keys() -> None:
    cfg = build(GradualConfig, {"method": "gradual", "schedule": {"name": "cyclical", "cycle": 0.25, "end": 1.0}},
                "sparsity")
    assert isinstance(cfg.schedule, CyclicalConfig) and cfg.schedule.cycle == 0.25 and cfg.schedule.end == 1.0
    steps = build(GradualConfig, {"method": "gradual", "schedule": {"end": 300, "prune_freq": 0.05}}, "sparsity")
    assert isinstance(steps.schedule, LinearConfig) and steps.schedule.end == 300
    assert isinstance(steps.schedule.end, int) and isinstance(steps.schedule.prune_freq, float)
    with pytest.raises(ConfigError, match="unknown key 'sparsity.schedule.cycle'"):
        build(GradualConfig, {"method": "gradual", "schedule": {"name": "linear", "cycle": 3}}, "sparsity")
    with pytest.raises(ConfigError, match="sparsity.schedule.name 'cubc' is not a known sparsity schedule"):
        build(GradualConfig, {"method": "gradual", "schedule": {"name": "cubc"}}, "sparsity")


def test_resolved_config_round_trips_through_plain_data() -> None:
    """The run directory's config.yaml must rebuild the same schedule (resume and the lottery levels rely on it)."""
    from engine.config import to_dict

    cfg = build(GradualConfig, {"method": "gradual", "scope": "global",
                                "schedule": {"name": "exponential", "final_sparsity": 0.8, "end": 0.75}}, "sparsity")
    assert build(GradualConfig, to_dict(cfg), "sparsity") == cfg
