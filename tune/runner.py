"""The sweep driver: start (or join) Ray, run the checked sweep with Tune, or resume an interrupted one.

Local Ray by default (``ray.num_cpus`` CPUs, no dashboard, quiet logs); ``ray.address`` or RAY_ADDRESS joins a
running cluster. Tune keeps its state in ``<sweep_dir>/<name>`` (any storage URL Ray accepts), next to the trials'
run directories; ``resume=true`` restores it with ``Tuner.restore``, so finished trials are not run again and
unfinished ones continue from their last checkpoint.

A trial of ``resources.workers_per_trial > 1`` workers is a Ray Train driver (tune/trainable.py): as Ray Train V2
has it, the trial itself holds no CPU and its TorchTrainer asks the cluster for the workers, so the number of trials
running at once is capped at what the cluster's CPUs (GPUs) hold, unless max_concurrent says fewer.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from engine.config import ConfigError
from tune.spec import Distribution, SweepPlan
from tune.trainable import run_trial

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scheduler(plan: SweepPlan) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    cfg = plan.sweep.scheduler
    if cfg.name == "pbt":
        return _pbt_class()(
            last_epoch=plan.max_epochs, time_attr="training_iteration", perturbation_interval=cfg.perturbation_interval,
            hyperparam_mutations={key: d.to_tune() for key, d in plan.space.items()},
            quantile_fraction=cfg.quantile_fraction, resample_probability=cfg.resample_probability,
            custom_explore_fn=InRange(plan.space), synch=cfg.synch, log_config=False)
    if cfg.name == "asha":
        # max_t one past the last epoch: a trial that reaches the end finishes by itself (final checkpoint and
        # summary.json written) instead of being stopped by the scheduler at its last report
        return ASHAScheduler(time_attr="training_iteration", max_t=plan.max_epochs + 1,
                             grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor)
    return FIFOScheduler()


def _pbt_class() -> type:
    """Tune's PBT that leaves a trial's last epoch alone (built lazily: Ray is imported only when a sweep runs)."""
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    class LastEpochKept(PopulationBasedTraining):
        """An exploit at the last epoch would restart a finished trial from another's final weights: it would train
        nothing, and end with the donor's results and no summary of its own; so the last report just continues."""

        def __init__(self, last_epoch: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.last_epoch = last_epoch

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
            if result.get("training_iteration", 0) >= self.last_epoch:
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    return LastEpochKept


class InRange:
    """PBT's explore step scales values by 0.8 or 1.2 without bounds: keep each inside its declared range."""

    def __init__(self, space: dict[str, Distribution]) -> None:
        self.bounds = {k: (d.args[0], d.args[1]) for k, d in space.items() if d.kind in ("uniform", "loguniform")}
        self.bounds.update({k: (d.args[0], d.args[1] - 1) for k, d in space.items() if d.kind == "randint"})

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for key, (low, high) in self.bounds.items():
            if key in config:
                config[key] = type(config[key])(min(max(config[key], low), high))
        return config


def _searcher(plan: SweepPlan, concurrent: int) -> Any:
    """The search algorithm, running at most ``concurrent`` trials at once (0: no limit)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    cfg = plan.sweep.searcher
    if cfg.name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        from ray.tune.search import ConcurrencyLimiter

        search = OptunaSearch(seed=cfg.seed)
        return ConcurrencyLimiter(search, concurrent) if concurrent else search
    # the variant generator limits concurrency itself: Tune wraps only Searchers for max_concurrent_trials
    return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrent)


def start_ray(plan: SweepPlan) -> bool:
    """Start a local Ray or join ``ray.address`` / RAY_ADDRESS; True when this call started it (and stops it)."""
    import ray

    if ray.is_initialized():
        return False
    # trials import this project: local workers inherit the path; on a cluster ship it with `ray job submit
    # --working-dir .`
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")    # trials keep the driver's working directory
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # sweep state saved often: a killed driver loses little
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    address = plan.sweep.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=plan.sweep.ray.num_cpus, num_gpus=plan.sweep.ray.num_gpus, **kwargs)
    return True


def _trial_resources(plan: SweepPlan) -> tuple[dict[str, float], int]:
    """(what one trial holds, how many trials may run at once: 0 for no limit beyond max_concurrent)."""
    import ray

    res = plan.sweep.resources
    if res.workers_per_trial == 1:
        return {"cpu": res.cpus, "gpu": res.gpus}, plan.sweep.max_concurrent or 0
    # the trial only drives its TorchTrainer, whose workers ask the cluster for their own resources
    cluster = ray.cluster_resources()
    fits = int(cluster.get("CPU", 0) // (res.cpus * res.workers_per_trial))
    if res.gpus > 0:
        fits = min(fits, int(cluster.get("GPU", 0) // (res.gpus * res.workers_per_trial)))
    if fits < 1:
        raise ConfigError(f"one trial needs {res.workers_per_trial} workers of {res.cpus} CPUs, {res.gpus} GPUs but "
                          f"the Ray cluster has {cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs; "
                          "lower resources.workers_per_trial or resources.cpus, or raise ray.num_cpus")
    # Tune refuses an empty request: the driver reserves a token 1 MiB of Ray's logical memory and no CPU
    return {"cpu": 0, "memory": 2**20}, min(fits, plan.sweep.max_concurrent or fits)


def run_sweep(plan: SweepPlan, verbose: int = 1) -> Any:
    """Run (or, with ``resume``, continue) the sweep; returns Tune's ResultGrid."""
    import ray
    from ray import tune

    started = start_ray(plan)
    try:
        sweep = plan.sweep
        storage, name = plan.experiment_dir.rsplit("/", 1)
        resources, concurrent = _trial_resources(plan)
        trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), resources)
        exists = tune.Tuner.can_restore(plan.experiment_dir)
        if sweep.resume:
            if not exists:
                raise ConfigError(f"resume=true but {plan.experiment_dir} holds no sweep to resume; drop resume "
                                  "or fix name / sweep_dir")
            tuner = tune.Tuner.restore(plan.experiment_dir, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            if exists:
                raise ConfigError(f"{plan.experiment_dir} already holds a sweep; add resume=true to continue it, "
                                  "or pick another name=")
            tune_config = tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                                          scheduler=_scheduler(plan), search_alg=_searcher(plan, concurrent),
                                          # one worker process runs trial after trial: torch and the engine are
                                          # imported once, not per trial (train() keeps no global state); a
                                          # multi-worker trial's process goes, and its TorchTrainer with it
                                          reuse_actors=sweep.resources.workers_per_trial == 1)
            run_config = tune.RunConfig(name=name, storage_path=storage, verbose=verbose,
                                        # a Tune checkpoint is a pointer of a few bytes; PBT may clone any
                                        # trial's recent one, so under PBT none is deleted
                                        checkpoint_config=tune.CheckpointConfig(
                                            num_to_keep=None if sweep.scheduler.name == "pbt" else 2),
                                        failure_config=tune.FailureConfig(max_failures=0))
            tuner = tune.Tuner(trainable, param_space={k: d.to_tune() for k, d in plan.space.items()},
                               tune_config=tune_config, run_config=run_config)
        return tuner.fit()
    finally:
        if started:
            ray.shutdown()
