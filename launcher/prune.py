"""``python -m launcher prune``: prune at initialisation over methods and compressions, no training.

    python -m launcher prune [CONFIG] [key=value ...] --methods synflow,magnitude,random --compressions 0:6:0.25

Builds the model of the config (its model and data sections) once, as training would (``engine.build``), then for
every method and every compression (log10 of 1 / density) restores the initial weights, prunes at init and records
per-layer kept counts. Data-free methods need only the data set's shape (``engine.data.data_shape``), so they run
where the data set is absent. Overrides ``sparsity.KEY=VALUE`` (in the YAML or on the command line) apply to every
chosen method that has KEY (e.g. ``sparsity.iterations=10``, ``sparsity.targets.exclude_roles=[classifier]``).
Writes a JSON report (by default ``prune.json`` in a new directory per run, never overwriting one) and prints
tables: kept counts and densities per layer, global density, collapsed layers, and the critical compression per
method (the largest tested compression up to which no prunable layer kept nothing).
Under torchrun the data-dependent scores are combined over ranks (the process group comes from ``engine.backends``);
rank 0 writes the report.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import fsspec
import torch

from engine.backends import Backend, DistEnv, ParallelConfig, build_backend, pick_device
from engine.build import build_model
from engine.config import ConfigError, apply_overrides, build, read_yaml, to_dict, write_yaml
from engine.data import build_loaders, check_data_available, data_shape
from engine.run_config import RunConfig
from engine.run_dirs import claim_new_run_dir
from launcher.common import fail
from pruning.methods import MethodConfig, MethodContext, build_method, list_methods, method_class
from pruning.methods.at_init import PruneAtInit
from pruning.methods.snip import DataScoredPruning
from pruning.targets import prunable_parameters


MAX_COMPRESSION = 12.0   # density 1e-12 keeps no weight of any model there is; beyond it 10**-c underflows to 0


def parse_compressions(text: str) -> list[float]:
    """'0:6:0.25' (start:stop:step, stop included), '1,2,3.5' or '3' -> compressions (log10 of 1 / density)."""
    try:
        if ":" in text:
            start, stop, step = (float(part) for part in text.split(":"))
            if not all(map(math.isfinite, (start, stop, step))) or step <= 0 or stop < start:
                raise ValueError
            if stop > MAX_COMPRESSION or (stop - start) / step > 10_000:
                raise ConfigError(f"--compressions '{text}' must stay within 0..{MAX_COMPRESSION:g} in at most "
                                  "10000 steps, e.g. 0:6:0.5")
            count = math.floor((stop - start) / step + 1e-9) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(part) for part in text.split(",") if part.strip()]
    except ConfigError:
        raise
    except ValueError:
        raise ConfigError(f"--compressions '{text}' must be start:stop:step with step > 0, or a comma list, e.g. "
                          "0:6:0.25 or 1,2,3") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise ConfigError(f"--compressions '{text}' must hold finite compressions >= 0 (log10 of 1 / density)")
    if max(values) > MAX_COMPRESSION:
        raise ConfigError(f"--compressions '{text}' goes past {MAX_COMPRESSION:g} (density 1e-{MAX_COMPRESSION:g}, "
                          "below one weight of any model); use smaller compressions, e.g. 0:6:0.5")
    return values


def split_config(path: str | None, overrides: Sequence[str]) -> tuple[RunConfig, dict[str, Any]]:
    """The run config without its sparsity section, and the sparsity keys the user set (applied per method)."""
    data = apply_overrides(read_yaml(path) if path else {}, overrides)
    shared = data.pop("sparsity", None) or {}
    if not isinstance(shared, dict):
        raise ConfigError("sparsity must be a section of key: value pairs")
    shared = {k: v for k, v in shared.items() if k not in ("method", "density")}
    return build(RunConfig, data), shared


def method_config(name: str, density: float, shared: dict[str, Any]) -> MethodConfig:
    """``name``'s config at ``density`` with the shared keys it has."""
    fields = {f.name for f in dataclasses.fields(method_class(name).Config)}
    data = {"method": name, "density": density, **{k: v for k, v in shared.items() if k in fields}}
    return build(MethodConfig, data, "sparsity")


def check_methods(names: Sequence[str], shared: dict[str, Any]) -> None:
    """Every name is a pruning-at-init method and every shared key belongs to at least one of them."""
    for name in names:
        if not issubclass(method_class(name), PruneAtInit):
            raise ConfigError(f"method '{name}' does not prune at initialisation; choose from "
                              f"{', '.join(pruning_at_init_methods())}")
    known = {f.name for n in names for f in dataclasses.fields(method_class(n).Config)}
    for key in shared:
        if key not in known:
            raise ConfigError(f"sparsity.{key} is not a setting of any chosen method ({', '.join(names)})")


def pruning_at_init_methods() -> list[str]:
    """Registered methods that prune at initialisation (the only ones this command runs)."""
    return [n for n in list_methods() if issubclass(method_class(n), PruneAtInit)]


