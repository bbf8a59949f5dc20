"""The training loop: build everything from the config, then a short loop with fixed hook points.

forward, backward (gradients all-reduced by the backend), ``method.before_step`` (mask gradients), optimizer step,
``method.after_step``; per epoch: evaluate (test, and validation when ``data.val_fraction`` holds some out), the
method's decision pass if it asks for one, ``method.end_epoch``, log, the callbacks (they see the epoch's metrics and
may stop the run), checkpoint, then the callbacks' ``after_checkpoint`` with the file just written. A resumed run
restores the same objects from the checkpoint and continues on the same curve, also from a mid-epoch checkpoint
(``checkpoint.every_steps``, preemption). A non-finite loss stops the run (``engine.errors.Diverged``), SIGTERM saves
at the next step boundary and stops it (``engine.errors.Preempted``).

Nothing here is global and nothing outlives a run: ``train`` closes the trainer and the backend on success and
failure alike and restores the process-level flags it set, so a process (a Ray Tune worker, a notebook, a test) can
call it many times.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import re
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import fsspec
import numpy as np
import torch
from torch import nn

from common import jsonsafe
from common.urls import join_url
from engine.backends import Backend, DistEnv, build_backend, pick_device
from engine.build import build_model
from engine.checkpoint import Checkpointer, CheckpointError, all_finite, capture_rng, load_state, restore_rng
from engine.config import ConfigError, to_dict, write_yaml
from engine.data import Loaders, build_loaders
from engine.errors import Diverged, Preempted, RunStopped
from engine.flops import DenseCosts, dense_costs, flops_summary, forward_flops
from engine.losses import build_loss
from engine.monitor import Monitor, format_run_summary
from engine.optim import build_optimizer, build_schedule
from engine.preemption import PreemptionSignal
from engine.run_config import RunConfig
from engine.run_dirs import (RunDirError, adopt_run_dir, check_checkpoint_dir, check_resume_config,
                              claim_checkpoint_dir, claim_new_run_dir, resume_target)
from pruning.masks import LayerStat, parameter_counts
from pruning.methods import DecisionPass, MethodContext, build_method, method_class
from pruning.methods.base import Probe
from pruning.neurons import census, find_relu_layers, relu_probes

CHECKPOINT_FORMAT = "sparsetrain/1"
PREEMPTION_VOTE_S = 1.0   # ranks agree on a SIGTERM about this often (clusters allow 30 s or more before SIGKILL)
METRICS_FILE = "metrics.csv"    # one row per epoch, in the run directory
METRIC_COLUMNS = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "test_top5", "val_loss",
                  "val_acc", "val_top5", "density", "lr", "samples_per_s")
MASK_UPDATES_FILE = "mask_updates.csv"   # one row per change of the masks (and the start), in the run directory
MASK_UPDATE_COLUMNS = ("step", "epoch", "density", "regrown", "forward_flops")
TOP5_MIN_CLASSES = 100   # evaluation adds top-5 accuracy for data sets with this many classes or more



def _new_run_dir(cfg: RunConfig) -> str:
    """Claim <output_dir>/<name>, or <name>-2, -3... when that is taken: nothing is overwritten, and two runs
    started at once with one name get two directories (an exclusive-create marker, engine/run_dirs.py)."""
    return claim_new_run_dir(cfg.output_dir, cfg.name)


def _resume_target(cfg: RunConfig) -> tuple[str | None, str | None]:
    """(checkpoint URL, run directory) for cfg.resume, writing nothing; the run continues in the directory it came
    from, and a run directory of None means a new one is claimed.

    resume=auto with no checkpoint yet starts fresh in <output_dir>/<name>, so one command starts and restarts a
    preemptible job.
    """
    return resume_target(cfg.resume, cfg.output_dir, cfg.name, cfg.checkpoint.dir)


def _claim_dirs(cfg: RunConfig, run_dir: str | None, resume_url: str | None) -> tuple[str | None, str | None]:
    """On rank 0: (run directory, None) once the run directory and the checkpoint directory are this run's and a
    resumed checkpoint's config matches; (None, one-line reason) otherwise, for every rank to raise."""
    try:
        if resume_url is not None:
            state = load_state(resume_url, map_location="cpu", note=lambda line: None)   # _restore notes it
            check_resume_config(resume_url, state.get("config") or {}, to_dict(cfg))
        if cfg.checkpoint.dir:     # before claiming: a refused run leaves no directory behind
            check_checkpoint_dir(cfg.checkpoint.dir, run_dir, resume_url)
        if run_dir is None:
            run_dir = _new_run_dir(cfg)
        else:
            adopt_run_dir(run_dir)
        claim_checkpoint_dir(cfg.checkpoint.dir or join_url(run_dir, "checkpoints"), run_dir, resume_url)
    except (RunDirError, CheckpointError, OSError) as error:
        return None, str(error)
    return run_dir, None


def _keep_record(run_dir: str) -> None:
    """A finished run trained on (train.epochs extended): its summary.json and config.yaml move to
    history/<name>-e<epochs> first, so the finished run's record is never rewritten."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    summary = join_url(root, "summary.json")
    if not fs.exists(summary):
        return
    try:
        with fs.open(summary, "r") as handle:
            epochs = int(json.load(handle).get("epochs", 0))
    except (ValueError, TypeError, AttributeError):   # a damaged record is kept all the same
        epochs = 0
    fs.makedirs(join_url(root, "history"), exist_ok=True)
    tag, n = f"e{epochs:04d}", 1
    while fs.exists(join_url(root, f"history/summary-{tag}.json")):    # never over an older record
        n += 1
        tag = f"e{epochs:04d}-{n}"
    for name in ("summary.json", "config.yaml"):
        if fs.exists(join_url(root, name)):
            stem, ext = name.split(".")
            fs.mv(join_url(root, name), join_url(root, f"history/{stem}-{tag}.{ext}"))


def prunable_set(stats: Sequence[LayerStat]) -> dict[str, Any]:
    """The layers a method prunes and their weight count, as ``summary.json`` records them."""
    return {"layers": [s.name for s in stats], "weights": sum(s.numel for s in stats)}


def describe_prunable(stats: Sequence[LayerStat], shown: int = 6) -> str:
    """One start-up line: the prunable set's size, and its layers (the first few and a count when there are many)."""
    names = [f"{s.name} ({s.numel:,})" for s in stats]
    listed = ", ".join(names[:shown]) + (f", ... {len(names) - shown} more" if len(names) > shown else "")
    return f"prunable: {len(names)} layers, {sum(s.numel for s in stats):,} weights: {listed}"


