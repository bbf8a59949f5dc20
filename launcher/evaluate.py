"""``python -m launcher evaluate RUN_DIR_OR_CHECKPOINT [--corruptions DIR] [key=value ...]``: clean and corrupted test
accuracy of a trained model.

The checkpoint (a run directory's latest, a checkpoint directory's latest, or a file) carries its config: the model
is rebuilt from it (through the method's ``prepare_model``, so tied-weight models load too), its weights loaded as
saved (pruned weights are zero in them), and the clean test set of the run's data set evaluated. ``--corruptions``
adds a CIFAR-10-C / CIFAR-100-C / Tiny-ImageNet-C directory in the numpy layout: ``labels.npy`` and one
``<corruption>.npy`` per corruption holding all 5 severities stacked (severity s is the s-th fifth of the rows),
each image put through the run's own test pipeline (resize, normalisation). Accuracy per corruption and severity,
the mean per corruption and over everything, are printed and saved as JSON (``<run dir>/robustness.json`` or
``--output``). Overrides such as ``data.root=/data`` apply to the saved config. One process, one device.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common import jsonsafe
from engine.backends import DistEnv, pick_device
from engine.build import build_model
from engine.checkpoint import CheckpointError
from engine.config import ConfigError
from engine.data import build_loaders, check_data_available
from engine.run_config import RunConfig
from engine.trainer import DeviceBatches
from launcher.common import fail, load_run, run_dir_of
from pruning.methods import MethodContext, method_class

SEVERITIES = 5
LAYOUT = ("labels.npy and one <corruption>.npy per corruption, all 5 severities stacked (the CIFAR-10-C layout: "
          "gaussian_noise.npy, shot_noise.npy, ..., labels.npy)")


class CorruptedImages(Dataset):
    """Rows ``[start, stop)`` of a (N, H, W, C) uint8 array (memory-mapped), through the run's test pipeline."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, start: int, stop: int, transform: Callable) -> None:
        self.images, self.labels, self.start, self.stop, self.transform = images, labels, start, stop, transform

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row = self.start + index
        image = np.asarray(self.images[row])
        return self.transform(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)), \
            int(self.labels[row])


def corruption_files(directory: str) -> tuple[str, list[str]]:
    """(labels.npy, sorted corruption files) of ``directory``; FileNotFoundError naming the layout otherwise."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--corruptions {directory} is not a directory; it must hold {LAYOUT}")
    names = sorted(n for n in os.listdir(directory) if n.endswith(".npy") and n != "labels.npy")
    labels = os.path.join(directory, "labels.npy")
    missing = ([] if os.path.isfile(labels) else ["labels.npy"]) + ([] if names else ["<corruption>.npy"])
    if missing:
        raise FileNotFoundError(f"--corruptions {directory} lacks {' and '.join(missing)}; it must hold {LAYOUT}")
    return labels, [os.path.join(directory, n) for n in names]


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device_batches: DeviceBatches,
             device: torch.device) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` (eval mode) over ``batches``."""
    correct, loss, seen = 0, 0.0, 0
    for inputs, targets in batches:
        outputs = model(device_batches.inputs(inputs)).float()
        targets = targets.to(device)
        correct += int((outputs.argmax(1) == targets).sum())
        loss += float(nn.functional.cross_entropy(outputs, targets, reduction="sum"))
        seen += targets.numel()
    return {"acc": correct / max(1, seen), "loss": loss / max(1, seen), "samples": seen}


def evaluate(path: str, corruptions: str | None, overrides: list[str], output: str | None = None,
             batch_size: int | None = None) -> dict[str, Any]:
    """Evaluate the checkpoint at ``path`` on its clean test set (and ``corruptions``); returns what is saved."""
    url, state, cfg = load_run(path, overrides)
    files = corruption_files(corruptions) if corruptions else None
    check_data_available(cfg.data)
    device = pick_device(cfg.train.device, DistEnv())
    loaders = build_loaders(cfg.data, seed=cfg.seed, device=device)
    spec = loaders.spec
    model = build_model(cfg.model, spec, device)
    context = MethodContext(seed=cfg.seed, device=device, input_shape=(spec.channels, spec.image_size,
                                                                       spec.image_size))
    model = method_class(cfg.sparsity.method).prepare_model(cfg.sparsity, model, context)
    model.load_state_dict(state["model"])
    model.eval()
    device_batches = DeviceBatches(loaders, device, channels_last=False)
    result: dict[str, Any] = {"checkpoint": url, "epoch": state.get("epoch"),
                              "clean": accuracy(model, loaders.test, device_batches, device)}
    if files is not None:
        result.update(_corrupted(model, files, loaders, cfg, device_batches, device, batch_size))
    target = output or _default_output(url)
    with fsspec.open(target, "w") as handle:
        jsonsafe.dump(result, handle, indent=2)
    result["saved_to"] = target
    return result


