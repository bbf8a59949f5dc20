"""When a method acts and how far: small schedule objects beside the sparsity ramps of ``pruning.schedules``.

Each answers "is t an update / prune time" and "what density or fraction then", so methods hold no arithmetic of
time. Time follows the project's rule: ``t`` counts optimizer steps done; ``setup`` is t = 0 and ``after_step(step)``
is t = step + 1.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from typing import Literal

from pruning.schedules import Linear, LinearConfig, Time, to_steps

FractionKind = Literal["exponential", "cubic"]
FRACTION_KINDS = ("exponential", "cubic")


# ---------------------------------------------------------------------------------------------------- DST
class UpdatePeriods:
    """DST's update times: t is one when it is a multiple of the period in force at the epoch of step t - 1
    (``period``, then ``periods[i]`` from epoch ``period_epochs[i]`` on) and step t - 1 comes before ``stop_step``,
    the first step of ``stop_epoch`` (the run's end when it is None). Deep R rewires at every step: period 1."""

    def __init__(self, period: int, period_epochs: Sequence[int], periods: Sequence[int], stop_epoch: int | None,
                 steps_per_epoch: int, epochs: int) -> None:
        self.period = period
        self.period_epochs = list(period_epochs)
        self.periods = list(periods)
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.stop_step = (stop_epoch if stop_epoch is not None else epochs) * self.steps_per_epoch

    def period_at(self, epoch: int) -> int:
        """The period in force at ``epoch``."""
        i = bisect.bisect_right(self.period_epochs, epoch) - 1
        return self.periods[i] if i >= 0 else self.period

    def is_due(self, t: int) -> bool:
        """Whether the masks change once ``t`` steps are done."""
        step = t - 1
        if not 0 <= step < self.stop_step:
            return False
        return t % self.period_at(step // self.steps_per_epoch) == 0

    def first_due(self) -> int | None:
        """The first update time t, or None when no update falls before ``stop_step`` (checked epoch by epoch, so
        long runs cost nothing)."""
        for epoch in range(-(-self.stop_step // self.steps_per_epoch)):
            period = self.period_at(epoch)
            lo = epoch * self.steps_per_epoch + 1                       # t of the epoch's first step
            hi = min((epoch + 1) * self.steps_per_epoch, self.stop_step)
            first = -(-lo // period) * period
            if first <= hi:
                return first
        return None


class DropFraction:
    """SET's drop fraction f_t: constant f, or cosine f / 2 (1 + cos(pi t / T_end)) with t capped at T_end."""

    def __init__(self, fraction: float, decay: Literal["constant", "cosine"], end: int) -> None:
        self.fraction = fraction
        self.decay = decay
        self.end = end

    def at(self, t: int) -> float:
        if self.decay == "constant":
            return self.fraction
        return self.fraction / 2.0 * (1.0 + math.cos(math.pi * min(t, self.end) / max(1, self.end)))


# ---------------------------------------------------------------------------------------------------- at init
class IterationDensities:
    """Pruning at init's density after iteration k of n: rho^(k/n) (exponential) or 1 - (1 - rho) (k / n) (linear),
    computed as the Synaptic Flow code does, to the last bit (its masks depend on it)."""

    def __init__(self, final: float, iterations: int, kind: Literal["exponential", "linear"]) -> None:
        self.final = final
        self.iterations = iterations
        self.kind = kind

    def at(self, k: int) -> float:
        if self.kind == "exponential":
            return self.final ** (k / self.iterations)
        return 1.0 - (1.0 - self.final) * (k / self.iterations)

    def __iter__(self) -> Iterator[tuple[int, float]]:
        """(k, density_k) for k = 1..n."""
        return ((k, self.at(k)) for k in range(1, self.iterations + 1))


# ---------------------------------------------------------------------------------------------------- iterative
def density_after(k: int, n: int, s: float, kind: str) -> float:
    """Density d_{k+1} once prunes 0..k of n are done (k = -1: before any prune, 1.0); exactly 1 - s at k = n - 1."""
    if not -1 <= k < n:
        raise ValueError(f"prune index k must be in [-1, {n - 1}] for n = {n} prunes, got {k}")
    if kind not in FRACTION_KINDS:
        raise ValueError(f"fraction must be one of {', '.join(FRACTION_KINDS)}, got {kind!r}")
    if k == -1:
        return 1.0
    if k == n - 1:
        return 1.0 - s          # the same float every exact-count check uses
    if kind == "exponential":
        return (1.0 - s) ** ((k + 1) / n)
    return 1.0 - s + s * (1.0 - (k + 1) / n) ** 3


def per_prune_fraction(k: int, n: int, s: float, kind: str) -> float:
    """f_k: the share of the weights still kept that prune k (0-based) removes."""
    if not 0 <= k < n:
        raise ValueError(f"prune index k must be in [0, {n - 1}] for n = {n} prunes, got {k}")
    return 1.0 - density_after(k, n, s, kind) / density_after(k - 1, n, s, kind)


class IterativePrunes:
    """n prunes ``every_epochs`` apart, the first once ``start_epoch`` epochs are done; prune k leaves d_{k+1}."""

    def __init__(self, final_sparsity: float, prunes: int, every_epochs: int, start_epoch: int, kind: FractionKind,
                 steps_per_epoch: int) -> None:
        self.final_sparsity = final_sparsity
        self.prunes = prunes
        self.kind = kind
        spe = max(1, steps_per_epoch)
        self.times = [(start_epoch + j * every_epochs) * spe for j in range(prunes)]

    def index(self, t: int) -> int | None:
        """k when ``t`` is the time of prune k, else None."""
        return self.times.index(t) if t in self.times else None

    def density(self, k: int) -> float:
        """d_{k+1}, the density prune k leaves (k = -1: dense)."""
        return density_after(k, self.prunes, self.final_sparsity, self.kind)

    def fraction(self, k: int) -> float:
        """f_k, the share of the kept weights prune k should remove."""
        return per_prune_fraction(k, self.prunes, self.final_sparsity, self.kind)


# ---------------------------------------------------------------------------------------------------- lottery
class LevelDensity:
    """Iterative magnitude pruning's density at level l: (1 - prune_fraction)^l of the weights."""

    def __init__(self, prune_fraction: float) -> None:
        self.prune_fraction = prune_fraction

    def at(self, level: int) -> float:
        return (1.0 - self.prune_fraction) ** level


# ---------------------------------------------------------------------------------------------------- union mask
class UnionCycles:
    """Union Mask's cycles between ``start`` and ``end``: boundaries, the half-cycle ramp, and the last linear ramp.

    The length C is given as ``cycle`` (steps or a fraction of training; end - start must hold a whole number of
    cycles, at least 2) or as a count ``cycles`` (boundaries rounded to whole steps; 10 when neither is given). In
    every cycle but the last the sparsity is s_f sin(pi/2 * phase / C), phase in (0, C], so it reaches s_f on the
    cycle's last step (the boundary belongs to the cycle it ends). ``last_start`` = end - C starts the last cycle.
    """

    def __init__(self, final_sparsity: float, start: Time, end: Time, cycle: Time | None, cycles: int | None,
                 prune_freq: Time, total_steps: int) -> None:
        self.final = final_sparsity
        self.total_steps = total_steps
        self.start, self.end = to_steps(start, total_steps), to_steps(end, total_steps)
        self.freq = max(1, to_steps(prune_freq, total_steps))
        if self.end > total_steps:
            raise ValueError(f"end ({self.end} steps) is after the run's last step ({total_steps}); the final sparsity "
                             "would never be reached")
        span = self.end - self.start
        if cycle is not None:
            length = to_steps(cycle, total_steps)
            if length < 1 or span % length or span // length < 2:
                raise ValueError(f"cycle: end - start ({span} steps) must hold a whole number (at least 2) of cycles "
                                 f"of {length} steps; change cycle, start or end")
            count = span // length
        else:
            count = cycles if cycles is not None else 10
        if span < count:
            raise ValueError(f"cycles: {count} cycles do not fit between start ({self.start}) and end "
                             f"({self.end}) steps; use fewer cycles or a longer window")
        self.bounds = [self.start + round(k * span / count) for k in range(count + 1)]
        self.last_start = self.bounds[-2]

    def cycle_of(self, t: int) -> int:
        """Index k of the cycle (bounds[k], bounds[k + 1]] holding ``t`` (t > start)."""
        return bisect.bisect_left(self.bounds, t) - 1

    def is_prune_step(self, t: int) -> bool:
        """Prune times before the last cycle: every prune_freq steps from each cycle's start, and every boundary."""
        if not self.start <= t <= self.last_start:
            return False
        return t == self.start or t in self.bounds or (t - self.bounds[self.cycle_of(t)]) % self.freq == 0

    def is_boundary(self, t: int) -> bool:
        """Whether ``t`` ends a cycle (the union collects the mask there)."""
        return t > self.start and t in self.bounds

    def sparsity(self, t: int) -> float:
        """Half-cycle ramp: s_f sin(pi/2 * phase / C), 0 at ``start``."""
        if t <= self.start:
            return 0.0
        k = self.cycle_of(t)
        phase = (t - self.bounds[k]) / (self.bounds[k + 1] - self.bounds[k])
        return self.final * math.sin(math.pi / 2 * phase)

    def last_ramp(self, initial_sparsity: float) -> Linear:
        """The last cycle's linear ramp from ``initial_sparsity`` to s_f at ``end``."""
        return Linear(LinearConfig(final_sparsity=self.final, initial_sparsity=initial_sparsity,
                                   start=self.last_start, end=self.end, prune_freq=self.freq), self.total_steps)
