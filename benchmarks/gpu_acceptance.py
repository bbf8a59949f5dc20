"""GPU acceptance run: everything the CUDA paths owe, measured in one process tree inside one short GPU lease.

Sections, in this order (each skipped with a note when the time budget would not cover it, so one lease always
ends with a JSON):

1. ``tests``: ``pytest -m gpu tests/test_gpu.py`` in a subprocess (masks under bf16 / fp16 with the scaler's
   skipped steps, channels_last, torch.compile, device normalisation, DeepSpeed ZeRO 1/2 in bf16 and fp16 with RigL,
   two ranks sharing the GPU, resume equality); results parsed from its JUnit XML.
2. ``prune_at_init``: seconds of SynFlow (100 iterations) and SNIP (10 samples per class over 1,000 classes) on
   ResNet-50 at 224 px, scoring batches made on the device.
3. ``throughput``: images/s of ResNet-50 (bf16 autocast, channels_last) and ViT-S/16 (bf16) at batch 256, synthetic
   batches on the device; dense vs static 90% (random ERK) vs RigL (ERK, update every 100 steps), eager and
   compiled, interleaved: each round runs a chunk of steps of every variant, the order rotating, timed with CUDA
   events. The measured steps are a whole number of update periods, so RigL's updates are inside them; ratios are
   to the dense variant of the same mode, from the same rounds.
4. ``loader``: the dense ResNet-50 step fed by the real loader (``imagenet_shards`` over synthetic JPEG tar shards,
   uint8 batches normalised on the device), next to the loader alone: is data loading the bound?
5. ``sparse_24``: the project's ``--format 2:4`` export (``pruning.export.semi``) of a ViT MLP block and
   ResNet-50's classifier, pruned 2:4 by the N:M scope: output error against fp32, and dense fp32 / dense bf16 / 2:4
   bf16 timed interleaved. Beside it, torch's own semi-structured kernel on the ViT MLP and ResNet-50 linear and 1x1
   shapes (forward, bf16), the ceiling such an export can reach.

The sections' code is in ``benchmarks/gpu_sections.py``; this file holds the JSON schema, the goals, the report and
the driver. Writes ``gpu_acceptance.json`` (after every section, so a killed run still leaves what it measured) and
a short ``gpu_acceptance.txt`` table under ``--out``. ``--dry-run`` runs the same code on the CPU with tiny models
and sizes (CI runs it: ``tests/test_gpu_acceptance_dry_run.py``); its JSON has exactly the keys of the GPU run's.

    bash benchmarks/gpu_acceptance.sh                                   # on the GPU machine (installs .whl/)
    python3 -m benchmarks.gpu_acceptance --out runs/gpu --budget-s 420
    python3 -m benchmarks.gpu_acceptance --dry-run --out /tmp/gpu-dry
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_sections import (MODES, SLOTS, VARIANTS, Budget, Plan, run_loader, run_prune_at_init,
                                     run_sparse_24, run_tests, run_throughput, write_jpeg_shards)

__all__ = ["SCHEMA", "SECTIONS", "expected_keys", "key_paths", "main", "skeleton", "write_jpeg_shards"]

SCHEMA = "sparsetrain/gpu_acceptance/1"
SECTIONS = ("tests", "prune_at_init", "throughput", "loader", "sparse_24")
GOALS = {   # issue: masked static >= 99% of dense, RigL >= 97%, dense ResNet-50 >= 3,000 images/s, SynFlow < 10 s
    "static_vs_dense": 0.99,
    "rigl_vs_dense": 0.97,
    "resnet50_dense_images_per_s": 3000.0,
    "synflow_resnet50_s": 10.0,
}
LOWER_IS_BETTER = {"synflow_resnet50_s"}


# ------------------------------------------------------------------------------------------------ the JSON schema
def _variant_record() -> dict[str, Any]:
    return {"ms_per_step": None, "images_per_s": None, "vs_dense": None, "vs_dense_median": None,
            "vs_dense_iqr": None, "rigl_updates": None, "update_extra_ms": None}


def _slot_record() -> dict[str, Any]:
    return {"model": None, "options": None, "image_size": None, "batch_size": None, "channels_last": None,
            "precision": None, "measured_steps": None, "peak_memory_gib": None, "compile_s": None,
            "compiled_speedup": None, "note": None,
            "modes": {mode: {variant: _variant_record() for variant in VARIANTS} for mode in MODES}}


def skeleton() -> dict[str, Any]:
    """Every key the run writes, values None: the GPU run and the dry run fill the same tree."""
    section = {"status": "not_run", "note": None, "seconds": None}
    return {
        "meta": {"schema": SCHEMA, "dry_run": None, "argv": None, "started": None, "wall_s": None, "budget_s": None,
                 "device": None, "device_name": None, "capability": None, "memory_gib": None, "cpu_count": None,
                 "python": None, "torch": None, "torchvision": None, "cuda": None, "cudnn": None, "nccl": None,
                 "deepspeed": None, "plan": None},
        "tests": {**section, "exit_code": None, "passed": None, "failed": None, "errors": None, "skipped": None,
                  "cases": None, "log_tail": None},
        "prune_at_init": {**section, "model": None, "image_size": None, "num_classes": None,
                          "synflow": {"iterations": None, "seconds": None, "float64_iterations": None,
                                      "density": None},
                          "snip": {"samples_per_class": None, "classes": None, "samples": None, "seconds": None,
                                   "density": None}},
        "throughput": {**section, "settings": None, **{slot: _slot_record() for slot in SLOTS}},
        "loader": {**section, "model": None, "batch_size": None, "num_workers": None, "shards": None,
                   "unique_images": None, "jpeg_size": None, "steps": None, "loader_images_per_s": None,
                   "train_images_per_s": None, "device_synthetic_images_per_s": None, "vs_device_synthetic": None,
                   "bound": None},
        "sparse_24": {**section, "export": None, "kernel_reference": None},
        "goals": {name: {"goal": None, "value": None, "met": None} for name in _goal_names()},
    }


def _goal_names() -> list[str]:
    names = []
    for mode in MODES:
        names.append(f"resnet50_dense_images_per_s_{mode}")
        for slot in SLOTS:
            names += [f"{slot}_static_vs_dense_{mode}", f"{slot}_rigl_vs_dense_{mode}"]
    return names + ["synflow_resnet50_s"]


# Free-form values (their keys differ between the dry run and the GPU run by design): leaves of the schema.
OPAQUE = {"meta.plan", "throughput.settings", "sparse_24.export",
          *(f"throughput.{slot}.options" for slot in SLOTS)}


def key_paths(tree: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every key in nested dicts; lists, scalars and the OPAQUE paths are leaves."""
    if not isinstance(tree, dict) or prefix in OPAQUE:
        return set()
    out = set()
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        out.add(path)
        out |= key_paths(value, path)
    return out


