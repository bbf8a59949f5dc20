"""Sparsity schedules: the target sparsity (fraction pruned) as a function of training time.

Time ``t`` counts optimizer steps *completed*: ``t = 0`` is before training (the method's ``setup``), the hook
``after_step(step)`` sees ``t = step + 1``, and the last step of a run of ``T`` steps ends at ``t = T``. A schedule
prunes at its prune times (every ``prune_freq`` steps from ``start``, plus ``end``) and holds the value of the latest
prune time in between. ``start``, ``end``, ``prune_freq`` (and a cycle length) are steps when integers, fractions of
the whole run when floats in (0, 1]; YAML ``1.0`` is the end of training, ``1`` is step 1.

Every schedule reaches its final sparsity exactly at ``end`` (the reference code stops one prune short; not
reproduced). Each schedule is a small registered class with its own typed config, found by ``name``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from common.registry import Registry

Time = int | float   # steps (int) or a fraction of the run (float in (0, 1])


def check_time(field_name: str, value: Time, *, zero_ok: bool) -> None:
    """Integers are steps, floats fractions of the run; anything else is a typo that would silently misfire."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field_name} must be a step count (integer) or a fraction of training (float in (0, 1]), "
                         f"got {value!r}")
    if isinstance(value, float):
        if not (0.0 <= value <= 1.0 if zero_ok else 0.0 < value <= 1.0):
            raise ValueError(f"{field_name} {value} is a float, so a fraction of training: it must be in "
                             f"{'[0, 1]' if zero_ok else '(0, 1]'}; write an integer for a step count")
    elif value < (0 if zero_ok else 1):
        raise ValueError(f"{field_name} must be {'>= 0' if zero_ok else 'at least 1'} steps, got {value}")


def to_steps(value: Time, total_steps: int) -> int:
    """A time in steps: integers as they are, fractions times the run's length (rounded)."""
    return int(round(value * total_steps)) if isinstance(value, float) else int(value)


@dataclass
class ScheduleConfig:
    """``name`` picks the schedule; ``final_sparsity`` is the fraction of weights pruned at the end."""

    name: str = "linear"   # the registered schedule
    final_sparsity: float = 0.9   # fraction of weights pruned at the end

    def __post_init__(self) -> None:
        if not 0.0 <= self.final_sparsity < 1.0:
            raise ValueError(f"final_sparsity must be in [0, 1) (the fraction of weights pruned), "
                             f"got {self.final_sparsity}")

    @classmethod
    def config_variant(cls, data: dict[str, Any]) -> type[ScheduleConfig]:
        """The config class of the schedule named in ``data`` (used by the engine's config loader)."""
        return schedule_class(data.get("name", "linear")).Config


@dataclass
class WindowConfig(ScheduleConfig):
    """A schedule that prunes every ``prune_freq`` steps from ``start`` to ``end`` (steps or fractions)."""

    start: Time = 0   # first prune time
    end: Time = 1.0   # last prune time: final_sparsity is reached here
    prune_freq: Time = 100   # time between prunes

    def __post_init__(self) -> None:
        super().__post_init__()
        check_time("start", self.start, zero_ok=True)
        check_time("end", self.end, zero_ok=True)
        check_time("prune_freq", self.prune_freq, zero_ok=False)
        if type(self.start) is type(self.end) and self.start > self.end:
            raise ValueError(f"start ({self.start}) must not be after end ({self.end})")


@dataclass
class RampConfig(WindowConfig):
    """Linear or cubic ramp from ``initial_sparsity`` at ``start`` to ``final_sparsity`` at ``end``."""

    initial_sparsity: float = 0.0   # sparsity at start

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.initial_sparsity <= self.final_sparsity:
            raise ValueError(f"initial_sparsity must be in [0, final_sparsity={self.final_sparsity}], "
                             f"got {self.initial_sparsity}")


@dataclass
class LinearConfig(RampConfig):
    """Linear ramp (see :class:`Linear`)."""

    name: str = "linear"


@dataclass
class CubicConfig(RampConfig):
    """Cubic ramp (see :class:`Cubic`)."""

    name: str = "cubic"


