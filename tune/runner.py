"""The sweep driver: start (or join) Ray, run the checked sweep with Tune, or resume an interrupted one.

Local Ray by default (``ray.num_cpus`` CPUs, no dashboard, quiet logs); ``ray.address`` or RAY_ADDRESS joins a
running cluster. Tune keeps its state in ``<sweep_dir>/<name>`` (any storage URL Ray accepts), next to the trials'
run directories; ``resume=true`` restores it with ``Tuner.restore``, so finished trials are not run again and
unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from engine.config import ConfigError
from tune.spec import SweepPlan
from tune.trainable import run_trial

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scheduler(plan: SweepPlan) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    cfg = plan.sweep.scheduler
    if cfg.name == "asha":
        # max_t one past the last epoch: a trial that reaches the end finishes by itself (final checkpoint and
        # summary.json written) instead of being stopped by the scheduler at its last report
        return ASHAScheduler(time_attr="training_iteration", max_t=plan.max_epochs + 1,
                             grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor)
    return FIFOScheduler()


def _searcher(plan: SweepPlan) -> Any:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    cfg = plan.sweep.searcher
    if cfg.name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        from ray.tune.search import ConcurrencyLimiter

        search = OptunaSearch(seed=cfg.seed)
        return ConcurrencyLimiter(search, plan.sweep.max_concurrent) if plan.sweep.max_concurrent else search
    # the variant generator limits concurrency itself: Tune wraps only Searchers for max_concurrent_trials
    return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=plan.sweep.max_concurrent or 0)


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


def run_sweep(plan: SweepPlan, verbose: int = 1) -> Any:
    """Run (or, with ``resume``, continue) the sweep; returns Tune's ResultGrid."""
    import ray
    from ray import tune

    started = start_ray(plan)
    try:
        sweep = plan.sweep
        storage, name = plan.experiment_dir.rsplit("/", 1)
        trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan),
                                        {"cpu": sweep.resources.cpus, "gpu": sweep.resources.gpus})
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
                                          scheduler=_scheduler(plan), search_alg=_searcher(plan),
                                          # one worker process runs trial after trial: torch and the engine are
                                          # imported once, not per trial (train() keeps no global state)
                                          reuse_actors=True)
            run_config = tune.RunConfig(name=name, storage_path=storage, verbose=verbose,
                                        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                        failure_config=tune.FailureConfig(max_failures=0))
            tuner = tune.Tuner(trainable, param_space={k: d.to_tune() for k, d in plan.space.items()},
                               tune_config=tune_config, run_config=run_config)
        return tuner.fit()
    finally:
        if started:
            ray.shutdown()
