"""The measurements of the GPU acceptance run (``benchmarks/gpu_acceptance.py``), one function per section.

Each ``run_*`` fills its section's record of the JSON (see ``gpu_acceptance.skeleton``) and keeps to the run's time
budget. ``Plan`` holds the sizes: the GPU run's, or the dry run's tiny stand-ins (the same code on a CPU).
"""

from __future__ import annotations

import copy
import importlib.util
import io
import os
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import models
from benchmarks.timing import synchronize, timed
from engine.data import DataConfig, build_loaders
from engine.optim import OptimConfig, build_optimizer
from pruning.methods import MethodContext, build_method, method_class

REPO = Path(__file__).resolve().parents[1]
SLOTS = ("resnet50", "vit_s16")          # the GPU run's models; the dry run puts tiny stand-ins in these slots
VARIANTS = ("dense", "static", "rigl")
MODES = ("eager", "compiled")


@dataclass
class Plan:
    """Sizes of one run: the GPU acceptance run, or the dry run's tiny stand-ins (same code, same JSON keys)."""

    models: dict[str, tuple[str, dict[str, Any]]]
    image_size: int = 224
    num_classes: int = 1000
    batch_size: int = 256
    precision: str = "bf16"
    density: float = 0.1
    update_every: int = 100
    rounds: int = 10
    steps_per_round: int = 10
    warmup_steps: int = 5
    compile_backend: str = "inductor"
    synflow_iterations: int = 100
    snip_per_class: int = 10
    snip_classes: int = 1000
    loader_workers: int = 12
    loader_steps: int = 20
    loader_jpeg_size: tuple[int, int] = (400, 350)
    loader_images_per_shard: int = 32
    pytest_timeout_s: int = 300      # the whole pytest session (a hang guard)
    test_timeout_s: int = 200        # one test (pytest-timeout): the two-rank test needs the most
    estimates_s: dict[str, float] = field(default_factory=lambda: {
        "tests": 150.0, "prune_at_init": 40.0, "throughput_eager": 45.0, "throughput_compiled": 90.0,
        "loader": 40.0, "sparse_24": 20.0})

    @classmethod
    def gpu(cls) -> Plan:
        workers = max(1, min(12, (os.cpu_count() or 2) - 2))
        return cls(models={"resnet50": ("resnet50", {}), "vit_s16": ("vit_s16", {})}, loader_workers=workers)

    @classmethod
    def dry(cls) -> Plan:
        """Seconds on a 2-core CPU: tiny ResNet and ViT, 16 px, a few steps, dynamo without code generation."""
        return cls(models={"resnet50": ("resnet20", {"width": 8}),   # width 4 channels_last crashed torch's CPU kernels
                           "vit_s16": ("vit", {"patch_size": 4, "dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2.0})},
                   image_size=16, num_classes=10, batch_size=4, update_every=2, rounds=2, steps_per_round=1,
                   warmup_steps=1, compile_backend="eager", synflow_iterations=2, snip_per_class=1, snip_classes=10,
                   loader_workers=0, loader_steps=2, loader_jpeg_size=(24, 20), loader_images_per_shard=8,
                   pytest_timeout_s=120,
                   estimates_s={"tests": 5.0, "prune_at_init": 2.0, "throughput_eager": 5.0,
                                "throughput_compiled": 5.0, "loader": 3.0, "sparse_24": 1.0})


class Budget:
    """Wall-clock budget of the whole run: sections ask before they start and stop early when it runs out."""

    def __init__(self, seconds: float) -> None:
        self.total = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.total - self.elapsed()

    def allows(self, estimate: float) -> bool:
        return self.left() >= estimate


# --------------------------------------------------------------------------------------------------- helpers
def _autocast(device: torch.device, precision: str) -> Any:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _build(plan: Plan, slot: str, device: torch.device, num_classes: int | None = None) -> nn.Module:
    name, options = plan.models[slot]
    return models.build_model(name, in_channels=3, image_size=plan.image_size,
                              num_classes=num_classes or plan.num_classes, **options).to(device)


def _channels_last(plan: Plan, slot: str) -> bool:
    return slot == "resnet50"


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def write_jpeg_shards(folder: Path, prefix: str, shards: int, per_shard: int, size: tuple[int, int],
                      classes: int, seed: int = 0) -> list[str]:
    """Tar shards of smooth random JPEGs (``key.jpg`` + ``key.cls``), the layout ``imagenet_shards`` streams."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    paths = []
    for shard in range(shards):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            for j in range(per_shard):
                index = shard * per_shard + j
                coarse = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
                noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
                buffer = io.BytesIO()
                Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
                for name, data in ((f"{index:07d}.jpg", buffer.getvalue()),
                                   (f"{index:07d}.cls", str(index % classes).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        path = folder / f"{prefix}-{shard:06d}.tar"
        path.write_bytes(raw.getvalue())
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------------------------------------- 1. tests
def run_tests(plan: Plan, out: Path, budget: Budget, record: dict[str, Any]) -> None:
    """pytest -m gpu tests/test_gpu.py in its own process group (killed whole on time-out); JUnit XML parsed."""
    xml_path, log_path = out / "gpu_tests.xml", out / "gpu_tests.log"
    timeout = max(10.0, min(float(plan.pytest_timeout_s), budget.left() - 30.0))
    cmd = [sys.executable, "-m", "pytest", "tests/test_gpu.py", "tests/test_export_semi.py", "-m", "gpu", "-v", "-rfEs",
           "-p", "no:cacheprovider",
           f"--junitxml={xml_path}", "-o", "junit_family=xunit1"]
    if importlib.util.find_spec("pytest_timeout") is not None:   # a hung test fails alone; the XML is still written
        cmd.append(f"--timeout={int(min(plan.test_timeout_s, timeout))}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
            record["note"] = f"pytest killed after {timeout:.0f} s (budget); results below are the finished tests"
    record["exit_code"] = code
    text = log_path.read_text(errors="replace")
    cases = parse_junit(xml_path) if xml_path.exists() else parse_verbose_log(text)
    for key, outcome in (("passed", "passed"), ("failed", "failed"), ("errors", "error"), ("skipped", "skipped")):
        record[key] = sum(1 for case in cases if case["outcome"] == outcome)
    record["cases"] = cases
    record["log_tail"] = text[-4000:] if code not in (0, 5) else text[-600:]
    record["status"] = "ok" if code in (0, 5) else "failed"


def parse_junit(path: Path) -> list[dict[str, Any]]:
    """One entry per test case: name, outcome (passed / failed / error / skipped), seconds, message, properties."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for child, label in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            node = case.find(child)
            if node is not None:
                outcome = label
                message = (node.get("message") or node.text or "")[:500]
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases.append({"name": case.get("name"), "outcome": outcome, "seconds": _round(case.get("time"), 2),
                      "message": message, "properties": props})
    return cases


def parse_verbose_log(text: str) -> list[dict[str, Any]]:
    """Outcomes from ``pytest -v`` lines, for a session killed before it wrote its XML."""
    words = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped"}
    cases = []
    for match in re.finditer(r"^\S+::(\S+) (PASSED|FAILED|ERROR|SKIPPED)", text, flags=re.MULTILINE):
        cases.append({"name": match.group(1), "outcome": words[match.group(2)], "seconds": None,
                      "message": "from the log: the session was killed before writing its JUnit XML",
                      "properties": {}})
    return cases


# -------------------------------------------------------------------------------------------- 2. prune at init
def device_batches(count: int, classes: int, batch_size: int, shape: tuple[int, ...],
                   device: torch.device) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """Scoring batches made on the device: ``count`` samples, labels cycling over the classes (balanced)."""
    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator(device=device).manual_seed(0)
        for start in range(0, count, batch_size):
            n = min(batch_size, count - start)
            labels = torch.arange(start, start + n, device=device) % classes
            yield torch.randn(n, *shape, device=device, generator=gen), labels
    return batches


def run_prune_at_init(plan: Plan, device: torch.device, record: dict[str, Any]) -> None:
    shape = (3, plan.image_size, plan.image_size)
    record.update(model=plan.models["resnet50"][0], image_size=plan.image_size, num_classes=plan.snip_classes)
    torch.manual_seed(0)
    model = _build(plan, "resnet50", device, num_classes=plan.snip_classes)
    initial = copy.deepcopy(model.state_dict())
    context = MethodContext(device=device, input_shape=shape)
    synflow = method_class("synflow").Config(method="synflow", density=plan.density,
                                             iterations=plan.synflow_iterations)
    method = build_method(synflow, model, None, context)
    seconds, _ = timed(method.setup, device)
    record["synflow"] = {"iterations": plan.synflow_iterations, "seconds": _round(seconds, 3),
                         "float64_iterations": getattr(method, "float64_iterations", None),
                         "density": _round(method.masks.density() if method.masks is not None else None)}
    del method
    model.load_state_dict(initial)
    samples = plan.snip_per_class * plan.snip_classes
    context = MethodContext(device=device, input_shape=shape,
                            batches=device_batches(samples, plan.snip_classes, plan.batch_size, shape, device))
    snip = method_class("snip").Config(method="snip", density=plan.density, samples_per_class=plan.snip_per_class)
    method = build_method(snip, model, None, context)
    seconds, _ = timed(method.setup, device)
    record["snip"] = {"samples_per_class": plan.snip_per_class, "classes": plan.snip_classes, "samples": samples,
                      "seconds": _round(seconds, 3),
                      "density": _round(method.masks.density() if method.masks is not None else None)}
    record["status"] = "ok"


# ----------------------------------------------------------------------------------------------- 3. throughput
class Variant:
    """One model copy stepped as the trainer steps it: autocast forward, backward, ``before_step`` (mask the
    gradients; RigL reads dense ones on update steps), optimizer step, ``after_step`` (RigL's mask updates)."""

    def __init__(self, plan: Plan, slot: str, kind: str, mode: str, base: nn.Module, inputs: torch.Tensor,
                 targets: torch.Tensor) -> None:
        self.plan, self.inputs, self.targets = plan, inputs, targets
        self.model = copy.deepcopy(base)
        self.optimizer = build_optimizer(self.model, OptimConfig(name="sgd", lr=0.01, momentum=0.9,
                                                                 weight_decay=5e-5))
        self.method = None
        if kind != "dense":
            context = MethodContext(seed=0, device=inputs.device, steps_per_epoch=10**9, epochs=1)
            if kind == "static":
                config = method_class("random").Config(method="random", density=plan.density, scope="layer",
                                                       distribution="erk")
            else:
                config = method_class("rigl").Config(method="rigl", density=plan.density, distribution="erk",
                                                     period=plan.update_every)
            self.method = build_method(config, self.model, self.optimizer, context)
            self.method.setup()
        self.module = torch.compile(self.model, backend=plan.compile_backend) if mode == "compiled" else self.model
        self.count = 0

    def step(self) -> None:
        with _autocast(self.inputs.device, self.plan.precision):
            loss = F.cross_entropy(self.module(self.inputs), self.targets)
        loss.backward()
        if self.method is not None:
            self.method.before_step(self.count)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.method is not None:
            self.method.after_step(self.count)
        self.count += 1

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()

    def updates(self) -> int | None:
        if self.method is None:
            return None
        return int(self.method.metrics().get("dst/updates", 0))


def measure_slot(plan: Plan, slot: str, device: torch.device, budget: Budget, record: dict[str, Any],
                 compiled: bool) -> None:
    """Interleaved chunks of steps of every variant of one model; fills ``record`` (a ``_slot_record``)."""
    name, options = plan.models[slot]
    channels_last = _channels_last(plan, slot)
    record.update(model=name, options=options, image_size=plan.image_size, batch_size=plan.batch_size,
                  channels_last=channels_last, precision=plan.precision)
    torch.manual_seed(0)
    base = _build(plan, slot, device)
    inputs = torch.randn(plan.batch_size, 3, plan.image_size, plan.image_size, device=device)
    targets = torch.randint(0, plan.num_classes, (plan.batch_size,), device=device)
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    modes = MODES if compiled else ("eager",)
    variants = {(mode, kind): Variant(plan, slot, kind, mode, base, inputs, targets) for mode in modes
                for kind in VARIANTS}
    del base
    compile_s = []
    for (mode, _kind), variant in variants.items():    # warm-up: cudnn autotuning, compilation, allocator
        seconds, _ = timed(lambda: variant.run(plan.warmup_steps), device)
        if mode == "compiled":
            compile_s.append(seconds)
    record["compile_s"] = _round(max(compile_s), 2) if compile_s else None
    updates_before = {key: v.updates() for key, v in variants.items()}
    keys = list(variants)
    chunks: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
    for round_index in range(plan.rounds):
        if round_index and not budget.allows(0.0):
            record["note"] = f"stopped after {round_index} of {plan.rounds} rounds: time budget"
            break
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            seconds, _ = timed(lambda: variants[key].run(plan.steps_per_round), device)
            chunks[key].append(seconds)
    done = len(chunks[keys[0]])
    record["measured_steps"] = done * plan.steps_per_round
    if device.type == "cuda":
        record["peak_memory_gib"] = _round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    for mode in modes:
        dense = chunks[(mode, "dense")]
        for kind in VARIANTS:
            times = chunks[(mode, kind)]
            ratios = [d / t for d, t in zip(dense, times)]
            quartiles = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
            before, after = updates_before[(mode, kind)], variants[(mode, kind)].updates()
            extra = (max(times) - statistics.median(times)) * 1000 if kind == "rigl" and len(times) > 1 else None
            record["modes"][mode][kind] = {
                "ms_per_step": _round(statistics.median(times) / plan.steps_per_round * 1000, 3),
                "images_per_s": _round(plan.batch_size * plan.steps_per_round * len(times) / sum(times), 1),
                "vs_dense": _round(sum(dense) / sum(times)),
                "vs_dense_median": _round(statistics.median(ratios)),
                "vs_dense_iqr": [_round(quartiles[0]), _round(quartiles[2])],
                "rigl_updates": None if before is None else after - before,
                "update_extra_ms": _round(extra, 2),
            }
    if compiled:
        eager, fast = record["modes"]["eager"]["dense"]["images_per_s"], record["modes"]["compiled"]["dense"][
            "images_per_s"]
        record["compiled_speedup"] = _round(fast / eager) if eager and fast else None
    del variants
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_throughput(plan: Plan, device: torch.device, budget: Budget, record: dict[str, Any]) -> None:
    record["settings"] = {"precision": plan.precision, "density": plan.density, "distribution": "erk",
                          "update_every": plan.update_every, "rounds": plan.rounds,
                          "steps_per_round": plan.steps_per_round, "warmup_steps": plan.warmup_steps,
                          "compile_backend": plan.compile_backend, "optimizer": "sgd momentum 0.9 (fused)",
                          "data": "one synthetic batch on the device", "timer": "cuda events"
                          if device.type == "cuda" else "perf_counter"}
    notes = []
    for i, slot in enumerate(SLOTS):
        slots_left = len(SLOTS) - i
        eager_cost = plan.estimates_s["throughput_eager"]
        if not budget.allows(eager_cost):
            record[slot]["note"] = f"skipped: {budget.left():.0f} s left of the budget, needs about {eager_cost:.0f}"
            notes.append(f"{slot} skipped (budget)")
            continue
        # compiled variants only when this slot and the ones after it still fit in the budget
        compiled = budget.allows(plan.estimates_s["throughput_compiled"] + eager_cost * slots_left)
        if not compiled:
            notes.append(f"{slot}: compiled variants skipped (budget)")
        measure_slot(plan, slot, device, budget, record[slot], compiled)
    record["note"] = "; ".join(notes) or None
    record["status"] = "ok" if not any("skipped" in n for n in notes) else "partial"


# --------------------------------------------------------------------------------------------------- 4. loader
def run_loader(plan: Plan, device: torch.device, record: dict[str, Any], reference: float | None) -> None:
    """Dense ResNet-50 steps fed by the real loader, and the loader alone, over synthetic JPEG shards."""
    workers = plan.loader_workers
    shards = max(4, 2 * workers)
    per_shard = plan.loader_images_per_shard
    steps = plan.loader_steps
    with tempfile.TemporaryDirectory(prefix="gpu-acceptance-shards-") as tmp:
        write_jpeg_shards(Path(tmp), "train", shards, per_shard, plan.loader_jpeg_size, plan.num_classes)
        write_jpeg_shards(Path(tmp), "val", 1, per_shard, plan.loader_jpeg_size, plan.num_classes)
        cfg = DataConfig(name="imagenet_shards", root=tmp, batch_size=plan.batch_size, image_size=plan.image_size,
                         augment="standard", num_workers=workers,
                         options={"train_shards": [f"train-{{000000..{shards - 1:06d}}}.tar"],
                                  "val_shards": ["val-000000.tar"],
                                  "train_samples": plan.batch_size * (steps + 2) * 2,
                                  "val_samples": per_shard, "num_classes": plan.num_classes,
                                  "shuffle_buffer": 256})
        loaders = build_loaders(cfg, seed=0, device=device)
        normalize = loaders.device_normalize
        record.update(model=plan.models["resnet50"][0], batch_size=plan.batch_size, num_workers=workers,
                      shards=shards, unique_images=shards * per_shard, jpeg_size=list(plan.loader_jpeg_size),
                      steps=steps)

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for x, y in loaders.train:
                x = x.to(device, non_blocking=True)
                x = normalize(x) if normalize is not None else x.float()
                yield x.contiguous(memory_format=torch.channels_last), y.to(device, non_blocking=True)

        stream = batches()
        next(stream)                                   # workers started, first batches decoded
        start = time.perf_counter()
        for _ in range(steps):
            next(stream)
        synchronize(device)
        record["loader_images_per_s"] = _round(plan.batch_size * steps / (time.perf_counter() - start), 1)

        torch.manual_seed(0)
        model = _build(plan, "resnet50", device).to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-5))

        def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
            with _autocast(device, plan.precision):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        stream = batches()
        for _ in range(2):                              # warm-up (cudnn autotuning, a new pass of the stream)
            train_step(*next(stream))
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            train_step(*next(stream))
        synchronize(device)
        train = plan.batch_size * steps / (time.perf_counter() - start)
        del stream, loaders
    record["train_images_per_s"] = _round(train, 1)
    record["device_synthetic_images_per_s"] = reference
    if reference:
        record["vs_device_synthetic"] = _round(train / reference)
        loader_speed = record["loader_images_per_s"]
        record["bound"] = "loader" if loader_speed < reference * 0.95 else "model"
    record["status"] = "ok"


# ------------------------------------------------------------------------------------------------------ 5. 2:4
def gemm_shapes(batch: int) -> list[tuple[str, int, int, int]]:
    """(label, out_features, in_features, rows) of the layers a 2:4 export would convert, at ``batch`` images."""
    tokens = batch * 197
    shapes = [("vit_s16 mlp fc1", 1536, 384, tokens), ("vit_s16 mlp fc2", 384, 1536, tokens),
              ("resnet50 fc", 1000, 2048, batch)]
    for stage, (planes, size) in enumerate(((64, 56), (128, 28), (256, 14), (512, 7)), start=1):
        rows = batch * size * size
        shapes += [(f"resnet50 layer{stage} 1x1 reduce", planes, planes * 4, rows),
                   (f"resnet50 layer{stage} 1x1 expand", planes * 4, planes, rows)]
    return shapes


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive inputs (the 2:4 pattern the sparse tensor cores take)."""
    groups = weight.abs().reshape(weight.shape[0], -1, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(weight.shape)


def kernel_reference(plan: Plan, device: torch.device, budget: Budget) -> list[dict[str, Any]]:
    """torch's semi-structured (2:4) kernel against the dense product on the same pruned weights, forward, bf16."""
    from torch.sparse import to_sparse_semi_structured

    rows_out = []
    for label, out_features, in_features, rows in gemm_shapes(plan.batch_size):
        entry: dict[str, Any] = {"layer": label, "out": out_features, "in": in_features, "rows": rows}
        if not budget.allows(5.0):
            entry["note"] = "skipped: time budget"
            rows_out.append(entry)
            continue
        try:
            weight = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16)
            weight = weight * two_four_mask(weight)
            x = torch.randn(rows, in_features, device=device, dtype=torch.bfloat16)
            sparse = to_sparse_semi_structured(weight)
            dense_out, sparse_out = F.linear(x, weight), F.linear(x, sparse)
            error = float((dense_out.float() - sparse_out.float()).norm() / dense_out.float().norm())
            times = {}
            for name, w in (("dense", weight), ("sparse", sparse)):
                for _ in range(3):
                    F.linear(x, w)
                times[name] = statistics.median(timed(lambda w=w: F.linear(x, w), device)[0] for _ in range(20))
            entry.update(dense_ms=_round(times["dense"] * 1000, 4), sparse_ms=_round(times["sparse"] * 1000, 4),
                         speedup=_round(times["dense"] / times["sparse"], 3), rel_error=_round(error, 6))
        except Exception as error:   # a shape the kernel refuses is a finding, not a failed run
            entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}" if str(error) else \
                type(error).__name__
        rows_out.append(entry)
    return rows_out