@dataclass
class OneShotInitConfig(ScheduleConfig):
    """Prune once, to ``final_sparsity``, before the first step."""

    name: str = "one_shot_init"


@dataclass
class OneShotConfig(ScheduleConfig):
    """Prune once, to ``final_sparsity``, at ``start`` (steps or a fraction of training)."""

    name: str = "one_shot"
    start: Time = 0.5   # the one prune time

    def __post_init__(self) -> None:
        super().__post_init__()
        check_time("start", self.start, zero_ok=True)


@dataclass
class CyclicalConfig(WindowConfig):
    """Cyclical ramp with cycle length ``cycle``: ``half`` restarts from 0 each cycle, ``full`` goes up and down."""

    name: str = "cyclical"
    cycle: Time = 0.1   # cycle length
    mode: Literal["half", "full"] = "half"   # half: restart from 0 each cycle; full: up and down

    def __post_init__(self) -> None:
        super().__post_init__()
        check_time("cycle", self.cycle, zero_ok=False)


class Schedule(abc.ABC):
    """Target sparsity over time for one run of ``total_steps`` optimizer steps."""

    Config: ClassVar[type[ScheduleConfig]] = ScheduleConfig
    name: ClassVar[str] = ""

    def __init__(self, config: ScheduleConfig, total_steps: int) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        self.config = config
        self.total_steps = total_steps
        self.final = config.final_sparsity
        self.start, self.end, self.freq = self._window(config, total_steps)
        if not 0 <= self.start <= self.end <= total_steps:
            raise ValueError(f"start ({self.start}) and end ({self.end}) must satisfy 0 <= start <= end <= "
                             f"{total_steps} (the run's steps); the final sparsity would never be reached")

    def _window(self, config: ScheduleConfig, total: int) -> tuple[int, int, int]:
        """(start, end, prune_freq) in steps."""
        assert isinstance(config, WindowConfig)
        return (to_steps(config.start, total), to_steps(config.end, total),
                max(1, to_steps(config.prune_freq, total)))

    @abc.abstractmethod
    def value(self, t: int) -> float:
        """The schedule's formula at prune time ``t`` (only called for start <= t <= end)."""

    def is_prune_step(self, t: int) -> bool:
        """Whether the method prunes (or changes its mask) when ``t`` steps are done."""
        return self.start <= t <= self.end and ((t - self.start) % self.freq == 0 or t == self.end)

    def last_prune_step(self, t: int) -> int | None:
        """The latest prune time at or before ``t`` (None before the first)."""
        if t < self.start:
            return None
        if t >= self.end:
            return self.end
        return self.start + (t - self.start) // self.freq * self.freq

    def prune_steps(self) -> list[int]:
        """Every prune time, in order."""
        return [*range(self.start, self.end, self.freq), self.end]

    def sparsity(self, t: int) -> float:
        """Target sparsity in effect once ``t`` steps are done: 0 before the first prune."""
        last = self.last_prune_step(t)
        return 0.0 if last is None else (self.final if last == self.end else self.value(last))


_SCHEDULES: Registry[type[Schedule]] = Registry("sparsity schedule", "name")


def register_schedule(name: str) -> Callable[[type[Schedule]], type[Schedule]]:
    """Class decorator: make a schedule available as ``schedule.name: <name>``."""
    return _SCHEDULES.register(name)


def schedule_class(name: str) -> type[Schedule]:
    """The schedule registered as ``name``; a one-line error lists the valid names otherwise."""
    return _SCHEDULES.get(name)


def list_schedules() -> list[str]:
    return _SCHEDULES.names()


def build_schedule(config: ScheduleConfig, total_steps: int) -> Schedule:
    """Instantiate the schedule named by ``config.name`` for a run of ``total_steps`` steps."""
    return schedule_class(config.name)(config, total_steps)


@register_schedule("one_shot_init")
class OneShotInit(Schedule):
    """Everything at once before training (t = 0)."""

    Config = OneShotInitConfig

    def _window(self, config: ScheduleConfig, total: int) -> tuple[int, int, int]:
        return 0, 0, 1

    def value(self, t: int) -> float:
        return self.final