def critical_compression(runs: Sequence[dict[str, Any]]) -> float | None:
    """Largest tested compression with no collapsed layer there or at any smaller tested compression."""
    best = None
    for run in sorted(runs, key=lambda r: r["compression"]):
        if run["collapsed_layers"]:
            break
        best = run["compression"]
    return best


def prune_one(model: torch.nn.Module, initial: dict[str, torch.Tensor], name: str, compression: float,
              shared: dict[str, Any], context: MethodContext,
              cache: dict[int, dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Restore the initial weights, prune with one method at one compression, account per layer.

    ``cache``: the method's scores of earlier compressions, reused when it prunes in one shot (its scores of the
    initial weights do not depend on the density)."""
    model.load_state_dict(initial)
    method = build_method(method_config(name, 10.0 ** -compression, shared), model, None, context)
    if cache is not None and isinstance(method, PruneAtInit) and method.config.iterations == 1:
        method.score_cache = cache
    started = time.perf_counter()
    method.setup()
    seconds = time.perf_counter() - started
    stats = method.layer_stats()
    total, kept = sum(s.numel for s in stats), sum(s.kept for s in stats)
    run = {"compression": compression, "target_density": 10.0 ** -compression, "density": kept / total,
           "kept": kept, "collapsed_layers": [s.name for s in stats if s.kept == 0], "seconds": seconds,
           "layers": {s.name: {"kept": s.kept, "density": s.density} for s in stats}}
    notes = [n for n in (getattr(method, "precision_note", None), getattr(method, "selection_note", None)) if n]
    if notes:
        run["note"] = "; ".join(notes)
    return run


def run_prune(cfg: RunConfig, names: Sequence[str], compressions: Sequence[float], shared: dict[str, Any],
              env: DistEnv | None = None, device: torch.device | None = None, log: Callable[[str], Any] = print,
              prepare: Callable[[torch.nn.Module], None] | None = None) -> dict[str, Any]:
    """Prune at init for every method and compression; returns the report (plain data).

    ``env`` is this process's place in the job (one process by default; under torchrun the process group must
    exist, see ``pruning_backend``) and ``device`` defaults to the one training would use. ``prepare`` may change the
    freshly built model once (e.g. another initialisation) before anything is pruned.
    """
    check_methods(names, shared)
    env = env or DistEnv()
    rank, world_size = env.rank, env.world_size
    shape = data_shape(cfg.data)
    device = device or pick_device(cfg.train.device, env)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, shape, device)
    if prepare is not None:
        prepare(model)
    initial = copy.deepcopy(model.state_dict())
    batches = None
    if any(issubclass(method_class(n), DataScoredPruning) for n in names):
        check_data_available(cfg.data)
        loaders = build_loaders(cfg.data, seed=cfg.seed, rank=rank, world_size=world_size, device=device)
        batches = lambda: loaders.train   # noqa: E731
    context = MethodContext(seed=cfg.seed, rank=rank, world_size=world_size, device=device, batches=batches,
                            input_shape=shape.input_shape)
    report: dict[str, Any] = {"model": cfg.model.name, "model_options": cfg.model.options, "data": cfg.data.name,
                              "input_shape": list(shape.input_shape), "num_classes": shape.num_classes,
                              "seed": cfg.seed, "shared_settings": shared, "methods": {}}
    for name in names:
        runs = []
        cache: dict[int, dict[str, torch.Tensor]] = {}
        for compression in compressions:
            run = prune_one(model, initial, name, compression, shared, context, cache)
            runs.append(run)
            collapsed = len(run["collapsed_layers"])
            log(f"{name:>10} compression {compression:<5g} density {run['density']:.3e} "
                f"collapsed layers {collapsed}  ({run['seconds']:.1f} s)")
        report["methods"][name] = {"critical_compression": critical_compression(runs), "runs": runs}
    report["prunable"] = _layer_sizes(model, names[0], shared)
    model.load_state_dict(initial)
    return report


def _layer_sizes(model: torch.nn.Module, name: str, shared: dict[str, Any]) -> dict[str, int]:
    cfg = method_config(name, 1.0, shared)
    return {n: p.numel() for n, p in prunable_parameters(model, cfg.targets).items()}


def _compact(count: int) -> str:
    if count >= 10**6:
        return f"{count / 1e6:.2f}M"
    if count >= 10**4:
        return f"{count / 1e3:.0f}k"
    return str(count)


def format_report(report: dict[str, Any]) -> str:
    """Per method: kept counts and densities per layer (columns = compressions), global density, collapse."""
    lines = [f"pruning at init: {report['model']} on {report['data']} shape "
             f"{'x'.join(map(str, report['input_shape']))}, {report['num_classes']} classes"]
    sizes = report["prunable"]
    width = max(len(n) for n in sizes) + 2
    for name, result in report["methods"].items():
        runs = result["runs"]
        critical = result["critical_compression"]
        lines.append("")
        lines.append(f"{name}: critical compression "
                     f"{'none (collapsed at the first)' if critical is None else f'10^{critical:g}'}")
        head = "layer".ljust(width) + "size".rjust(8) + "".join(f"{r['compression']:>9g}" for r in runs)
        for title, cell in (("kept weights per layer (columns: compression)", lambda r, n: _compact(
                r["layers"][n]["kept"])), ("density per layer", lambda r, n: f"{r['layers'][n]['density']:.1e}")):
            lines.append(f"  {title}")
            lines.append("  " + head)
            for layer, size in sizes.items():
                lines.append("  " + layer.ljust(width) + _compact(size).rjust(8)
                             + "".join(f"{cell(r, layer):>9}" for r in runs))
        lines.append("  " + "global density".ljust(width + 8) + "".join(f"{r['density']:>9.1e}" for r in runs))
        lines.append("  " + "collapsed layers".ljust(width + 8)
                     + "".join(f"{len(r['collapsed_layers']):>9d}" for r in runs))
        for run in runs:
            if "note" in run:
                lines.append(f"  note at compression {run['compression']:g}: {run['note']}")
    lines.append("")
    lines.append("critical compression (largest with no collapsed layer): "
                 + ", ".join(f"{n} {_power(r['critical_compression'])}" for n, r in report["methods"].items()))
    return "\n".join(lines)


def _power(compression: float | None) -> str:
    return "none" if compression is None else f"10^{compression:g}"


def pruning_backend(cfg: RunConfig, env: DistEnv, device: torch.device) -> Backend:
    """Communication only: a process group under torchrun (data-dependent scores are combined over ranks), nothing
    in one process. The config's own backend choice is for training; pruning never wraps a model."""
    parallel = ParallelConfig(dist_backend=cfg.parallel.dist_backend, timeout_minutes=cfg.parallel.timeout_minutes)
    return build_backend(parallel, env, device, precision="fp32")