def expected_keys() -> set[str]:
    return key_paths(skeleton())


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------------- report
def fill_goals(result: dict[str, Any]) -> None:
    throughput = result["throughput"]
    goals = result["goals"]
    for mode in MODES:
        dense = throughput["resnet50"]["modes"][mode]["dense"]["images_per_s"]
        _goal(goals[f"resnet50_dense_images_per_s_{mode}"], dense, GOALS["resnet50_dense_images_per_s"], above=True)
        for slot in SLOTS:
            variants = throughput[slot]["modes"][mode]
            _goal(goals[f"{slot}_static_vs_dense_{mode}"], variants["static"]["vs_dense"], GOALS["static_vs_dense"],
                  above=True)
            _goal(goals[f"{slot}_rigl_vs_dense_{mode}"], variants["rigl"]["vs_dense"], GOALS["rigl_vs_dense"],
                  above=True)
    _goal(goals["synflow_resnet50_s"], result["prune_at_init"]["synflow"]["seconds"], GOALS["synflow_resnet50_s"],
          above="synflow_resnet50_s" not in LOWER_IS_BETTER)


def _goal(entry: dict[str, Any], value: float | None, goal: float, above: bool) -> None:
    entry["goal"] = goal
    entry["value"] = value
    entry["met"] = None if value is None else (value >= goal if above else value < goal)