def _note_run_dir(error: BaseException, run_dir: str | None) -> None:
    """Tell the launcher where the failed run lives (its traceback goes to <run dir>/logs/rank<N>.log)."""
    if run_dir and not hasattr(error, "run_dir"):
        try:
            error.run_dir = run_dir    # type: ignore[attr-defined]
        except AttributeError:
            pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Callback(Protocol):
    """Sees every epoch's metrics (train/*, val/*, test/* when evaluated, density, lr, epoch, step).

    Return True to stop the run after this epoch: it then ends as a finished run does (final checkpoint, summary).
    """

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> bool | None: ...

    # Optional: ``after_checkpoint(epoch, url)``, called every epoch after the checkpoint step, with the file written
    # that epoch (on the rank that writes it; None elsewhere and on epochs without one). A callback that points at the
    # epoch's checkpoint (the Ray Tune reporter) reports here, once the file exists.


class DeviceBatches:
    """A loader's batches as the model sees them in the loop: on the device, normalised there when the loader
    yields uint8 images (data.normalize_on_device), then channels_last if configured.

    Callable, so it serves as ``MethodContext.batches`` for methods that score data (SNIP, GraSP): it holds the
    loader, not the trainer, so no reference cycle runs through the trainer.
    """

    def __init__(self, loaders: Loaders, device: torch.device, channels_last: bool) -> None:
        self.loader = loaders.train
        self.normalize = loaders.device_normalize
        self.device = device
        self.channels_last = channels_last

    def inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.to(self.device, non_blocking=True)
        if self.normalize is not None:
            inputs = self.normalize(inputs)
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def __call__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return ((self.inputs(x), y.to(self.device, non_blocking=True)) for x, y in self.loader)


@contextlib.contextmanager
def restored_torch_flags() -> Iterator[None]:
    """Put back the cudnn and deterministic-algorithm flags a run sets, whatever way it ends."""
    benchmark = torch.backends.cudnn.benchmark
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = benchmark
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