def write_report(report: dict[str, Any], output: str) -> None:
    """The report as JSON at a path or fsspec URL, creating its directory."""
    fs, path = fsspec.core.url_to_fs(output)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fsspec.open(output, "w") as handle:
        json.dump(report, handle, indent=2)


def report_path(cfg: RunConfig) -> str:
    """``<output_dir>/<name>-prune/prune.json`` in a directory claimed as ``train`` claims its run directory
    (``-2``, ``-3``, ... when taken), so a second report never overwrites the first; the resolved config sits beside it."""
    run_dir = claim_new_run_dir(cfg.output_dir, f"{cfg.name}-prune")
    write_yaml(to_dict(cfg), f"{run_dir}/config.yaml")
    return f"{run_dir}/prune.json"


def cmd_prune(args: argparse.Namespace) -> int:
    """Entry point of ``python -m launcher prune``."""
    try:
        cfg, shared = split_config(args.config, args.overrides)
        compressions = parse_compressions(args.compressions)
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        if not names:
            raise ConfigError("--methods must name at least one method, e.g. synflow,magnitude,random")
        check_methods(names, shared)
        for name in names:
            method_config(name, 1.0, shared)   # bad values fail here, before any work
        data_shape(cfg.data)
        env = DistEnv.from_environ()
        device = pick_device(cfg.train.device, env)
        backend = pruning_backend(cfg, env, device)
    except (ConfigError, ValueError) as error:
        return fail("config", str(error))
    quiet = (lambda *_: None) if env.rank else (lambda line: print(line, file=sys.stderr))
    try:
        report = run_prune(cfg, names, compressions, shared, env, device, log=quiet)
    except FileNotFoundError as error:
        return fail("data", f"{error} (data-free methods: synflow, magnitude, random)")
    finally:
        backend.shutdown()
    if env.is_main:
        output = args.output or report_path(cfg)
        write_report(report, output)
        print(format_report(report))
        print(f"\nreport written to {output}")
        from launcher.report import plot_layer_collapse, png_next_to

        print(f"layer-collapse plot written to {plot_layer_collapse(report, png_next_to(output))}")
    return 0


def add_prune_command(commands: Any) -> None:
    """Register ``prune`` on the launcher's sub-command parser."""
    prune = commands.add_parser("prune", help="prune at initialisation over methods and compressions (no training)")
    prune.add_argument("config", nargs="?", help="YAML config (its model and data sections are used)")
    prune.add_argument("overrides", nargs="*", help="dotted overrides; sparsity.KEY=VALUE applies to every method")
    prune.add_argument("--methods", default="synflow,magnitude,random", help="comma list of pruning-at-init methods")
    prune.add_argument("--compressions", default="0:6:0.5",
                       help="log10 of 1/density: start:stop:step (stop included) or a comma list")
    prune.add_argument("--output", default=None,
                       help="JSON report path or URL (default: prune.json in a new directory <output_dir>/<name>-prune, "
                            "-2, -3, ... as train's run directories)")
    prune.set_defaults(run=cmd_prune)
