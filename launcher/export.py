"""``python -m launcher export RUN_DIR_OR_CHECKPOINT --format dense|compact|csr|hashed|2:4 [--out URL] [--bench]``.

The checkpoint (found as ``evaluate`` finds it, loaded with ``weights_only=True``) carries its config; the model is
rebuilt from it without reading any data (``data_shape`` answers the input shape), its weights loaded, and written in
the chosen format (``pruning.export``) to ``--out`` (any fsspec URL; default ``<run dir>/export/<format>``):
``model.safetensors`` and ``export.json`` (model name, options, input shape, format details). ``load_export`` turns
such a directory back into a runnable model. ``csr`` times every candidate layer on ``--device`` at
``--timing-batch`` and prints the choice per layer. ``2:4`` (CUDA only, ``--device`` cuda by default) converts the
linears that keep at most 2 of every 4 inputs to torch's semi-structured tensors in ``--precision`` and checks the
output against the masked model; on a machine without CUDA it stops with a one-line error before loading anything.
``--bench`` then times the masked dense model against the export (``benchmarks/inference.py``, run from the
repository) at batch 1 and ``--serving-batch``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

import models
from engine.backends import DistEnv, pick_device
from engine.build import build_model
from engine.checkpoint import CheckpointError
from engine.config import ConfigError
from engine.data import data_shape
from launcher.common import fail, load_run, run_dir_of
from pruning.export import (FORMATS, compact, csr_tensors, export_semi, hashed_tensors, load_csr, load_hashed,
                            load_semi, native, plain_model, read_export, require_cuda, shrink, sparsify, tensor_bytes,
                            write_export)
from pruning.export.semi import DTYPES, CastInput
from pruning.methods import MethodContext, method_class


def masked_model(path: str, overrides: list[str], device: torch.device | None = None) -> tuple[nn.Module, dict]:
    """(the run's model with its saved weights, eval mode, parametrizations kept; the manifest's common part)."""
    url, state, cfg = load_run(path, overrides)
    shape = data_shape(cfg.data)
    device = device or torch.device("cpu")
    model = build_model(cfg.model, shape, device)
    context = MethodContext(seed=cfg.seed, device=device, input_shape=(shape.channels, shape.image_size,
                                                                       shape.image_size))
    model = method_class(cfg.sparsity.method).prepare_model(cfg.sparsity, model, context)
    model.load_state_dict(state["model"])
    manifest = {"model": {"name": cfg.model.name, "options": dict(cfg.model.options)},
                "input": {"channels": shape.channels, "image_size": shape.image_size,
                          "num_classes": shape.num_classes},
                "source": {"checkpoint": url, "epoch": state.get("epoch"), "method": cfg.sparsity.method},
                "torch": torch.__version__}
    return model.eval(), manifest


def example_input(manifest: dict[str, Any], batch: int, device: torch.device | str = "cpu",
                  seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal batch of the model's input shape."""
    shape = manifest["input"]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, shape["channels"], shape["image_size"], shape["image_size"],
                       generator=generator).to(device)


