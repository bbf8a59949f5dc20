"""The training loop: build everything from the config, then a short loop with fixed hook points.

forward, backward (gradients all-reduced by the backend), ``method.before_step`` (mask gradients), optimizer step,
``method.after_step``; per epoch: evaluate, ``method.end_epoch``, log, checkpoint. A resumed run restores the same
objects from the checkpoint and continues on the same curve. Nothing here is global, so a process (a Ray Tune
worker, a test) can run ``train`` many times.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any, Iterator

import fsspec
import numpy as np
import torch
from torch import nn

import models
from engine.checkpoint import Checkpointer, capture_rng, load_state, resolve_resume, restore_rng
from engine.config import to_dict, write_yaml
from engine.data import build_loaders
from engine.monitor import Monitor, format_run_summary
from engine.optim import build_optimizer, build_schedule
from engine.parallel import Backend, DistEnv, build_backend, pick_device
from engine.run_config import RunConfig
from pruning.masks import LayerStat, parameter_counts
from pruning.methods import MethodContext, build_method, method_class

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


class Trainer:
    """Owns the objects of one run; ``fit`` runs it and returns the summary."""

    def __init__(self, cfg: RunConfig, backend: Backend) -> None:
        self.cfg = cfg
        self.backend = backend
        self.env = backend.env
        self.device = backend.device
        deterministic = cfg.train.deterministic if cfg.train.deterministic is not None else self.device.type == "cpu"
        torch.backends.cudnn.benchmark = not deterministic
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.seed)

        resume_url, run_dir = _resume_target(cfg) if cfg.resume else (None, None)
        self.run_dir: str = backend.broadcast_object(run_dir or (_new_run_dir(cfg) if self.env.is_main else None))

        self.loaders = build_loaders(cfg.data, seed=cfg.seed, rank=self.env.rank, world_size=self.env.world_size,
                                     device=self.device)
        spec = self.loaders.spec
        model = models.build_model(cfg.model.name, in_channels=spec.channels, image_size=spec.image_size,
                                   num_classes=spec.num_classes, **cfg.model.options).to(self.device)
        batches = len(self.loaders.train) // cfg.train.grad_accum_steps
        if batches < 1:
            raise ValueError(f"the training set gives {len(self.loaders.train)} batches per rank, fewer than "
                             f"train.grad_accum_steps={cfg.train.grad_accum_steps}; lower data.batch_size")
        self.steps_per_epoch = min(batches, cfg.train.max_steps_per_epoch or batches)
        context = MethodContext(seed=cfg.seed, rank=self.env.rank, world_size=self.env.world_size,
                                device=self.device, steps_per_epoch=self.steps_per_epoch, epochs=cfg.train.epochs,
                                batches=self._scoring_batches,
                                input_shape=(spec.channels, spec.image_size, spec.image_size))
        model = method_class(cfg.sparsity.method).prepare_model(cfg.sparsity, model, context)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = build_optimizer(model, cfg.optim)
        self.schedule = build_schedule(self.optimizer, cfg.lr_schedule, base_lr=cfg.optim.lr,
                                       steps_per_epoch=self.steps_per_epoch, epochs=cfg.train.epochs)
        self.method = build_method(cfg.sparsity, self.model, self.optimizer, context)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.monitor = Monitor(self.run_dir, enabled=self.env.is_main, tensorboard=cfg.monitor.tensorboard,
                               progress=cfg.monitor.progress)
        ckpt_dir = cfg.checkpoint.dir or _join(self.run_dir, "checkpoints")
        self.checkpointer = Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep)
        self.epoch = 0
        self.step = 0
        self.best_acc = 0.0
        self.last_eval: dict[str, float] = {}
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

    # --------------------------------------------------------------- data
    def _to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        """A batch as the model expects it: on the device, normalised there when the loader yields uint8 images
        (data.normalize_on_device), then channels_last if configured."""
        inputs = inputs.to(self.device, non_blocking=True)
        if self.loaders.device_normalize is not None:
            inputs = self.loaders.device_normalize(inputs)
        if self.cfg.train.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def _scoring_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches for methods that score data (SNIP, GraSP, ...): as the model sees them in the loop."""
        return ((self._to_device(x), y.to(self.device)) for x, y in self.loaders.train)

    # --------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train to the configured number of epochs; returns (and writes) the summary."""
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
            if (self.epoch + 1) % cfg.train.eval_every_epochs == 0 or last:
                self.last_eval = self.evaluate()
                self.best_acc = max(self.best_acc, self.last_eval["acc"])
            self.method.end_epoch(self.epoch)
            self.backend.attach_masks(self.method.masks)
            self.epoch += 1
            self._log_epoch(train)
            if self.epoch % cfg.checkpoint.every_epochs == 0 or (last and cfg.checkpoint.save_final):
                self.save_checkpoint()
        return self._finish(time.perf_counter() - started)

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
                inputs = self._to_device(inputs)
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
                backend.attach_masks(self.method.masks)   # a method may create its MaskSet late; no-op otherwise
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
    def evaluate(self, loader: Any = None) -> dict[str, float]:
        """Loss and accuracy over the test set, summed over ranks (each rank evaluates its own shard)."""
        model = self.model   # the unwrapped model: ranks may see different batch counts, DDP would hang
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        for inputs, targets in (loader or self.loaders.test):
            inputs = self._to_device(inputs)
            targets = targets.to(self.device, non_blocking=True)
            with self.backend.autocast():
                outputs = model(inputs)
            loss_sum += nn.functional.cross_entropy(outputs.float(), targets, reduction="sum").double()
            correct += (outputs.argmax(1) == targets).sum()
            seen += targets.numel()
        model.train(was_training)
        totals = self.backend.all_reduce(torch.stack([loss_sum, correct.double(),
                                                      torch.tensor(float(seen), dtype=torch.float64,
                                                                   device=self.device)]))
        return {"loss": float(totals[0]) / max(1.0, float(totals[2])),
                "acc": float(totals[1]) / max(1.0, float(totals[2]))}

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

    def _log_epoch(self, train: dict[str, float]) -> None:
        values = {"train/loss": train["loss"], "train/acc": train["acc"], "lr": self.schedule.lr,
                  "throughput/samples_per_s": train["samples_per_s"], "epoch": float(self.epoch)}
        if self.last_eval:
            values.update({"test/loss": self.last_eval["loss"], "test/acc": self.last_eval["acc"]})
        self.monitor.scalars(values, self.step)
        self._log_sparsity()
        test = f"test acc {100 * self.last_eval['acc']:.2f}%" if self.last_eval else "no eval"
        self.monitor.print(f"epoch {self.epoch}/{self.cfg.train.epochs}: train loss {train['loss']:.4f} "
                           f"acc {100 * train['acc']:.2f}%, {test}, {train['samples_per_s']:.0f} samples/s")

    # --------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "model": self.backend.model_state_dict(),
                "optimizer": self.backend.optimizer_state_dict(self.optimizer),
                "lr_schedule": self.schedule.state_dict(),
                "method": self.method.state_dict(), "backend": self.backend.state_dict(),
                "rng": self.backend.all_gather_object(capture_rng()), "epoch": self.epoch, "step": self.step,
                "best_test_acc": self.best_acc, "world_size": self.env.world_size, "config": to_dict(self.cfg)}

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
        self.method.load_state_dict(state["method"])
        self.backend.load_state_dict(state["backend"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_acc = float(state["best_test_acc"])
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
                   "layers": {s.name: {"numel": s.numel, "kept": s.kept, "nonzero": s.nonzero} for s in stats}}
        if self.env.is_main:
            with fsspec.open(_join(self.run_dir, "summary.json"), "w") as handle:
                json.dump(summary, handle, indent=2)
            self.monitor.print(format_run_summary(summary, self.run_dir, self.monitor.tensorboard_dir))
        self.monitor.close()
        return summary


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run one training job in this process (one rank of it under torchrun); returns the summary."""
    env = DistEnv.from_environ()
    device = pick_device(cfg.train.device, env)
    backend = build_backend(cfg.parallel, env, device, cfg.train.precision)
    try:
        summary = Trainer(cfg, backend).fit()
        backend.barrier()   # rank 0 may still be writing: a rank that tears the group down early can abort gloo
        return summary
    finally:
        backend.shutdown()

