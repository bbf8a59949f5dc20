"""The sweep file: a base run config, fixed settings, a search space over dotted keys, and how Tune searches it.

Everything is checked here, before Ray starts, with the engine's own config loader: every value a trial can draw is
put into the run config of its method and built, so a key that does not exist (or belongs to another method) or a
value out of range fails with the same one-line ``ConfigError`` that ``train`` prints.

    name: set_digits                      # the sweep lives in <sweep_dir>/<name>
    base: configs/quickstart.yaml         # a run config: a path (or fsspec URL) or an inline mapping
    set: {train.epochs: 3, data.val_fraction: 0.1}     # fixed dotted overrides applied to every trial
    space:                                # one distribution per dotted key
      sparsity.drop_fraction: {uniform: [0.1, 0.5]}
      sparsity.period: {choice: [10, 25, 50]}
    metric: val/acc                       # what the scheduler and "best" look at
    mode: max
    num_samples: 8
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
    searcher: {name: random}
    resources: {cpus: 1, gpus: 0, workers_per_trial: 1}   # workers_per_trial > 1: a Ray Train DDP job per trial
    max_concurrent: 2

PBT (``scheduler: {name: pbt, perturbation_interval: 1}``) mutates only keys that can change in the middle of a run
(``PBT_MUTABLE``); a sweep that draws any other key under PBT is refused here.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from common import did_you_mean
from engine.config import ConfigError, apply_overrides, build, read_yaml, set_dotted, to_dict
from engine.data import check_data_available
from engine.run_config import RunConfig

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
METRICS = ("val/acc", "val/loss", "test/acc", "test/loss", "train/acc", "train/loss", "density")
RESERVED = ("name", "output_dir", "resume")   # the sweep sets these for every trial
# keys a PBT exploit may change when a trial continues from another trial's checkpoint, and why that is sound
PBT_MUTABLE = {
    "optim.lr": "the restored lr schedule is rescaled to the new peak lr",
    "sparsity.drop_fraction": "dynamic sparse methods read it at every mask update",
}


@dataclass
class SchedulerConfig:
    """Which Tune scheduler decides when trials stop (ASHA), lets every trial run to the end (FIFO), or copies the
    weights of good trials into bad ones with perturbed hyper-parameters (PBT)."""

    name: Literal["asha", "fifo", "pbt"] = "asha"
    grace_period: int = 1                 # asha: epochs every trial runs before it can be stopped
    reduction_factor: float = 2.0         # asha: keep the top 1/reduction_factor at each rung
    perturbation_interval: int = 1        # pbt: epochs between exploit/explore steps
    quantile_fraction: float = 0.25       # pbt: the bottom fraction copies the top fraction
    resample_probability: float = 0.25    # pbt: chance that a mutated value is drawn afresh instead of scaled
    synch: bool = False                   # pbt: every trial waits at each perturbation point (reproducible, slower)

    def __post_init__(self) -> None:
        if self.perturbation_interval < 1:
            raise ValueError(f"perturbation_interval must be at least 1 epoch, got {self.perturbation_interval}")
        if not 0 < self.quantile_fraction <= 0.5:
            raise ValueError(f"quantile_fraction must be in (0, 0.5], got {self.quantile_fraction}")
        if not 0 <= self.resample_probability <= 1:
            raise ValueError(f"resample_probability must be in [0, 1], got {self.resample_probability}")
        if self.grace_period < 1:
            raise ValueError(f"grace_period must be at least 1 epoch, got {self.grace_period}")
        if self.reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be above 1 (e.g. 2), got {self.reduction_factor}")


@dataclass
class SearcherConfig:
    """How values are drawn: random (Tune's variant generator, grids included) or Optuna's TPE."""

    name: Literal["random", "optuna"] = "random"
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.name == "optuna" and importlib.util.find_spec("optuna") is None:
            raise ValueError("name optuna needs the optuna package: pip install optuna, or use searcher.name=random")


@dataclass
class ResourcesConfig:
    """What one trial holds while it runs."""

    cpus: float = 1.0                     # per trial, or per worker when workers_per_trial > 1
    gpus: float = 0.0                     # likewise
    workers_per_trial: int = 1            # > 1: a Ray Train TorchTrainer of this many DDP workers per trial

    def __post_init__(self) -> None:
        if self.cpus <= 0:
            raise ValueError(f"cpus must be positive, got {self.cpus}")
        if self.gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {self.gpus}")
        if self.workers_per_trial < 1:
            raise ValueError(f"workers_per_trial must be at least 1, got {self.workers_per_trial}")


@dataclass
class RayConnection:
    """Local Ray by default; an address (or RAY_ADDRESS) joins an existing cluster."""

    address: str | None = None
    num_cpus: int | None = None           # local Ray only; None: every core of this machine
    num_gpus: int | None = None

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be at least 1 or null, got {self.num_cpus}")


@dataclass
class SweepConfig:
    """One sweep file, typed (see the module docstring)."""

    name: str = "sweep"
    base: Any = None
    set: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)
    metric: str = "val/acc"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 1
    max_concurrent: int | None = None
    sweep_dir: str = "runs/sweeps"
    resume: bool = False
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    searcher: SearcherConfig = field(default_factory=SearcherConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    ray: RayConnection = field(default_factory=RayConnection)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty sweep name without '/', got {self.name!r}")
        if self.base is None:
            raise ValueError("base is missing: give a run config path (base: configs/quickstart.yaml) or an inline "
                             "mapping of sections")
        if not isinstance(self.base, (str, Mapping)):
            raise ValueError(f"base must be a config path or a mapping of sections, got {self.base!r}")
        if not self.space:
            raise ValueError("space is empty: add at least one key, e.g. space: {sparsity.density: {choice: [0.05, "
                             "0.1]}}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}"
                             f"{did_you_mean(self.metric, METRICS)}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1 or null, got {self.max_concurrent}")


@dataclass(frozen=True)
class Distribution:
    """One key's search distribution: ``kind`` in DISTRIBUTIONS and its arguments."""

    kind: str
    args: tuple[Any, ...]

    def candidates(self) -> list[Any]:
        """Values that stand for the whole range in the pre-flight check: every listed value, or both ends."""
        if self.kind in ("grid", "choice"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]

    def first(self) -> Any:
        return self.candidates()[0]

    def numeric(self) -> bool:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.candidates())

    def to_tune(self) -> Any:
        """The Ray Tune domain (imported lazily: the checks run without Ray)."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        return tune.randint(*self.args)


def _parse_distribution(key: str, kind: str, args: Any) -> Distribution:
    where = f"space.{key}.{kind}"
    if kind in ("grid", "choice"):
        if not isinstance(args, (list, tuple)) or not args:
            raise ConfigError(f"{where} must be a non-empty list of values, e.g. {{{kind}: [0.1, 0.3]}}")
        return Distribution(kind, tuple(args))
    if (not isinstance(args, (list, tuple)) or len(args) != 2
            or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
        raise ConfigError(f"{where} must be [low, high], two numbers, got {args!r}")
    low, high = args
    if not low < high:
        raise ConfigError(f"{where} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where} needs a positive low end, got {low}; use uniform for ranges that reach 0")
    if kind == "randint":
        if not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where} must be two integers [low, high) (high excluded), got {args!r}")
        return Distribution(kind, (int(low), int(high)))
    return Distribution(kind, (float(low), float(high)))


def flatten_space(space: Mapping[str, Any], prefix: str = "") -> dict[str, Distribution]:
    """Dotted key -> Distribution; nested sections (``sparsity: {density: {choice: [...]}}``) are flattened."""
    out: dict[str, Distribution] = {}
    for raw_key, node in space.items():
        key = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if not isinstance(node, Mapping) or not node:
            raise ConfigError(f"space.{key} must be one distribution, e.g. {{choice: [0.1, 0.3]}} or "
                              f"{{uniform: [0.1, 0.5]}}; got {node!r}")
        if len(node) == 1:
            (kind, args), = node.items()
            if kind in DISTRIBUTIONS:
                out[key] = _parse_distribution(key, kind, args)
                continue
            if not isinstance(args, Mapping):
                raise ConfigError(f"space.{key}: unknown distribution '{kind}'{did_you_mean(kind, DISTRIBUTIONS)}; "
                                  f"use one of {', '.join(DISTRIBUTIONS)}")
        out.update(flatten_space(node, key))
    return out


def flatten_settings(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``set`` as dotted key -> value (nested mappings flattened; a mapping value re-nests to the same thing)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_settings(value, dotted))
        else:
            out[dotted] = value
    return out


def get_dotted(data: Mapping[str, Any], key: str) -> Any:
    """The value at dotted ``key`` of nested plain data, or None when a part is missing."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node