def export_blocks(plan: Plan) -> list[tuple[str, list[int], int]]:
    """(label, widths of a Linear chain, rows) of the blocks the 2:4 export is timed on: a ViT MLP (the slot's dim
    and mlp ratio, batch x tokens rows) and ResNet-50's classifier (2048 -> 1000, batch rows)."""
    options = plan.models["vit_s16"][1]
    dim, patch = options.get("dim", 384), options.get("patch_size", 16)
    tokens = (plan.image_size // patch) ** 2 + 1
    return [("vit mlp", [dim, int(dim * options.get("mlp_ratio", 4.0)), dim], plan.batch_size * tokens),
            ("resnet50 fc", [2048, 1000] if plan.image_size >= 64 else [64, 10], plan.batch_size)]


def export_24(plan: Plan, device: torch.device, budget: Budget) -> list[dict[str, Any]]:
    """The project's ``--format 2:4`` path (``pruning.export.semi.export_semi``) on each block pruned 2:4 by the N:M
    scope: the plan, the output error against fp32, and (CUDA) dense fp32 / dense bf16 / 2:4 bf16 timed
    interleaved. Without CUDA the same code runs with the 2:4 layers as dense half weights and nothing is timed."""
    from benchmarks.timing import interleaved, ratio_stats
    from pruning.export.semi import export_semi
    from pruning.scopes import build_scope

    convert = device.type == "cuda"
    rows_out = []
    for label, widths, rows in export_blocks(plan):
        entry: dict[str, Any] = {"block": label, "widths": widths, "rows": rows}
        if not budget.allows(5.0):
            entry["note"] = "skipped: time budget"
            rows_out.append(entry)
            continue
        try:
            layers: list[nn.Module] = []
            for fan_in, fan_out in zip(widths, widths[1:]):
                layers += [nn.Linear(fan_in, fan_out), nn.GELU()]
            block = nn.Sequential(*layers[:-1]).to(device).eval()
            weights = {f"{i}.weight": m.weight for i, m in enumerate(block) if isinstance(m, nn.Linear)}
            masks = build_scope("global", {n: w.shape for n, w in weights.items()}, nm=[2, 4]).select(
                {n: w.detach().abs() for n, w in weights.items()}, 0.5)
            with torch.no_grad():
                for name, weight in weights.items():
                    weight.mul_(masks[name])
            x = torch.randn(rows, widths[0], device=device)
            lines: list[str] = []
            exported, _, details = export_semi(block, x[:64], "bf16", device, convert, lines.append)
            entry.update(converted=details["converted"], planned=details["planned"], plan=lines,
                         rel_error=_round(details["rel_error"], 6))
            if convert:
                from pruning.export.semi import CastInput

                half = CastInput(copy.deepcopy(block).to(torch.bfloat16), torch.bfloat16).eval()
                steps = {"dense": lambda: block(x), "dense_bf16": lambda: half(x), "2:4": lambda: exported(x)}
                with torch.inference_mode():
                    times, _ = interleaved(steps, plan.rounds, 3, device)
                entry.update(dense_bf16_ms=_round(statistics.median(times["dense_bf16"]) * 1000, 4),
                             two_four_ms=_round(statistics.median(times["2:4"]) * 1000, 4),
                             speedup_vs_bf16=_round(ratio_stats(times["dense_bf16"], times["2:4"])[0], 3),
                             speedup_vs_fp32=_round(ratio_stats(times["dense"], times["2:4"])[0], 3))
        except Exception as error:   # a refused shape or a kernel error is a finding, not a failed run
            entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}" if str(error) else \
                type(error).__name__
        rows_out.append(entry)
    return rows_out


def run_sparse_24(plan: Plan, device: torch.device, budget: Budget, record: dict[str, Any]) -> None:
    notes = []
    record["export"] = export_24(plan, device, budget)
    if device.type != "cuda":
        record["kernel_reference"] = []
        notes.append("torch's semi-structured kernel needs CUDA: the 2:4 export ran with dense half weights, untimed")
        record["status"] = "skipped"
    else:
        record["kernel_reference"] = kernel_reference(plan, device, budget)
        failed = [e["block"] for e in record["export"] if "error" in e]
        record["status"] = "partial" if failed else "ok"
        if failed:
            notes.append(f"2:4 export failed on {', '.join(failed)}")
    record["note"] = "; ".join(notes) or "2:4 export and torch's kernel timed"
