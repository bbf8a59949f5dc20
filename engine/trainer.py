"""The training loop: build everything from the config, then a short loop with fixed hook points.

forward, backward (gradients all-reduced by the backend), ``method.before_step`` (mask gradients), optimizer step,
``method.after_step``; per epoch: evaluate (test, and validation when ``data.val_fraction`` holds some out), the
method's decision pass if it asks for one, ``method.end_epoch``, log, checkpoint, then the callbacks, which see the
epoch's metrics and may stop the run. A resumed run restores the same objects from the checkpoint and continues on
the same curve.

Nothing here is global and nothing outlives a run: ``train`` closes the trainer and the backend on success and
failure alike and restores the process-level flags it set, so a process (a Ray Tune worker, a notebook, a test) can
call it many times.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import fsspec
import numpy as np
import torch
from torch import nn

from engine.backends import Backend, DistEnv, build_backend, pick_device
from engine.build import build_model
from engine.checkpoint import Checkpointer, capture_rng, load_state, resolve_resume, restore_rng
from engine.config import to_dict, write_yaml
from engine.data import Loaders, build_loaders
from engine.losses import build_loss
from engine.monitor import Monitor, format_run_summary
from engine.optim import build_optimizer, build_schedule
from engine.run_config import RunConfig
from pruning.masks import LayerStat, parameter_counts
from pruning.methods import DecisionPass, MethodContext, build_method, method_class
from pruning.methods.base import Probe
from pruning.neurons import census, find_relu_layers, relu_probes

CHECKPOINT_FORMAT = "sparsetrain/1"


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _new_run_dir(cfg: RunConfig) -> str:
    """<output_dir>/<name>, or <name>-2, -3... when that already holds a run: nothing is overwritten."""
    fs, root = fsspec.core.url_to_fs(cfg.output_dir)
    candidate, n = cfg.name, 1
    while fs.exists(_join(root, candidate) + "/config.yaml"):
        n += 1
        candidate = f"{cfg.name}-{n}"
    return _join(cfg.output_dir, candidate)


def _resume_target(cfg: RunConfig) -> tuple[str | None, str]:
    """(checkpoint URL, run directory) for cfg.resume; the run continues in the directory it came from.

    resume=auto with no checkpoint yet starts fresh in <output_dir>/<name>, so one command starts and restarts a
    preemptible job.
    """
    default_run = _join(cfg.output_dir, cfg.name)
    url = resolve_resume(cfg.resume, _join(default_run, "checkpoints"))
    if url is None:
        return None, default_run
    parent = url.rstrip("/").rsplit("/", 1)[0]
    run_dir = parent.rsplit("/", 1)[0] if parent.endswith("/checkpoints") else _new_run_dir(cfg)
    return url, run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Callback(Protocol):
    """Sees every epoch's metrics (train/*, val/*, test/* when evaluated, density, lr, epoch, step).

    Return True to stop the run after this epoch: it then ends as a finished run does (final checkpoint, summary).
    """

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> bool | None: ...


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

    def __init__(self, cfg: RunConfig, backend: Backend, callbacks: Sequence[Callback] = ()) -> None:
        self.cfg = cfg
        self.backend = backend
        self.env = backend.env
        self.device = backend.device
        self.callbacks = tuple(callbacks)
        self.monitor: Monitor | None = None
        deterministic = cfg.train.deterministic if cfg.train.deterministic is not None else self.device.type == "cpu"
        torch.backends.cudnn.benchmark = not deterministic
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.seed)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        cfg, backend = self.cfg, self.backend

        resume_url, run_dir = _resume_target(cfg) if cfg.resume else (None, None)
        self.run_dir: str = backend.broadcast_object(run_dir or (_new_run_dir(cfg) if self.env.is_main else None))

        self.loaders = build_loaders(cfg.data, seed=cfg.seed, rank=self.env.rank, world_size=self.env.world_size,
                                     device=self.device)
        self.batches = DeviceBatches(self.loaders, self.device, cfg.train.channels_last)
        spec = self.loaders.spec
        model = build_model(cfg.model, spec, self.device)
        batches = len(self.loaders.train) // cfg.train.grad_accum_steps
        if batches < 1:
            raise ValueError(f"the training set gives {len(self.loaders.train)} batches per rank, fewer than "
                             f"train.grad_accum_steps={cfg.train.grad_accum_steps}; lower data.batch_size")
        self.steps_per_epoch = min(batches, cfg.train.max_steps_per_epoch or batches)
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
        self._build_neuron_monitor(cfg, model, context)
        self.criterion = build_loss(cfg.train.loss, cfg.train.label_smoothing)
        self.eval_criterion = build_loss(cfg.train.loss)     # test and validation losses: no label smoothing
        self.monitor = Monitor(self.run_dir, enabled=self.env.is_main, tensorboard=cfg.monitor.tensorboard,
                               progress=cfg.monitor.progress)
        ckpt_dir = cfg.checkpoint.dir or _join(self.run_dir, "checkpoints")
        self.checkpointer = Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep)
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
        if self.env.is_main:
            write_yaml(to_dict(cfg), _join(self.run_dir, "config.yaml"))

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
        self._log_sparsity()
        if self.epoch == 0:
            self.monitor.print(f"run directory: {self.run_dir}  (method {cfg.sparsity.method}, "
                               f"density {self._density():.4f}, world size {self.env.world_size})")
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
            if self.epoch % cfg.checkpoint.every_epochs == 0 or (finished and cfg.checkpoint.save_final):
                self.save_checkpoint()
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
        started = time.perf_counter()
        desc = f"epoch {self.epoch + 1}/{self.cfg.train.epochs}"
        with self.monitor.progress(total=self.steps_per_epoch, desc=desc) as bar:
            for inputs, targets in self.loaders.train:
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
                seen += targets.numel()
                micro += 1
                if not boundary:
                    continue
                backend.step(self.optimizer, lambda: self.method.before_step(self.step), cfg.clip_grad_norm)
                self.method.after_step(self.step)
                for t, values in self.method.drain_events():      # per-update churn, thresholds, ...
                    self.monitor.scalars({f"method/{k}": v for k, v in values.items()}, t)
                self.schedule.step()
                self.step += 1
                done += 1
                bar.update()
                if self.step % self.cfg.monitor.log_every_steps == 0:
                    self.monitor.scalars({"train/step_loss": float(loss.detach()), "lr": self.schedule.lr}, self.step)
                if done >= self.steps_per_epoch:
                    break
        elapsed = time.perf_counter() - started
        totals = backend.all_reduce(torch.stack([loss_sum, correct.double(),
                                                 torch.tensor(float(seen), dtype=torch.float64, device=self.device)]))
        samples = float(totals[2])
        return {"loss": float(totals[0]) / samples, "acc": float(totals[1]) / samples,
                "samples_per_s": samples / elapsed}

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
        seen = 0
        try:
            for inputs, targets in (loader or self.loaders.test):
                inputs = self.batches.inputs(inputs)
                targets = targets.to(self.device, non_blocking=True)
                with self.backend.autocast():
                    outputs = model(inputs)
                loss_sum += self.eval_criterion(outputs.float(), targets).double() * targets.numel()
                correct += (outputs.argmax(1) == targets).sum()
                seen += targets.numel()
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        totals = self.backend.all_reduce(torch.stack([loss_sum, correct.double(),
                                                      torch.tensor(float(seen), dtype=torch.float64,
                                                                   device=self.device)]))
        return {"loss": float(totals[0]) / max(1.0, float(totals[2])),
                "acc": float(totals[1]) / max(1.0, float(totals[2]))}

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
        stats = self.method.layer_stats()
        values: dict[str, float] = {"sparsity/density": self._density(stats)}
        for stat in stats:
            values[f"sparsity/layer/{stat.name}"] = stat.density
        for name, target in (self.method.layer_targets() or {}).items():
            values[f"sparsity/target/{name}"] = target
        values.update({f"method/{k}": v for k, v in self.method.metrics().items()})
        self.monitor.scalars(values, self.step)

    def _log_epoch(self, train: dict[str, float]) -> dict[str, float]:
        """Log the epoch to TensorBoard and the console; returns the metrics the callbacks see."""
        values = {"train/loss": train["loss"], "train/acc": train["acc"], "lr": self.schedule.lr,
                  "throughput/samples_per_s": train["samples_per_s"], "epoch": float(self.epoch)}
        if self.last_eval:
            values.update({"test/loss": self.last_eval["loss"], "test/acc": self.last_eval["acc"]})
        if self.last_val:
            values.update({"val/loss": self.last_val["loss"], "val/acc": self.last_val["acc"]})
        values.update({f"test/{k}": v for k, v in self.model_metrics.items()})
        self.monitor.scalars(values, self.step)
        self._log_sparsity()
        self._log_neurons()
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
    def state_dict(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "model": self.backend.model_state_dict(),
                "optimizer": self.backend.optimizer_state_dict(self.optimizer),
                "lr_schedule": self.schedule.state_dict(),
                "masks": self.method.masks.state_dict() if self.method.masks is not None else None,
                "method": self.method.state_dict(), "backend": self.backend.state_dict(),
                "rng": self.backend.all_gather_object(capture_rng()), "epoch": self.epoch, "step": self.step,
                "best_test_acc": self.best_acc, "world_size": self.env.world_size, "config": to_dict(self.cfg),
                "neurons": self.neuron_history}

    def save_checkpoint(self) -> str | None:
        state = self.state_dict()          # every rank joins the RNG gather; rank 0 writes
        if not self.env.is_main:
            return None
        return self.checkpointer.save(state, epoch=self.epoch, step=self.step)

    def _restore(self, url: str) -> None:
        state = load_state(url, map_location=self.device)
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
        self.best_acc = float(state["best_test_acc"])
        self.neuron_history = list(state.get("neurons") or [])
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
                   "stopped_early": self.stopped_early,
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
        if self.env.is_main:
            with fsspec.open(_join(self.run_dir, "summary.json"), "w") as handle:
                json.dump(summary, handle, indent=2)
            self.monitor.print(format_run_summary(summary, self.run_dir, self.monitor.tensorboard_dir))
        return summary

    def close(self) -> None:
        """Release what the run opened (the TensorBoard writer); safe to call twice and after a failed start."""
        if self.monitor is not None:
            self.monitor.close()


def train(cfg: RunConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run one training job in this process (one rank of it under torchrun); returns the summary.

    The trainer and the backend are closed, and the torch flags the run set restored, on every path: success, an
    exception, or a callback's stop. A process group that the caller created survives the run.
    """
    with restored_torch_flags():
        env = DistEnv.from_environ()
        device = pick_device(cfg.train.device, env)
        backend = build_backend(cfg.parallel, env, device, cfg.train.precision)
        try:
            trainer = Trainer(cfg, backend, callbacks)
            try:
                summary = trainer.fit()
            finally:
                trainer.close()
                del trainer     # the wrapped model must die before the backend tears its process group down
            backend.barrier()   # rank 0 may still be writing: a rank that tears the group down early can abort gloo
            return summary
        finally:
            backend.shutdown()