@dataclass
class SweepPlan:
    """A checked sweep: the typed file, the base run data, the fixed settings and the flattened space."""

    sweep: SweepConfig
    base: dict[str, Any]
    fixed: dict[str, Any]
    space: dict[str, Distribution]
    experiment_dir: str            # <sweep_dir>/<name>: Tune's state, the trials' run dirs, the results
    max_epochs: int

    @property
    def trials_dir(self) -> str:
        return f"{self.experiment_dir}/trials"

    def run_data(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The plain run config of one trial: base, then the fixed settings, then the trial's drawn values."""
        data = copy.deepcopy(self.base)
        for key, value in {**self.fixed, **values}.items():
            set_dotted(data, key, copy.deepcopy(value))
        return data

    def trial_config(self, values: Mapping[str, Any], name: str = "trial", resume: str | None = None) -> RunConfig:
        """The checked RunConfig of one trial; its run directory is <experiment_dir>/trials/<name>."""
        data = self.run_data(values)
        data.update(name=name, output_dir=self.trials_dir, resume=resume)
        data.setdefault("monitor", {})["progress"] = False
        root = (data.get("data") or {}).get("root")
        if isinstance(root, str) and root and not _is_url(root):    # trials may run in another working directory
            data["data"]["root"] = os.path.abspath(root)
        return build(RunConfig, data)

    def best_config(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The plain config of a trial as a standalone run for ``train`` (its own name, the usual runs/ folder)."""
        data = self.run_data(values)
        data.update(name=f"{self.sweep.name}_best")
        data.pop("output_dir", None)
        data.pop("resume", None)
        return to_dict(build(RunConfig, data))


def _is_url(path: str) -> bool:
    return "://" in path


def _check_space(plan: SweepPlan) -> None:
    """Build the run config of every listed value and both ends of every range, one key at a time (per swept method,
    if any); the caller then builds all the first values together."""
    keys = list(plan.space)
    for key in keys:
        if key in RESERVED or key.split(".")[0] in RESERVED:
            raise ConfigError(f"space.{key}: the sweep sets {key} for each trial; sweep another key")
    methods = plan.space["sparsity.method"].candidates() if "sparsity.method" in plan.space else [None]
    for method in methods:
        for key in keys:
            for value in plan.space[key].candidates():
                values = {key: value}        # one key at a time: an error names the key that caused it
                if method is not None:
                    values["sparsity.method"] = method
                try:
                    plan.trial_config(values)
                except ConfigError as error:
                    raise ConfigError(f"space {key}={value!r}"
                                      f"{'' if method is None else f' (sparsity.method={method})'}: {error}") from None


def plan_sweep(sweep: SweepConfig) -> SweepPlan:
    """Check a typed sweep against the engine's configs and the data; raises ConfigError / FileNotFoundError."""
    base = read_yaml(sweep.base) if isinstance(sweep.base, str) else to_plain(sweep.base)
    space = flatten_space(sweep.space)
    fixed = flatten_settings(sweep.set)
    for key in fixed:
        if key.split(".")[0] in RESERVED:
            raise ConfigError(f"set.{key}: the sweep sets {key.split('.')[0]} for each trial; remove it")
    root = sweep.sweep_dir if _is_url(sweep.sweep_dir) else os.path.abspath(sweep.sweep_dir)
    plan = SweepPlan(sweep=sweep, base=base, fixed=fixed, space=space,
                     experiment_dir=f"{root.rstrip('/')}/{sweep.name}", max_epochs=0)
    try:
        plan.trial_config({})
    except ConfigError as error:
        raise ConfigError(f"base config (with set): {error}") from None
    _check_space(plan)
    try:
        first = plan.trial_config({k: d.first() for k, d in space.items()})
    except ConfigError as error:
        raise ConfigError(f"space (the first value of every key together): {error}") from None
    if sweep.metric.startswith("val/") and first.data.val_fraction <= 0:
        raise ConfigError(f"metric {sweep.metric} needs a validation split: set data.val_fraction (e.g. "
                          "set: {data.val_fraction: 0.1}) or metric=test/acc")
    epochs = space["train.epochs"].candidates() if "train.epochs" in space else [first.train.epochs]
    plan.max_epochs = int(max(epochs))
    scheduler = sweep.scheduler
    if scheduler.name == "asha" and scheduler.grace_period > plan.max_epochs:
        raise ConfigError(f"scheduler.grace_period ({scheduler.grace_period}) is longer than train.epochs "
                          f"({plan.max_epochs}); lower it or train longer")
    grids = [k for k, d in space.items() if d.kind == "grid"]
    if grids and sweep.searcher.name == "optuna":
        raise ConfigError(f"space.{grids[0]}: grid is not supported by searcher optuna; use choice")
    if scheduler.name == "pbt":
        _check_pbt(plan, first)
    if sweep.resources.workers_per_trial > 1 and first.parallel.backend not in ("auto", "ddp"):
        raise ConfigError(f"resources.workers_per_trial={sweep.resources.workers_per_trial} runs each trial as a "
                          f"Ray Train DDP job, but parallel.backend is {first.parallel.backend}; set "
                          "parallel.backend=ddp (or auto), or workers_per_trial=1")
    check_data_available(first.data)
    return plan


def _check_pbt(plan: SweepPlan, first: RunConfig) -> None:
    """PBT copies a checkpoint into another trial and changes its values there: only keys safe to change mid-run,
    drawn from ranges PBT can perturb, and a checkpoint at every perturbation."""
    sweep, scheduler = plan.sweep, plan.sweep.scheduler
    for key, dist in plan.space.items():
        if key not in PBT_MUTABLE:
            raise ConfigError(f"scheduler pbt: space.{key} cannot change in the middle of a run (PBT changes a "
                              f"trial's values when it continues from another's checkpoint); PBT can mutate "
                              f"{', '.join(PBT_MUTABLE)}: sweep {key} with scheduler asha or fifo")
        if dist.kind == "grid":
            raise ConfigError(f"scheduler pbt: space.{key} is a grid, which PBT cannot perturb; use choice")
    if sweep.searcher.name != "random":
        raise ConfigError("scheduler pbt draws its own values; use searcher.name=random")
    every = first.checkpoint.every_epochs
    if scheduler.perturbation_interval % every:
        raise ConfigError(f"scheduler pbt: perturbation_interval ({scheduler.perturbation_interval}) must be a "
                          f"multiple of checkpoint.every_epochs ({every}), so an exploit has the epoch's weights")
    if scheduler.perturbation_interval >= plan.max_epochs:
        raise ConfigError(f"scheduler pbt: perturbation_interval ({scheduler.perturbation_interval}) must be shorter "
                          f"than train.epochs ({plan.max_epochs}) or no trial is ever perturbed")
    if sweep.num_samples < 2:
        raise ConfigError("scheduler pbt needs a population: num_samples of at least 2")


def to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def load_sweep(path: str, overrides: Sequence[str] = ()) -> SweepPlan:
    """Read a sweep file, apply ``key=value`` overrides (dotted keys into the sweep file), check it all."""
    sections = {f.name for f in dataclasses.fields(RunConfig)}
    for item in overrides:
        head = item.split("=", 1)[0].strip().split(".", 1)[0]
        if head in sections and head not in {f.name for f in dataclasses.fields(SweepConfig)}:
            raise ConfigError(f"{item}: overrides of the tune command are keys of the sweep file; a key of the run "
                              f"config goes under set (set.{item}) or, to sweep it, under space")
    data = apply_overrides(read_yaml(path), overrides)
    if isinstance(data.get("base"), str) and not _is_url(data["base"]) and not os.path.exists(data["base"]):
        beside = os.path.join(os.path.dirname(path), data["base"])    # a base path relative to the sweep file
        if os.path.exists(beside):
            data["base"] = beside
    return plan_sweep(build(SweepConfig, data))


__all__ = ["DISTRIBUTIONS", "METRICS", "PBT_MUTABLE", "Distribution", "SweepConfig", "SweepPlan", "load_sweep",
           "plan_sweep", "flatten_space", "get_dotted", "set_dotted"]