class Trainer:
    """Owns the objects of one run; ``fit`` runs it and returns the summary; ``close`` releases what it opened."""

    def __init__(self, cfg: RunConfig, backend: Backend, callbacks: Sequence[Callback] = (), *,
                 preemption: PreemptionSignal | None = None) -> None:
        self.cfg = cfg
        self.backend = backend
        self.env = backend.env
        self.device = backend.device
        self.callbacks = tuple(callbacks)
        self.monitor: Monitor | None = None
        self.preemption = preemption or PreemptionSignal()   # train() installs it as the SIGTERM handler
        self._position: dict[str, Any] | None = None         # where a mid-epoch checkpoint left the epoch
        self._vote_every, self._steps_to_vote = 1, 1         # preemption votes: every rank counts the same steps
        self._vote_clock = time.perf_counter()
        deterministic = cfg.train.deterministic if cfg.train.deterministic is not None else self.device.type == "cpu"
        torch.backends.cudnn.benchmark = not deterministic
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.seed)
        try:
            self._build()
        except BaseException as error:
            self.close()
            _note_run_dir(error, getattr(self, "run_dir", None))
            raise

    def _build(self) -> None:
        cfg, backend = self.cfg, self.backend

        self.loaders = build_loaders(cfg.data, seed=cfg.seed, rank=self.env.rank, world_size=self.env.world_size,
                                     device=self.device)
        self.batches = DeviceBatches(self.loaders, self.device, cfg.train.channels_last)
        spec = self.loaders.spec
        model = build_model(cfg.model, spec, self.device)
        batches = len(self.loaders.train) // cfg.train.grad_accum_steps
        if batches < 1:
            raise ConfigError(f"the training set gives {len(self.loaders.train)} batches per rank, fewer than "
                             f"train.grad_accum_steps={cfg.train.grad_accum_steps}; lower data.batch_size")
        self.steps_per_epoch = min(batches, cfg.train.max_steps_per_epoch or batches)
        try:    # a schedule that does nothing in this run fails here, before the method is built or a step is taken
            notes = cfg.sparsity.check_length(self.steps_per_epoch, cfg.train.epochs)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.env.is_main:
            for note in notes:
                print(f"warning: {note}", file=sys.stderr)
        context = MethodContext(seed=cfg.seed, rank=self.env.rank, world_size=self.env.world_size,
                                device=self.device, steps_per_epoch=self.steps_per_epoch, epochs=cfg.train.epochs,
                                batches=self.batches,
                                input_shape=(spec.channels, spec.image_size, spec.image_size))
        kind = method_class(cfg.sparsity.method)
        model = kind.prepare_model(cfg.sparsity, model, context)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        optim_cfg = cfg.optim
        self.optimizer = kind.make_optimizer(cfg.sparsity, model, lambda m: build_optimizer(m, optim_cfg))
        self.schedule = build_schedule(self.optimizer, cfg.lr_schedule, base_lr=cfg.optim.lr,
                                       steps_per_epoch=self.steps_per_epoch, epochs=cfg.train.epochs)
        self.method = build_method(cfg.sparsity, self.model, self.optimizer, context)
        self.flop_costs = self._dense_costs(context.input_shape or ())
        self.flops_timeline: list[tuple[int, float]] = []   # (step, forward FLOPs per sample from that step on)
        self._build_neuron_monitor(cfg, model, context)
        self.criterion = build_loss(cfg.train.loss, cfg.train.label_smoothing)
        self.eval_criterion = build_loss(cfg.train.loss)     # test and validation losses: no label smoothing
        # claimed after the data, model and method checks, so a run refused for its input leaves no directory behind
        resume_url, run_dir = _resume_target(cfg) if cfg.resume else (None, None)
        claimed, refused = backend.broadcast_object(_claim_dirs(cfg, run_dir, resume_url) if self.env.is_main
                                                    else None)
        if refused:
            raise RunDirError(refused)
        self.run_dir: str = claimed
        self.monitor = Monitor(self.run_dir, enabled=self.env.is_main, tensorboard=cfg.monitor.tensorboard,
                               progress=cfg.monitor.progress)
        ckpt_dir = cfg.checkpoint.dir or join_url(self.run_dir, "checkpoints")
        self.checkpointer = Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep, keep_best=cfg.checkpoint.keep_best)
        if self.env.is_main:       # what a killed run's interrupted writes left behind
            for name in self.checkpointer.clean_temporary():
                self.monitor.print(f"removed {name} from {ckpt_dir}: left by an interrupted checkpoint write")
        self._reset_watch()
        self.epoch = 0
        self.step = 0
        self.best_acc = 0.0
        self.last_eval: dict[str, float] = {}
        self.last_val: dict[str, float] = {}
        self.model_metrics: dict[str, float] = {}
        self.stopped_early = False
        if resume_url is None:
            self.method.setup()     # before wrapping: at-init scorers see the plain model, DeepSpeed the pruned one
        self.module, self.optimizer = backend.prepare(model, self.optimizer, micro_batch_size=cfg.data.batch_size,
                                                      grad_accum_steps=cfg.train.grad_accum_steps,
                                                      clip_grad_norm=cfg.train.clip_grad_norm)
        if cfg.train.compile:       # the training forward only; evaluation and scoring run the plain model
            self.module = torch.compile(self.module)
        if resume_url is not None:
            self._restore(resume_url)
        backend.attach_masks(self.method.masks)
        self._start_records()
        if self.env.is_main:
            if resume_url is not None:
                _keep_record(self.run_dir)
            write_yaml(to_dict(cfg), join_url(self.run_dir, "config.yaml"))
            for name, text in backend.run_files().items():    # e.g. the DeepSpeed config the run used
                with fsspec.open(join_url(self.run_dir, name), "w") as handle:
                    handle.write(text)

    def _build_neuron_monitor(self, cfg: RunConfig, model: nn.Module, context: MethodContext) -> None:
        """monitor.dead_neurons: find the linears that feed a ReLU (one traced forward, before training)."""
        self.neuron_layers = []
        self.neuron_sums: dict[str, torch.Tensor] | None = None
        self.neuron_history: list[dict[str, Any]] = []
        if cfg.monitor.dead_neurons == "off":
            return
        self.neuron_layers = find_relu_layers(model, context.input_shape or (), self.device)
        if not self.neuron_layers:
            raise ValueError(f"monitor.dead_neurons={cfg.monitor.dead_neurons} but no Linear of model "
                             f"{cfg.model.name} feeds an nn.ReLU module; set monitor.dead_neurons=off or use a ReLU "
                             "model (vit_strip, or vit with activation relu)")

    # --------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train to the configured number of epochs (or until a callback stops the run); returns the summary."""
        started = time.perf_counter()
        cfg = self.cfg
        if self.method.masks is not None:   # no mask update on NaN: check first (held weakly: no reference cycle)
            check = weakref.WeakMethod(self._check_divergence)
            self.method.masks.before_update = lambda: (check() or (lambda: None))()
        self._log_sparsity()
        if self.epoch == 0:
            self.monitor.print(f"run directory: {self.run_dir}  (method {cfg.sparsity.method}, "
                               f"density {self._density():.4f}, world size {self.env.world_size})")
        self.monitor.print(describe_prunable(self.method.layer_stats()))   # what "density" counts differs by method
        accum, world = cfg.train.grad_accum_steps, self.env.world_size
        self.monitor.print(f"global batch {cfg.data.batch_size * world * accum} (data.batch_size "
                           f"{cfg.data.batch_size} per rank x {world} rank{'s' * (world > 1)} x {accum} accumulation "
                           f"step{'s' * (accum > 1)}), {self.steps_per_epoch} optimizer steps per epoch")
        while self.epoch < cfg.train.epochs:
            sampler = self.loaders.train_sampler
            if sampler is not None and hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            train = self._train_epoch()
            last = self.epoch + 1 == cfg.train.epochs
            self._evaluate_epoch(evaluate=(self.epoch + 1) % cfg.train.eval_every_epochs == 0 or last)
            self.method.end_epoch(self.epoch)
            self.epoch += 1
            metrics = self._log_epoch(train)
            wants_stop = any([bool(c.on_epoch_end(self.epoch - 1, metrics)) for c in self.callbacks])
            self.stopped_early = bool(self.backend.broadcast_object(wants_stop))   # rank 0 decides for every rank
            if self.stopped_early and not last:
                self.monitor.print(f"stopped by a callback after epoch {self.epoch}")
            finished = last or self.stopped_early
            saved = None
            if self.epoch % cfg.checkpoint.every_epochs == 0 or (finished and cfg.checkpoint.save_final):
                saved = self.save_checkpoint()
            for callback in self.callbacks:     # the epoch's file exists now: a callback may hand it on (Ray Tune)
                if hasattr(callback, "after_checkpoint"):
                    callback.after_checkpoint(self.epoch - 1, saved)
            if self.stopped_early:
                break
        return self._finish(time.perf_counter() - started)

    def _evaluate_epoch(self, evaluate: bool) -> None:
        """Test and validation metrics when due, and the decision passes (the method's; the dead-neuron monitor's on
        evaluation epochs), sharing passes where they can: a decision pass over a split evaluated this epoch rides
        on that evaluation, and requests that probe one module with the same function share one hook."""
        monitor = None
        if evaluate and self.neuron_layers:
            monitor = DecisionPass(split=self.cfg.monitor.dead_neurons, probes=relu_probes(self.neuron_layers),
                                   decide=self._keep_neuron_sums)
        spikes = self._model_pass() if evaluate else None
        requests = [r for r in (self.method.decision_pass(self.epoch), monitor, spikes) if r is not None]
        hooks, routes = self._plan_hooks(requests)
        sums: dict[str, torch.Tensor] = {}
        evaluated = []
        if evaluate:
            self.last_eval = self.evaluate(self.loaders.test, probes=hooks.get("test"), sums=sums)
            self.best_acc = max(self.best_acc, self.last_eval["acc"])
            evaluated.append("test")
            if self.loaders.val is not None:
                self.last_val = self.evaluate(self.loaders.val, probes=hooks.get("val"), sums=sums)
                evaluated.append("val")
        for split, split_hooks in hooks.items():
            if split not in evaluated:    # not evaluated this epoch: a pass of its own (the same on every rank)
                self.evaluate(self._split_loader(split), probes=split_hooks, sums=sums)
        if requests:
            totals = self._reduce_sums(hooks, sums)
            for request, route in zip(requests, routes):
                request.decide({name: totals[key] for name, key in route.items()})

    @staticmethod
    def _plan_hooks(requests: Sequence[DecisionPass]) -> tuple[dict[str, dict[str, tuple[str, Probe]]],
                                                               list[dict[str, str]]]:
        """Hooks by split, each keyed and holding (module name, probe), one per distinct (module, probe) pair; and
        for each request, the key whose sums answer each of its probes."""
        hooks: dict[str, dict[str, tuple[str, Probe]]] = {}
        routes = []
        for request in requests:
            split_hooks = hooks.setdefault(request.split, {})
            route = {}
            for name, probe in request.probes.items():
                key = next((k for k, (n, p) in split_hooks.items() if n == name and p is probe), None)
                if key is None:
                    key = f"{request.split}/{name}/{len(split_hooks)}"
                    split_hooks[key] = (name, probe)
                route[name] = key
            routes.append(route)
        return hooks, routes

    def _keep_neuron_sums(self, sums: dict[str, torch.Tensor]) -> None:
        self.neuron_sums = sums

    def _model_pass(self) -> DecisionPass | None:
        """The model's own statistics of the test pass, if it has any (a spiking net's firing rates): its
        ``evaluation_probes()`` summed over batches and ranks, turned into scalars by ``evaluation_metrics(sums)``,
        logged as test/<name> and written to summary.json."""
        probes = getattr(self.model, "evaluation_probes", None)
        if probes is None:
            return None
        return DecisionPass(split="test", probes=probes(),
                            decide=lambda sums: self.model_metrics.update(self.model.evaluation_metrics(sums)))

    def _split_loader(self, split: str) -> Any:
        loader = {"train": self.loaders.train, "val": self.loaders.val, "test": self.loaders.test}[split]
        if loader is None:
            raise ValueError(f"the method asks for a pass over the {split} split, which this run does not have; "
                             "set data.val_fraction > 0 to hold out a validation split")
        return loader

    def _reduce_sums(self, hooks: Mapping[str, Mapping[str, tuple[str, Probe]]],
                     sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum each hook's totals over ranks; a rank that saw no batch contributes zeros of the others' shape."""
        shapes: dict[str, tuple[int, ...]] = {}
        for seen in self.backend.all_gather_object({n: tuple(v.shape) for n, v in sums.items()}):
            shapes.update(seen)
        names = [key for split_hooks in hooks.values() for key in split_hooks]
        missing = [module for split_hooks in hooks.values() for key, (module, _) in split_hooks.items()
                   if key not in shapes]
        if missing:
            raise RuntimeError(f"the decision pass never ran the modules {missing[:3]}; probe modules that the "
                               "forward pass calls")
        flat = torch.cat([torch.zeros(0, dtype=torch.float64, device=self.device)]
                         + [sums.get(n, torch.zeros(shapes[n], dtype=torch.float64, device=self.device)).reshape(-1)
                            for n in names])
        self.backend.all_reduce(flat)
        out, start = {}, 0
        for name in names:
            size = int(np.prod(shapes[name]))
            out[name] = flat[start:start + size].reshape(shapes[name])
            start += size
        return out

    def _train_epoch(self) -> dict[str, float]:
        cfg, backend = self.cfg.train, self.backend
        self.module.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        micro, done, seen = 0, 0, 0
        position, self._position = self._position, None
        if position is not None:     # resumed from a mid-epoch checkpoint: this epoch's counts so far, per rank
            rank = self.env.rank
            micro, done, seen = int(position["batches"]), int(position["steps"]), int(position["seen"][rank])
            loss_sum += float(position["loss_sum"][rank])
            correct += int(position["correct"][rank])
        resumed_seen = seen
        started = time.perf_counter()
        desc = f"epoch {self.epoch + 1}/{self.cfg.train.epochs}"

        def where() -> dict[str, Any]:
            """This epoch's position and partial sums, every rank's, for a mid-epoch checkpoint (a collective)."""
            ranks = self.backend.all_gather_object((float(loss_sum), int(correct), seen))
            return {"epoch": self.epoch, "batches": micro, "steps": done, "loss_sum": [r[0] for r in ranks],
                    "correct": [r[1] for r in ranks], "seen": [r[2] for r in ranks]}

        with self.monitor.progress(total=self.steps_per_epoch, desc=desc) as bar:
            for inputs, targets in (self._epoch_batches(micro) if done < self.steps_per_epoch else ()):
                inputs = self.batches.inputs(inputs)
                targets = targets.to(self.device, non_blocking=True)
                boundary = (micro + 1) % cfg.grad_accum_steps == 0
                with backend.sync_context(boundary):
                    with backend.autocast():
                        outputs = self.module(inputs)
                        loss = self.criterion(outputs, targets)
                    backend.backward(loss / cfg.grad_accum_steps)
                with torch.no_grad():
                    loss_sum += loss.detach().double() * targets.numel()
                    correct += (outputs.argmax(1) == targets).sum()
                    self._watch_loss(loss.detach())
                seen += targets.numel()
                micro += 1
                if not boundary:
                    continue
                with self._blame_divergence():     # a scorer failing on NaN weights is reported as divergence
                    backend.step(self.optimizer, lambda: self.method.before_step(self.step), cfg.clip_grad_norm)
                    self.method.after_step(self.step)
                self._log_events(self.step + 1)      # per-update churn, thresholds, ... and changed masks
                self.schedule.step()
                self.step += 1
                done += 1
                bar.update()
                if self.step % self.cfg.monitor.log_every_steps == 0:
                    self.monitor.scalars({"train/step_loss": float(loss.detach()), "lr": self.schedule.lr}, self.step)
                    self._check_divergence()     # the host syncs here anyway
                self._step_boundary(where, last_in_epoch=done >= self.steps_per_epoch)
                if done >= self.steps_per_epoch:
                    break
        elapsed = time.perf_counter() - started
        self._check_divergence()
        totals = backend.all_reduce(torch.tensor([float(loss_sum), float(correct), float(seen),
                                                  float(seen - resumed_seen)], dtype=torch.float64,
                                                 device=self.device))
        samples = float(totals[2])
        return {"loss": float(totals[0]) / samples, "acc": float(totals[1]) / samples,
                "samples_per_s": float(totals[3]) / elapsed}

    def _preemption_vote(self, last_in_epoch: bool) -> bool:
        """Whether the run stops here for a SIGTERM. One rank alone may have been signalled, so the ranks vote
        (an all-reduce of the flag, with the seconds since the last vote): every ``_vote_every`` steps, a count set
        from the reduced time so that votes come about every PREEMPTION_VOTE_S seconds (the same on every rank), and
        at every epoch's last step. A blocking all-reduce every step would cost ~1 ms a step on gloo, a third of a
        small model's CPU step (benchmarks/preempt_check.py)."""
        if self.env.world_size == 1:
            return self.preemption.requested
        self._steps_to_vote -= 1
        if self._steps_to_vote > 0 and not last_in_epoch:
            return False                  # between votes no rank acts on its own flag: the others would hang
        now = time.perf_counter()
        vote = torch.tensor([float(self.preemption.requested), now - self._vote_clock], dtype=torch.float64,
                            device=self.device)
        flag, seconds = self.backend.all_reduce(vote).tolist()
        per_step = seconds / self.env.world_size / max(1, self._vote_every - max(0, self._steps_to_vote))
        self._vote_every = max(1, min(1000, int(PREEMPTION_VOTE_S / max(per_step, 1e-6))))
        self._steps_to_vote, self._vote_clock = self._vote_every, now
        return flag > 0

    def _epoch_batches(self, consumed: int) -> Iterable[Any]:
        """The epoch's training batches after the first ``consumed`` micro-batches (those a mid-epoch checkpoint
        already counted): the sampler skips their indices without loading them; a streamed source is read and the
        batches dropped, with the RNG state put back as the checkpoint left it."""
        if consumed == 0:
            return self.loaders.train
        sampler = self.loaders.train_sampler
        if hasattr(sampler, "skip_next"):
            sampler.skip_next(consumed * self.cfg.data.batch_size)
            return self.loaders.train
        rng = capture_rng()
        batches = iter(self.loaders.train)
        for _ in itertools.islice(batches, consumed):
            pass
        restore_rng(rng)
        return batches

    def _step_boundary(self, where: Callable[[], dict[str, Any]], last_in_epoch: bool = False) -> None:
        """After every optimizer step: the mid-epoch checkpoint when ``checkpoint.every_steps`` says so, and the
        preemption check: checkpoint, then stop."""
        stop = self._preemption_vote(last_in_epoch)
        every = self.cfg.checkpoint.every_steps
        epoch_end_saves = last_in_epoch and (self.epoch + 1) % self.cfg.checkpoint.every_epochs == 0
        if not stop and not (every and self.step % every == 0 and not epoch_end_saves):
            return
        saved = self.save_checkpoint(position=where())
        if not stop:
            return
        self.backend.barrier()     # rank 0 has written the file before any rank leaves
        url = saved or "written by rank 0"
        raise Preempted(f"preempted at epoch {self.epoch + 1}, step {self.step}: checkpoint {url}; continue with "
                        f"resume=auto (same output_dir and name) or resume={self.run_dir}")

    @torch.no_grad()
    def evaluate(self, loader: Any = None, probes: Mapping[str, tuple[str, Probe]] | None = None,
                 sums: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Loss and accuracy over ``loader`` (the test set by default), summed over ranks (each rank evaluates its
        own shard). ``probes`` (decision passes), key -> (module name, probe): forward hooks, existing only during
        this pass, that add each probe's vector of its module's output into ``sums[key]``."""
        model = self.model   # the unwrapped model: ranks may see different batch counts, DDP would hang
        was_training = model.training
        model.eval()
        handles = self._attach_probes(probes, sums if sums is not None else {}) if probes is not None else []
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        top5 = torch.zeros((), dtype=torch.int64, device=self.device)
        with_top5 = self.loaders.spec.num_classes >= TOP5_MIN_CLASSES   # known on every rank, even one with no batch
        seen = 0
        try:
            for inputs, targets in (loader or self.loaders.test):
                inputs = self.batches.inputs(inputs)
                targets = targets.to(self.device, non_blocking=True)
                with self.backend.autocast():
                    outputs = model(inputs)
                loss_sum += self.eval_criterion(outputs.float(), targets).double() * targets.numel()
                correct += (outputs.argmax(1) == targets).sum()
                if with_top5:
                    top5 += (outputs.topk(5, dim=1).indices == targets[:, None]).any(dim=1).sum()
                seen += targets.numel()
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        totals = self.backend.all_reduce(torch.stack([loss_sum, correct.double(),
                                                      torch.tensor(float(seen), dtype=torch.float64,
                                                                   device=self.device), top5.double()]))
        result = {"loss": float(totals[0]) / max(1.0, float(totals[2])),
                  "acc": float(totals[1]) / max(1.0, float(totals[2]))}
        if with_top5:
            result["top5"] = float(totals[3]) / max(1.0, float(totals[2]))
        return result

    def _attach_probes(self, probes: Mapping[str, tuple[str, Probe]], sums: dict[str, torch.Tensor]) -> list[Any]:
        """Forward hooks adding each probe's vector of a module's output into ``sums[key]`` (float64)."""

        def hook_for(key: str, probe: Any) -> Any:
            def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
                value = probe(output.detach()).to(torch.float64)
                sums[key] = value if key not in sums else sums[key] + value
            return hook

        return [self.model.get_submodule(name).register_forward_hook(hook_for(key, probe))
                for key, (name, probe) in probes.items()]

    # ------------------------------------------------------------ logging
    def _density(self, stats: list[LayerStat] | None = None) -> float:
        """Kept fraction of the prunable weights (pass stats already computed to avoid counting twice)."""
        stats = self.method.layer_stats() if stats is None else stats
        return sum(s.kept for s in stats) / max(1, sum(s.numel for s in stats))

    def _log_sparsity(self) -> None:
        """Densities and targets at this step (unless a mask change already logged them here), and the method's
        metrics other than those it reports as events (churn: logged at its own step only)."""
        values: dict[str, float] = {}
        if self.density_step != self.step:
            stats = self.method.layer_stats()
            values["sparsity/density"] = self._density(stats)
            for stat in stats:
                values[f"sparsity/layer/{stat.name}"] = stat.density
        for name, target in (self.method.layer_targets() or {}).items():
            values[f"sparsity/target/{name}"] = target
        values.update({f"method/{k}": v for k, v in self.method.metrics().items() if k not in self.event_keys})
        self.monitor.scalars(values, self.step)

    # ------------------------------------------------------------ records: mask changes, CSV tables, hparams, FLOPs
    def _dense_costs(self, input_shape: Sequence[int]) -> DenseCosts | None:
        """Dense multiply-adds of the plain model (on the meta device); None, with a note, for a model that cannot
        run there."""
        try:
            return dense_costs(self.model, input_shape)
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as error:
            if self.env.is_main:
                print(f"note: FLOPs not counted ({type(error).__name__}: {str(error).splitlines()[0][:200]})",
                      file=sys.stderr)
            return None

    def _mask_tensors(self) -> tuple[torch.Tensor, ...]:
        """The current mask tensors: ``MaskSet.update`` swaps in new tensors, so a change shows as a new object."""
        return tuple(mask for _, mask in self.method.masks.items()) if self.method.masks is not None else ()

    def _start_records(self) -> None:
        """Before the first step of this process: TensorBoard's hparams row and density-vs-target charts, and the
        point (epoch, step) up to which rows of a run this one resumes stay in the CSV tables."""
        self.records_since = (self.epoch, self.step)
        self.event_keys: set[str] = set()
        self.density_step = -1
        self.mask_rows: list[dict[str, Any]] = []
        self.seen_masks = self._mask_tensors()
        self.eval_in_csv: dict[str, float] | None = None
        cfg = self.cfg
        hparams: dict[str, Any] = {"method": cfg.sparsity.method, "model": cfg.model.name, "data": cfg.data.name,
                                   "seed": cfg.seed, "epochs": cfg.train.epochs, "optimizer": cfg.optim.name,
                                   "lr": cfg.optim.lr, "batch_size": cfg.data.batch_size,
                                   "world_size": self.env.world_size}
        hparams.update(_flatten(to_dict(cfg.sparsity), "sparsity"))
        self.monitor.hparams_start(hparams)
        targets = self.method.layer_targets() or {}
        charts = {name: ("Multiline", [f"^sparsity/layer/{re.escape(name)}$"]
                         + ([f"^sparsity/target/{re.escape(name)}$"] if name in targets else []))
                  for name in (self.method.masks or {})}
        if charts:
            self.monitor.custom_scalars({"density per layer (actual, target)": charts})
        if self.method.masks is not None and self.flop_costs is not None:
            self.flops_timeline.append((self.step, forward_flops(self.flop_costs, self._layer_densities())))
        if self.method.masks is not None and self.step == 0:
            self.mask_rows.append({"step": 0, "epoch": 0, "density": self._density(),
                                   "forward_flops": self.flops_timeline[-1][1] if self.flops_timeline else None})

    def _layer_densities(self) -> dict[str, float]:
        return {stat.name: stat.density for stat in self.method.layer_stats()}

    def _log_events(self, t: int) -> None:
        """The method's events at their own steps, then the masks at ``t`` steps done if they changed."""
        for at, values in self.method.drain_events():
            self.event_keys.update(values)
            self.monitor.scalars({f"method/{k}": v for k, v in values.items()}, at)
        self._note_masks(t)

    def _note_masks(self, t: int) -> None:
        """When the masks changed since last seen: density per layer at step ``t``, the fraction of active weights
        that were just grown (per layer and in total, when any was), a row of mask_updates.csv, and the forward
        FLOPs from ``t`` on."""
        current, old = self._mask_tensors(), self.seen_masks
        if len(current) == len(old) and all(a is b for a, b in zip(current, old)):
            return
        self.seen_masks = current
        names = list(self.method.masks)
        with torch.no_grad():
            counts = torch.stack([torch.stack([new.count_nonzero(), (new & ~prev).count_nonzero()])
                                  for new, prev in zip(current, old)]).tolist() if len(old) == len(current) \
                else [[int(new.count_nonzero()), 0] for new in current]
        sizes = [mask.numel() for mask in current]
        kept = sum(c[0] for c in counts)
        grown = sum(c[1] for c in counts)
        densities = {name: c[0] / size for name, c, size in zip(names, counts, sizes)}
        density = kept / max(1, sum(sizes))
        values = {"sparsity/density": density, **{f"sparsity/layer/{n}": d for n, d in densities.items()}}
        regrown = grown / max(1, kept)
        if grown:
            values["churn/regrown"] = regrown
            values.update({f"churn/regrown/{n}": c[1] / max(1, c[0]) for n, c in zip(names, counts)})
        self.monitor.scalars(values, t)
        self.density_step = t
        flops = forward_flops(self.flop_costs, densities) if self.flop_costs is not None else None
        if flops is not None:
            self.flops_timeline.append((t, flops))
        self.mask_rows.append({"step": t, "epoch": self.epoch, "density": density, "regrown": regrown,
                               "forward_flops": flops})

    def _mean_forward_flops(self) -> float | None:
        """Forward FLOPs per sample averaged over the run's steps (each timeline entry holds until the next)."""
        timeline = [(step, flops) for step, flops in self.flops_timeline if step <= self.step]
        if not timeline or self.step <= 0:
            return None
        total = sum(flops * (end - start) for (start, flops), (end, _) in zip(timeline, [*timeline[1:],
                                                                                         (self.step, 0.0)]))
        return total / self.step

    def _write_tables(self, train: dict[str, float]) -> None:
        """This epoch's row of metrics.csv and the mask changes since the last epoch's end; flush TensorBoard."""
        row: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "train_loss": train["loss"],
                               "train_acc": train["acc"], "density": self._density(), "lr": self.schedule.lr,
                               "samples_per_s": train["samples_per_s"]}
        if self.last_eval and self.last_eval is not self.eval_in_csv:    # evaluated this epoch
            self.eval_in_csv = self.last_eval
            row.update({f"test_{k}": v for k, v in self.last_eval.items()})
            row.update({f"val_{k}": v for k, v in self.last_val.items()})
        self.monitor.table_rows(METRICS_FILE, [row], columns=METRIC_COLUMNS, key="epoch",
                                since=self.records_since[0])
        self.monitor.table_rows(MASK_UPDATES_FILE, self.mask_rows, columns=MASK_UPDATE_COLUMNS, key="step",
                                since=self.records_since[1])
        self.mask_rows = []
        self.monitor.flush()     # the epoch's events reach the run directory now, not FLUSH_SECS later

    def _log_epoch(self, train: dict[str, float]) -> dict[str, float]:
        """Log the epoch to TensorBoard and the console; returns the metrics the callbacks see."""
        values = {"train/loss": train["loss"], "train/acc": train["acc"],
                  "throughput/samples_per_s": train["samples_per_s"], "epoch": float(self.epoch)}
        if self.last_eval:
            values.update({f"test/{k}": v for k, v in self.last_eval.items()})
        if self.last_val:
            values.update({f"val/{k}": v for k, v in self.last_val.items()})
        values.update({f"test/{k}": v for k, v in self.model_metrics.items()})
        self.monitor.scalars(values, self.step)    # lr: with the step scalars, once per logged step
        self._log_events(self.step)                # masks changed by the method's end_epoch
        self._log_sparsity()
        self._log_neurons()
        self._write_tables(train)
        values["lr"] = self.schedule.lr
        test = f"test acc {100 * self.last_eval['acc']:.2f}%" if self.last_eval else "no eval"
        val = f", val acc {100 * self.last_val['acc']:.2f}%" if self.last_val else ""
        self.monitor.print(f"epoch {self.epoch}/{self.cfg.train.epochs}: train loss {train['loss']:.4f} "
                           f"acc {100 * train['acc']:.2f}%, {test}{val}, {train['samples_per_s']:.0f} samples/s")
        return {**values, "density": self._density(), "step": float(self.step)}

    def _log_neurons(self) -> None:
        """The dead-neuron census of this epoch's pass (after the method's end_epoch: active weights count what
        stripping left), to TensorBoard under neurons/ and to the history kept for summary.json."""
        if self.neuron_sums is None:
            return
        found = census(self.neuron_layers, self.neuron_sums, self.model, self.method.masks)
        self.neuron_sums = None
        figures = found.figures()
        self.monitor.scalars({f"neurons/{k}": v for k, v in figures.items()}, self.step)
        record: dict[str, Any] = {"epoch": self.epoch, "step": self.step,
                                  **{k: int(v) for k, v in figures.items() if not k.startswith("dead/")},
                                  "dead": {k[5:]: int(v) for k, v in figures.items() if k.startswith("dead/")}}
        if self.method.metrics():
            record["method"] = self.method.metrics()
        self.neuron_history.append(record)

    # --------------------------------------------------------- checkpoints
    def state_dict(self, position: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything a resumed run needs; ``position`` marks a mid-epoch checkpoint (see ``_train_epoch``)."""
        return {"format": CHECKPOINT_FORMAT, "position": position, "model": self.backend.model_state_dict(),
                "optimizer": self.backend.optimizer_state_dict(self.optimizer),
                "lr_schedule": self.schedule.state_dict(),
                "masks": self.method.masks.state_dict() if self.method.masks is not None else None,
                "method": self.method.state_dict(), "backend": self.backend.state_dict(),
                "rng": self.backend.all_gather_object(capture_rng()), "epoch": self.epoch, "step": self.step,
                "best_test_acc": self.best_acc, "world_size": self.env.world_size, "config": to_dict(self.cfg),
                "neurons": self.neuron_history, "flops_timeline": [list(entry) for entry in self.flops_timeline]}

    def save_checkpoint(self, position: dict[str, Any] | None = None) -> str | None:
        """Write a checkpoint (rank 0), never a non-finite one: a NaN loss since the last check, or a NaN anywhere in
        the state, stops the run with Diverged instead, so the last good checkpoint stays the newest."""
        state = self.state_dict(position)  # every rank joins the RNG gather; rank 0 writes
        self._check_divergence(state)
        if not self.env.is_main:
            return None
        return self.checkpointer.save(state, epoch=self.epoch, step=self.step, metric=self._checkpoint_metric(position),
                                      finite=True)   # the check above scanned this very state

    def _checkpoint_metric(self, position: dict[str, Any] | None) -> float | None:
        """What ``checkpoint.keep_best`` ranks this checkpoint by: the validation accuracy (test accuracy without a
        validation split) of an evaluation of exactly these weights, i.e. at the end of an evaluated epoch; None for
        mid-epoch checkpoints and epochs without evaluation, which then never count as best."""
        train = self.cfg.train
        evaluated = self.epoch % train.eval_every_epochs == 0 or self.epoch == train.epochs
        if position is not None or not evaluated:
            return None
        result = self.last_val or self.last_eval
        return float(result["acc"]) if result else None

    # --------------------------------------------------------- divergence
    def _reset_watch(self) -> None:
        """Device-side record of the first non-finite training loss: step (-1: none yet), loss, lr."""
        self._bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._bad_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self._bad_lr = torch.zeros((), dtype=torch.float64, device=self.device)

    def _watch_loss(self, loss: torch.Tensor) -> None:
        """Note a non-finite loss without a host sync (a few scalar kernels per micro-batch on the device); the
        host looks at the record only where it syncs anyway (``_check_divergence``)."""
        fresh = torch.isfinite(loss).logical_not_().logical_and_(self._bad_step < 0)
        self._bad_step = torch.where(fresh, self.step + 1, self._bad_step)
        self._bad_loss = torch.where(fresh, loss.double(), self._bad_loss)
        self._bad_lr = torch.where(fresh, self.schedule.lr, self._bad_lr)

    def _check_divergence(self, state: dict[str, Any] | None = None) -> None:
        """Stop the run with Diverged when any rank saw a non-finite loss, or (``state`` given: before a checkpoint)
        holds a non-finite value in the state it would save. One small all-reduce, so every rank stops together.

        Called at log steps, at the end of each epoch, before each checkpoint and before each checked mask update
        (``MaskSet.before_update``): the points where the host waits for the device anyway."""
        local = [float(int(self._bad_step) >= 0), float(state is not None and not all_finite(state))]
        flags = self.backend.all_reduce(torch.tensor(local, dtype=torch.float64, device=self.device))
        if float(flags.sum()) == 0.0:
            return
        records = self.backend.all_gather_object((int(self._bad_step), float(self._bad_loss), float(self._bad_lr)))
        self._stop_diverged([r for r in records if r[0] >= 0])

    @contextlib.contextmanager
    def _blame_divergence(self) -> Iterator[None]:
        """An error in the optimizer step or the method's update (a scorer refusing NaN scores, a budget missed) is
        reported as the divergence that caused it when this rank's loss or weights are no longer finite. Local only:
        after an exception the ranks may no longer meet in a collective."""
        try:
            yield
        except RunStopped:
            raise
        except Exception as error:
            weights_bad = not all(bool(torch.isfinite(p.detach()).all()) for p in self.model.parameters()
                                  if p.is_floating_point())
            if int(self._bad_step) < 0 and not weights_bad:
                raise
            record = (int(self._bad_step), float(self._bad_loss), float(self._bad_lr))
            try:
                self._stop_diverged([record] if record[0] >= 0 else [])
            except Diverged as stop:
                raise stop from error

    def _stop_diverged(self, records: list[tuple[int, float, float]]) -> None:
        """Re-zero the pruned weights (a NaN clipping factor reaches them) and raise Diverged with one line: the
        first bad step, its loss and lr (or, with every loss finite, where the weights went bad), the checkpoints
        kept, and what to change."""
        if self.method.masks is not None:
            self.method.masks.apply_()
        if records:
            step, loss, lr = min(records)
            epoch = (step - 1) // max(1, self.steps_per_epoch) + 1
            what = f"loss {loss} at step {step} (epoch {epoch}), lr {lr:g}"
        else:
            what = (f"the weights or optimizer state became non-finite by step {self.step} (epoch {self.epoch + 1}) "
                    f"while the loss stayed finite, lr {self.schedule.lr:g}")
        kept = [url.rsplit("/", 1)[-1] for url in self.checkpointer.checkpoints()]
        where = (f"kept checkpoints: {', '.join(kept)} (all finite; resume from the newest)" if kept
                 else "no checkpoint written yet")
        raise Diverged(f"diverged: {what}; {where}; lower optim.lr, or set train.clip_grad_norm or a warm-up "
                       "(lr_schedule.warmup_epochs)")

    def _restore(self, url: str) -> None:
        state = load_state(url, map_location=self.device, note=self.monitor.print)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{url} is not a sparsetrain checkpoint (format {state.get('format')!r})")
        self.backend.load_model_state_dict(state["model"])
        self.backend.load_optimizer_state_dict(self.optimizer, state["optimizer"])
        self.schedule.load_state_dict(state["lr_schedule"])
        if self.method.masks is not None:   # masks first: a method's own state may be checked against them
            self.method.masks.load_state_dict(state["masks"])
            self.method.masks.verify()
        self.method.load_state_dict(state["method"])
        self.backend.load_state_dict(state["backend"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._position = state.get("position")    # mid-epoch: _train_epoch carries on from there
        if self._position is not None and len(self._position["seen"]) != self.env.world_size:
            raise ValueError(f"{url} was saved mid-epoch by {len(self._position['seen'])} ranks; resume it with the "
                             f"same number of ranks (this run has {self.env.world_size}), or from an epoch-end "
                             "checkpoint")
        self.best_acc = float(state["best_test_acc"])
        self.neuron_history = list(state.get("neurons") or [])
        self.flops_timeline = [(int(step), float(flops)) for step, flops in state.get("flops_timeline") or []]
        rng = state["rng"]
        if len(rng) == self.env.world_size:
            restore_rng(rng[self.env.rank])
        self.monitor.print(f"resumed from {url} at epoch {self.epoch}, step {self.step}")

    # -------------------------------------------------------------- summary
    def _finish(self, wall_time: float) -> dict[str, Any]:
        total, nonzero = parameter_counts(self.model)
        stats = self.method.layer_stats()
        if not self.last_eval:
            self.last_eval = self.evaluate()
            self.best_acc = max(self.best_acc, self.last_eval["acc"])
        summary = {"test_acc": self.last_eval["acc"], "best_test_acc": self.best_acc,
                   "test_loss": self.last_eval["loss"], "density": self._density(stats), "params_total": total,
                   "params_nonzero": nonzero, "epochs": self.epoch, "steps": self.step,
                   "world_size": self.env.world_size, "wall_time_s": wall_time, "method": self.cfg.sparsity.method,
                   "model": self.cfg.model.name, "data": self.cfg.data.name, "run_dir": self.run_dir,
                   "stopped_early": self.stopped_early, "prunable": prunable_set(stats),
                   "layers": {s.name: {"numel": s.numel, "kept": s.kept, "nonzero": s.nonzero} for s in stats}}
        if self.last_val:
            summary.update({"val_acc": self.last_val["acc"], "val_loss": self.last_val["loss"]})
        summary.update(self.model_metrics)
        if self.method.metrics():
            summary["method_metrics"] = self.method.metrics()
        if self.neuron_layers:
            summary["neurons"] = {"split": self.cfg.monitor.dead_neurons,
                                  "layers": {layer.linear: layer.features for layer in self.neuron_layers},
                                  "history": self.neuron_history}
        self._summary_records(summary, stats)
        if self.env.is_main:
            with fsspec.open(join_url(self.run_dir, "summary.json"), "w") as handle:
                jsonsafe.dump(summary, handle, indent=2)     # a NaN metric is null: the file stays valid JSON
            self.monitor.print(format_run_summary(summary, self.run_dir, self.monitor.tensorboard_dir))
        return summary

    def _summary_records(self, summary: dict[str, Any], stats: list[LayerStat]) -> None:
        """Add to the summary what the report plots: each layer's target density and ever-active fraction (where
        the method has them), top-5 accuracies, and the FLOPs relative to dense; close TensorBoard's hparams row."""
        targets = self.method.layer_targets() or {}
        ever_active = getattr(self.method, "ever_active_fraction", None)
        ever = ever_active() if callable(ever_active) else {}
        for name, layer in summary["layers"].items():
            if name in targets:
                layer["target"] = float(targets[name])
            if name in ever:
                layer["ever_active"] = ever[name]
        for split, result in (("test", self.last_eval), ("val", self.last_val)):
            if "top5" in result:
                summary[f"{split}_top5"] = result["top5"]
        if self.flop_costs is not None:
            densities = {s.name: s.density for s in stats}
            summary["flops"] = flops_summary(self.flop_costs, densities, self._mean_forward_flops())
        final = {"test_acc": summary["test_acc"], "best_test_acc": summary["best_test_acc"],
                 "density": summary["density"], "wall_time_s": summary["wall_time_s"]}
        if "flops" in summary:
            final.update({"inference_flops": summary["flops"]["inference_relative"],
                          "training_flops": summary["flops"]["training_relative"]})
        self.monitor.hparams_end(final, self.step)

    def close(self) -> None:
        """Release what the run opened (the TensorBoard writer); safe to call twice and after a failed start."""
        if self.monitor is not None:
            self.monitor.close()


def _flatten(tree: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Nested config sections as dotted keys (``sparsity.targets.exclude_roles``), for TensorBoard's hparams."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}.{key}"))
        else:
            out[f"{prefix}.{key}"] = value
    return out


def train(cfg: RunConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run one training job in this process (one rank of it under torchrun); returns the summary.

    The trainer and the backend are closed, and the torch flags the run set restored, on every path: success, an
    exception, or a callback's stop. A process group that the caller created survives the run.
    """
    with restored_torch_flags(), PreemptionSignal().installed() as preemption:
        env = DistEnv.from_environ()
        device = pick_device(cfg.train.device, env)
        backend = build_backend(cfg.parallel, env, device, cfg.train.precision)
        try:
            trainer = Trainer(cfg, backend, callbacks, preemption=preemption)
            try:
                summary = trainer.fit()
            except BaseException as error:
                _note_run_dir(error, trainer.run_dir)
                raise
            finally:
                trainer.close()
                del trainer     # the wrapped model must die before the backend tears its process group down
            backend.barrier()   # rank 0 may still be writing: a rank that tears the group down early can abort gloo
            return summary
        except Exception as error:
            lost = backend.explain_failure(error)     # a failed collective: name the rank that stopped answering
            if lost is None:
                raise
            _note_run_dir(lost, getattr(error, "run_dir", None))
            raise lost from error
        finally:
            backend.shutdown()