def text_table(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [f"sparsetrain GPU acceptance{' (DRY RUN, CPU, tiny sizes)' if meta['dry_run'] else ''}: "
             f"{meta['device_name'] or meta['device']}, torch {meta['torch']}, CUDA {meta['cuda']}, "
             f"deepspeed {meta['deepspeed']}; {meta['wall_s']:.0f} s of a {meta['budget_s']:.0f} s budget"]
    tests = result["tests"]
    lines.append(f"tests [{tests['status']}]: {tests['passed']} passed, {tests['failed']} failed, "
                 f"{tests['errors']} errors, {tests['skipped']} skipped ({tests['seconds']} s)"
                 if tests["status"] != "skipped" else f"tests [skipped]: {tests['note']}")
    for case in tests["cases"] or []:
        if case["outcome"] in ("failed", "error"):
            lines.append(f"  {case['outcome'].upper()} {case['name']}: {(case['message'] or '')[:160]}")
    throughput = result["throughput"]
    lines.append(f"throughput [{throughput['status']}], images/s (ratio to dense of the same mode, same rounds):")
    for slot in SLOTS:
        entry = throughput[slot]
        if entry["model"] is None:
            lines.append(f"  {slot}: {entry['note']}")
            continue
        head = (f"  {slot} ({entry['model']}, {entry['image_size']} px, batch {entry['batch_size']}, "
                f"{entry['precision']}{', channels_last' if entry['channels_last'] else ''}, "
                f"{entry['measured_steps']} steps each)")
        lines.append(head)
        for kind in VARIANTS:
            cells = []
            for mode in MODES:
                v = entry["modes"][mode][kind]
                cells.append(f"{mode} {v['images_per_s']:>9.1f} ({v['vs_dense']:.3f})" if v["images_per_s"]
                             else f"{mode} {'-':>9} (-----)")
            updates = entry["modes"]["eager"][kind]["rigl_updates"]
            lines.append(f"    {kind:<7} " + "   ".join(cells) + (f"   updates {updates}" if updates else ""))
    loader = result["loader"]
    if loader["status"] == "ok":
        lines.append(f"loader: {loader['num_workers']} workers, loader alone {loader['loader_images_per_s']} "
                     f"images/s, dense training on it {loader['train_images_per_s']} images/s vs "
                     f"{loader['device_synthetic_images_per_s']} on device data (bound: {loader['bound']})")
    else:
        lines.append(f"loader [{loader['status']}]: {loader['note']}")
    prune = result["prune_at_init"]
    if prune["status"] == "ok":
        lines.append(f"prune at init ({prune['model']}): SynFlow {prune['synflow']['iterations']} iterations "
                     f"{prune['synflow']['seconds']} s (float64 iterations {prune['synflow']['float64_iterations']});"
                     f" SNIP {prune['snip']['samples_per_class']}/class x {prune['snip']['classes']} classes "
                     f"{prune['snip']['seconds']} s")
    else:
        lines.append(f"prune at init [{prune['status']}]: {prune['note']}")
    sparse = result["sparse_24"]
    lines.append(f"2:4 [{sparse['status']}]: {sparse['note']}")
    for entry in sparse["export"] or []:
        lines.append(f"  2:4 export, {entry['block']}: " + (
            f"{entry['speedup_vs_bf16']}x over dense bf16, {entry['speedup_vs_fp32']}x over fp32, "
            f"error {entry['rel_error']}" if "speedup_vs_bf16" in entry else
            entry.get("error") or entry.get("note") or f"error {entry.get('rel_error')} (not timed)"))
    for entry in sparse["kernel_reference"] or []:
        lines.append(f"  torch 2:4 kernel, {entry['layer']}: " + (f"{entry['speedup']}x over dense"
                     if "speedup" in entry else entry.get("error") or entry.get("note", "")))
    lines.append("goals" + (" (dry run: tiny sizes on a CPU, not judged)" if meta["dry_run"] else "") + ":")
    for name, g in result["goals"].items():
        verdict = "MET" if g["met"] else "missed" if g["met"] is False else "not measured"
        comparison = "<" if name in LOWER_IS_BETTER else ">="
        value = "-" if g["value"] is None else g["value"]
        lines.append(f"  {name:<40} {value:>10} (goal {comparison} {g['goal']}): {verdict}")
    return "\n".join(lines)


def device_meta(device: torch.device) -> dict[str, Any]:
    meta: dict[str, Any] = {"device": str(device), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                            "torch": torch.__version__, "torchvision": _version("torchvision"),
                            "cuda": torch.version.cuda, "deepspeed": _version("deepspeed"),
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1))
        try:
            version = torch.cuda.nccl.version()
            meta["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception:   # a build without NCCL
            meta["nccl"] = None
    return meta


# ------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_acceptance.json / .txt and the test logs")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models and sizes (what CI runs)")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (GPU 420 s, dry run 300 s)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    parser.add_argument("--device", default=None, help="default: cuda (GPU run), cpu (dry run)")
    args = parser.parse_args(argv)
    plan = Plan.dry() if args.dry_run else Plan.gpu()
    budget = Budget(args.budget_s or (300.0 if args.dry_run else 420.0))
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; pass --dry-run to run the CPU version")
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.dry_run:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = skeleton()
    result["meta"].update(device_meta(device), dry_run=args.dry_run, argv=sys.argv[1:] if argv is None else argv,
                          started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), budget_s=budget.total,
                          plan={**asdict(plan), "models": {k: [n, o] for k, (n, o) in plan.models.items()}})
    json_path = out / "gpu_acceptance.json"

    def save() -> None:
        result["meta"]["wall_s"] = round(budget.elapsed(), 1)
        json_path.write_text(json.dumps(result, indent=2, default=str))

    runners: dict[str, Callable[[dict[str, Any]], None]] = {
        "tests": lambda rec: run_tests(plan, out, budget, rec),
        "prune_at_init": lambda rec: run_prune_at_init(plan, device, rec),
        "throughput": lambda rec: run_throughput(plan, device, budget, rec),
        "loader": lambda rec: run_loader(plan, device, rec,
                                         result["throughput"]["resnet50"]["modes"]["eager"]["dense"]["images_per_s"]),
        "sparse_24": lambda rec: run_sparse_24(plan, device, budget, rec),
    }
    failed = []
    for name in SECTIONS:
        record = result[name]
        estimate = plan.estimates_s.get(name, plan.estimates_s["throughput_eager"] * len(SLOTS))
        if name not in wanted:
            record.update(status="skipped", note="not asked for (--sections)")
        elif not budget.allows(estimate):
            record.update(status="skipped", note=f"time budget: {budget.left():.0f} s left, needs about "
                                                 f"{estimate:.0f} s")
        else:
            print(f"[{budget.elapsed():6.1f} s] {name} ...", flush=True)
            started = time.perf_counter()
            try:
                runners[name](record)
            except Exception as error:   # one broken section must not cost the lease the other sections
                import traceback

                record["status"] = "error"
                record["note"] = f"{type(error).__name__}: {error}"[:1000]
                traceback.print_exc()
                failed.append(name)
            record["seconds"] = round(time.perf_counter() - started, 1)
            if record["status"] == "failed":
                failed.append(name)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        fill_goals(result)
        save()
    missing, extra = expected_keys() - key_paths(result), key_paths(result) - expected_keys()
    if missing or extra:   # the schema is the contract with the dry run: fail loudly if a section broke it
        print(f"JSON keys differ from the schema: missing {sorted(missing)}, extra {sorted(extra)}", file=sys.stderr)
        return 3
    table = text_table(result)
    (out / "gpu_acceptance.txt").write_text(table + "\n")
    print(table)
    print(f"wrote {json_path} ({len(expected_keys())} keys, schema {SCHEMA}) and {out / 'gpu_acceptance.txt'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