def export_model(model: nn.Module, manifest: dict[str, Any], fmt: str, device: torch.device,
                 timing_batch: int = 64, choice: str = "auto", report: Any = print, precision: str = "bf16",
                 convert: bool = True) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """(the exported model on ``device``, its tensors, its manifest) of a loaded run ``model`` in format ``fmt``;
    ``precision`` and ``convert`` (false: 2:4 layers as dense half weights, to check on a CPU) are 2:4's."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not known; choose one of {', '.join(FORMATS)}")
    plain = plain_model(model).to(device).eval()
    manifest = {**manifest, "format": fmt}
    if fmt == "2:4":
        exported, tensors, details = export_semi(plain, example_input(manifest, 8, device), precision, device,
                                                 convert, report)
        return exported, tensors, {**manifest, **details}
    if fmt == "dense":
        return plain, dict(plain.state_dict()), manifest
    if fmt == "hashed":
        tensors, layers = hashed_tensors(model, plain)
        return plain, tensors, {**manifest, "layers": layers}
    if fmt == "compact":
        groups, biased = compact(plain, example_input(manifest, 2, device))
        for group in groups:
            report(group.line())
        if not any(group.removed for group in groups):
            raise ValueError("--format compact found no empty unit (an all-zero row or filter) to remove; it is for "
                             "unit and structured pruning runs; use --format csr for unstructured masks")
        removed = {group.root: group.channels_removed for group in groups if group.removed}
        return plain, dict(plain.state_dict()), {**manifest, "removed": removed, "biased": biased}
    verdicts = sparsify(plain, example_input(manifest, timing_batch, device), choice)
    if torch.device(device).type == "cpu" and native.kernel() is None:
        report(f"the project's CSR kernel is not built here ({native.unavailable_reason()}): torch's kernels only")
    for verdict in verdicts:
        report(verdict.line())
    tensors, layers = csr_tensors(plain)
    return plain, tensors, {**manifest, "layers": layers, "timed_on": {"device": str(device), "batch": timing_batch,
                                                                        "threads": torch.get_num_threads()}}


def load_export(url: str, device: torch.device | str = "cpu", convert: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """(the runnable model, the manifest) of an export directory; tensors loaded with safetensors only. A 2:4
    export needs CUDA unless ``convert`` is false (its 2:4 layers then run as dense half weights)."""
    tensors, manifest = read_export(url)
    shape = manifest["input"]
    model = models.build_model(manifest["model"]["name"], in_channels=shape["channels"],
                               image_size=shape["image_size"], num_classes=shape["num_classes"],
                               **manifest["model"]["options"])
    if manifest["format"] in ("dense", "compact"):
        if manifest["format"] == "compact":
            shrink(model, example_input(manifest, 2), manifest["removed"], manifest["biased"])
        model.load_state_dict(tensors, strict=True)
    elif manifest["format"] == "hashed":
        load_hashed(model, tensors, manifest["layers"])
    elif manifest["format"] == "2:4":
        return load_semi(model, tensors, manifest["layers"], DTYPES[manifest["precision"]], device, convert), manifest
    else:
        load_csr(model, tensors, manifest["layers"])
    return model.to(device).eval(), manifest


def default_out(checkpoint: str, fmt: str) -> str:
    """<run dir>/export/<format> (2:4 as 2of4) for a checkpoint under <run dir>/checkpoints/, else beside it."""
    return f"{run_dir_of(checkpoint)}/export/{fmt.replace(':', 'of')}"


def export(path: str, fmt: str, out: str | None = None, overrides: list[str] | None = None,
           device: str | None = None, timing_batch: int = 64, choice: str = "auto", report: Any = print,
           precision: str = "bf16") -> dict[str, Any]:
    """Export the run at ``path``; returns where it went, the file sizes and the weights' bytes dense vs exported.
    ``device`` None: cuda for 2:4, else the CPU."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not known; choose one of {', '.join(FORMATS)}")
    device = device or ("cuda" if fmt == "2:4" else "cpu")
    if fmt == "2:4":
        require_cuda(device)           # before the checkpoint is read: the one-line answer on a CPU-only machine
        if precision not in DTYPES:
            raise ValueError(f"--precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    target = pick_device(device, DistEnv())
    model, manifest = masked_model(path, overrides or [], target)
    exported, tensors, manifest = export_model(model, manifest, fmt, target, timing_batch, choice, report, precision)
    dense_bytes = tensor_bytes(dict(plain_model(model).state_dict()))
    manifest["bytes"] = {"dense": dense_bytes, "exported": tensor_bytes(tensors)}
    out = out or default_out(manifest["source"]["checkpoint"], fmt)
    sizes = write_export(out, tensors, manifest)
    return {"out": out, "files": sizes, "bytes": manifest["bytes"], "model": model, "exported": exported,
            "manifest": manifest, "device": target}


def cmd_export(args: argparse.Namespace) -> int:
    """Entry point of ``python -m launcher export``."""
    for flag, value in (("--threads", args.threads), ("--timing-batch", args.timing_batch),
                        ("--serving-batch", args.serving_batch), ("--rounds", args.rounds)):
        if value is not None and value < 1:
            return fail("export", f"{flag} must be at least 1, got {value}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        result = export(args.checkpoint, args.format, args.out, list(args.overrides), args.device,
                        args.timing_batch or args.serving_batch, "auto" if args.csr_layers == "timed" else "sparse",
                        precision=args.precision)
    except ConfigError as error:
        return fail("config", str(error))
    except FileNotFoundError as error:
        return fail("export", str(error).removeprefix("resume: "))
    except (CheckpointError, ValueError) as error:
        return fail("export", str(error))
    sizes = result["bytes"]
    print(f"exported {args.format} to {result['out']}: weights {sizes['exported'] / 1e6:.3f} MB "
          f"(dense {sizes['dense'] / 1e6:.3f} MB, {sizes['dense'] / max(1, sizes['exported']):.2f}x smaller)")
    if args.bench:
        from benchmarks.inference import compare, format_rows

        entries = {"dense": (plain_model(result["model"]).to(result["device"]), sizes["dense"]),
                   args.format: (result["exported"], sizes["exported"])}
        if args.format == "2:4":   # the same precision dense too: how much of the gain is the 2:4 kernel's
            dtype = DTYPES[args.precision]
            half = CastInput(plain_model(result["model"]).to(result["device"], dtype), dtype).eval()
            entries = {"dense": entries["dense"], f"dense {args.precision}": (half, sizes["dense"] // 2),
                       "2:4": entries["2:4"]}
        one_cpu_thread = result["device"].type == "cpu" and torch.get_num_threads() == 1
        rows = compare(entries, result["manifest"], [1, args.serving_batch], result["device"], rounds=args.rounds,
                       clock=time.thread_time if one_cpu_thread else None)   # CPU time: a shared machine's waits
        print("timed: " + ("CPU time of the one torch thread" if one_cpu_thread else "elapsed time"))
        print(format_rows(rows, result["manifest"]["model"]["name"]))
    return 0


def add_export_command(commands: argparse._SubParsersAction) -> None:
    """Register ``export`` on the launcher's sub-command parser."""
    command = commands.add_parser("export", help="write a trained sparse model as dense/compact/csr/hashed/2:4 "
                                                 "safetensors")
    command.add_argument("checkpoint", help="a run directory, a checkpoint directory or a checkpoint file")
    command.add_argument("overrides", nargs="*", help="dotted overrides of the saved config")
    command.add_argument("--format", required=True, choices=FORMATS, help="the exported form")
    command.add_argument("--out", help="output directory or fsspec URL (default: <run dir>/export/<format>)")
    command.add_argument("--device", help="device the csr layers are timed and benchmarked on, and 2:4 converted on "
                         "(default: cuda for 2:4, else cpu)")
    command.add_argument("--precision", choices=tuple(DTYPES), default="bf16", help="2:4: the half precision")
    command.add_argument("--timing-batch", type=int, help="batch of the csr per-layer timing (default: serving batch)")
    command.add_argument("--csr-layers", choices=("timed", "all"), default="timed",
                         help="csr: keep the faster form per layer (timed) or make every layer with zeros csr (all)")
    command.add_argument("--threads", type=int, help="torch CPU threads for timing (1 on a shared machine)")
    command.add_argument("--bench", action="store_true", help="time dense vs exported at batch 1 and serving batch")
    command.add_argument("--serving-batch", type=int, default=256, help="the serving batch of --bench")
    command.add_argument("--rounds", type=int, default=30, help="interleaved rounds of --bench")
    command.set_defaults(run=cmd_export)