def _corrupted(model: nn.Module, files: tuple[str, list[str]], loaders: Any, cfg: RunConfig,
               device_batches: DeviceBatches, device: torch.device, batch_size: int | None) -> dict[str, Any]:
    """Accuracy per corruption and severity, the mean per corruption, per severity and over all of them."""
    transform = getattr(loaders.test.dataset, "transform", None)
    if transform is None:
        raise ValueError(f"data set {cfg.data.name!r} has no image pipeline to put corrupted images through; "
                         "--corruptions needs an image data set (cifar10, cifar100, svhn, tinyimagenet)")
    labels_file, corruption_paths = files
    labels = np.load(labels_file)
    per: dict[str, list[float]] = {}
    for path in corruption_paths:
        images = np.load(path, mmap_mode="r")
        name = os.path.basename(path)[:-4]
        if len(images) != len(labels) or len(labels) % SEVERITIES:
            raise ValueError(f"{path} holds {len(images)} images and labels.npy {len(labels)} labels; both must be "
                             f"the same multiple of {SEVERITIES} (all severities stacked)")
        if images.ndim == 3:
            images = images[..., None]
        chunk = len(labels) // SEVERITIES
        per[name] = []
        for severity in range(SEVERITIES):
            data = CorruptedImages(images, labels, severity * chunk, (severity + 1) * chunk, transform)
            loader = DataLoader(data, batch_size=batch_size or cfg.data.resolved_eval_batch_size,
                                num_workers=cfg.data.num_workers)
            per[name].append(accuracy(model, loader, device_batches, device)["acc"])
    every = [acc for accs in per.values() for acc in accs]
    return {"corruptions": per, "mean_per_corruption": {n: float(np.mean(a)) for n, a in per.items()},
            "mean_per_severity": [float(np.mean([a[s] for a in per.values()])) for s in range(SEVERITIES)],
            "mean_corruption_acc": float(np.mean(every))}


def _default_output(url: str) -> str:
    """<run dir>/robustness.json for a checkpoint under <run dir>/checkpoints/, else beside the checkpoint."""
    return f"{run_dir_of(url)}/robustness.json"


def format_result(result: dict[str, Any]) -> str:
    """The printed table: clean accuracy, then one row per corruption (severities 1-5 and mean) and the means."""
    clean = result["clean"]
    lines = [f"checkpoint  {result['checkpoint']} (epoch {result.get('epoch')})",
             f"clean test accuracy  {100 * clean['acc']:.2f}%  (loss {clean['loss']:.4f}, {clean['samples']} images)"]
    if "corruptions" in result:
        width = max(len("corruption"), *(len(n) for n in result["corruptions"]))
        head = "".join(f"{f's{s + 1}':>8}" for s in range(SEVERITIES))
        lines += ["", f"{'corruption':<{width}}{head}{'mean':>8}"]
        for name, accs in result["corruptions"].items():
            cells = "".join(f"{100 * a:>8.2f}" for a in accs)
            lines.append(f"{name:<{width}}{cells}{100 * result['mean_per_corruption'][name]:>8.2f}")
        cells = "".join(f"{100 * a:>8.2f}" for a in result["mean_per_severity"])
        lines.append(f"{'mean':<{width}}{cells}{100 * result['mean_corruption_acc']:>8.2f}")
    lines.append(f"saved to  {result['saved_to']}")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Entry point of ``python -m launcher evaluate``."""
    try:
        result = evaluate(args.checkpoint, args.corruptions, list(args.overrides), args.output, args.batch_size)
    except ConfigError as error:
        return fail("config", str(error))
    except FileNotFoundError as error:
        return fail("evaluate", str(error).removeprefix("resume: "))
    except (CheckpointError, ValueError) as error:
        return fail("evaluate", str(error))
    print(format_result(result))
    return 0


def add_evaluate_command(commands: argparse._SubParsersAction) -> None:
    """Register ``evaluate`` on the launcher's sub-command parser."""
    command = commands.add_parser("evaluate", help="clean and corrupted (CIFAR-10-C layout) test accuracy of a run")
    command.add_argument("checkpoint", help="a run directory, a checkpoint directory or a checkpoint file")
    command.add_argument("overrides", nargs="*", help="dotted overrides of the saved config, e.g. data.root=/data")
    command.add_argument("--corruptions", help="directory with labels.npy and one <corruption>.npy per corruption")
    command.add_argument("--output", help="where to save the JSON (default: <run dir>/robustness.json)")
    command.add_argument("--batch-size", type=int, help="evaluation batch size (default: the run's)")
    command.set_defaults(run=cmd_evaluate)