@register_schedule("one_shot")
class OneShot(Schedule):
    """Everything at once when ``start`` steps are done."""

    Config = OneShotConfig

    def _window(self, config: ScheduleConfig, total: int) -> tuple[int, int, int]:
        assert isinstance(config, OneShotConfig)
        at = to_steps(config.start, total)
        return at, at, 1

    def value(self, t: int) -> float:
        return self.final


@register_schedule("linear")
class Linear(Schedule):
    """s(t) = s_i + (s_f - s_i) (t - start) / (end - start)."""

    Config = LinearConfig

    def value(self, t: int) -> float:
        assert isinstance(self.config, RampConfig)
        if self.end == self.start:
            return self.final
        s_i = self.config.initial_sparsity
        return s_i + (self.final - s_i) * (t - self.start) / (self.end - self.start)


@register_schedule("cubic")
class Cubic(Schedule):
    """Zhu and Gupta: s(t) = s_f + (s_i - s_f) (1 - (t - start) / (end - start))^3; fast early, gentle late."""

    Config = CubicConfig

    def value(self, t: int) -> float:
        assert isinstance(self.config, RampConfig)
        if self.end == self.start:
            return self.final
        progress = (t - self.start) / (self.end - self.start)
        return self.final + (self.config.initial_sparsity - self.final) * (1.0 - progress) ** 3


@dataclass
class ExponentialConfig(WindowConfig):
    """Each of the n prunes between ``start`` and ``end`` removes the same fraction of the remaining weights."""

    name: str = "exponential"


@register_schedule("exponential")
class Exponential(Schedule):
    """n prunes (every prune time, ``start`` included); prune j leaves density (1 - s_f)^(j/n).

    Each prune therefore removes f = 1 - (1 - s_f)^(1/n) of the weights still there.
    """

    Config = ExponentialConfig

    def prunes(self) -> int:
        return len(self.prune_steps())

    def value(self, t: int) -> float:
        index = (t - self.start) // self.freq + 1 if t < self.end else self.prunes()
        return 1.0 - (1.0 - self.final) ** (index / self.prunes())


@register_schedule("cyclical")
class Cyclical(Schedule):
    """Half cycle: s_f sin(pi/2 * phase / C), restarting every C steps; full: s_f |sin(pi/2 (t - start) / C)|.

    Half cycle: a cycle boundary belongs to the cycle it ends, so the ramp reaches s_f exactly there (phase C, not
    0) and the next prune time starts the next cycle low. ``end`` must lie on a peak (a cycle boundary for half,
    an odd multiple of C for full) so that the final sparsity is reached at ``end``. Cycle boundaries are prune
    times whatever ``prune_freq`` says.
    """

    Config = CyclicalConfig

    def __init__(self, config: ScheduleConfig, total_steps: int) -> None:
        super().__init__(config, total_steps)
        assert isinstance(config, CyclicalConfig)
        self.mode = config.mode
        self.cycle = max(1, to_steps(config.cycle, total_steps))
        span = self.end - self.start
        peaks = span // self.cycle
        if span % self.cycle or (self.mode == "full" and peaks % 2 == 0) or span == 0:
            need = "a multiple" if self.mode == "half" else "an odd multiple"
            raise ValueError(f"cycle: end - start ({span} steps) must be {need} of the cycle ({self.cycle} steps) "
                             "so that the final sparsity is reached at end")

    def _phase(self, t: int) -> float:
        offset = t - self.start
        if self.mode == "full":
            return offset / self.cycle
        return 0.0 if offset == 0 else ((offset - 1) % self.cycle + 1) / self.cycle

    def value(self, t: int) -> float:
        return self.final * abs(math.sin(math.pi / 2 * self._phase(t)))

    def is_prune_step(self, t: int) -> bool:
        return super().is_prune_step(t) or (self.start <= t <= self.end and (t - self.start) % self.cycle == 0)

    def last_prune_step(self, t: int) -> int | None:
        last = super().last_prune_step(t)
        if last is None or t >= self.end:
            return last
        boundary = self.start + (t - self.start) // self.cycle * self.cycle
        return max(last, boundary)

    def prune_steps(self) -> list[int]:
        return sorted({*super().prune_steps(), *range(self.start, self.end + 1, self.cycle)})
