"""CUDA paths that CI cannot run (it has no GPU): marked ``gpu`` and skipped without CUDA (tests/conftest.py); a lent
GPU machine runs them through ``benchmarks/gpu_acceptance.py``.

Every test checks the masks, not just that a run finishes: pruned weights exactly zero (and finite) in the
checkpointed weights (DeepSpeed's fp32 masters under ZeRO), static masks identical to the ones a CPU fp32 run builds
from the same seed, RigL's updates present and conserving the active count, resumed runs equal to uninterrupted
ones bit for bit. Covered: bf16 and fp16 autocast (fp16 also with the GradScaler skipping overflowed steps),
channels_last, torch.compile, device-side normalisation of uint8 batches, DeepSpeed ZeRO 1 and 2 in bf16 and fp16
with RigL, two ranks sharing the one GPU (NCCL when it allows that, else gloo), and resume equality.

Run by hand on a GPU machine: ``python3 -m pytest -m gpu tests/test_gpu.py -q``. This file is also the worker of
the two-rank check (``torchrun ... tests/test_gpu.py OUT BACKEND``).
"""

from __future__ import annotations

import os

# cuBLAS is deterministic only with a fixed workspace; it reads this when its first handle is made, after collection.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models  # noqa: E402
from engine.data import DataConfig, build_loaders  # noqa: E402
from engine.optim import OptimConfig, build_optimizer  # noqa: E402
from engine.run_config import load_config  # noqa: E402
from engine.trainer import train  # noqa: E402
from pruning.methods import MethodContext, build_method, method_class  # noqa: E402

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]

SYNTHETIC = ["data.name=synthetic", "data.batch_size=32",
             "data.options={channels: 3, image_size: 32, num_classes: 10, train_size: 512, test_size: 64}"]
COMMON = ["monitor.progress=false", "monitor.tensorboard=false", "optim.lr=0.05", "train.epochs=2",
          "train.max_steps_per_epoch=6", "checkpoint.keep=4"]
RESNET = ["model.name=resnet18", "model.options.stem=cifar"]
CONV = ["model.name=conv", "model.options.width=16"]
MLP = ["model.name=mlp", "model.options.hidden=[256, 128]"]
MAGNITUDE = ["sparsity.method=magnitude", "sparsity.density=0.1", "sparsity.scope=layer",
             "sparsity.distribution=erk"]
RIGL = ["sparsity.method=rigl", "sparsity.density=0.1", "sparsity.distribution=erk", "sparsity.period=2"]
CUDA = ["train.device=cuda"]
DEVICE = torch.device("cuda")
DETERMINISTIC = ["train.deterministic=true"]


# ------------------------------------------------------------------------------------------------------ helpers
def run(out: Path, name: str, *overrides: str, data: tuple[str, ...] | list[str] | None = None
        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train through the public entry point (synthetic data unless ``data`` says otherwise); (summary, every kept
    checkpoint, oldest first)."""
    data = SYNTHETIC if data is None else data
    summary = train(load_config(None, [f"output_dir={out}", f"name={name}", *data, *COMMON, *overrides]))
    return summary, checkpoints(Path(summary["run_dir"]))


def checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    paths = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))
    assert paths, f"no checkpoint in {run_dir}"
    return [torch.load(path, map_location="cpu", weights_only=True) for path in paths]


def assert_masked(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Pruned weights exactly zero and every weight finite; returns the masks."""
    masks = state["masks"]
    assert masks, "the checkpoint holds no masks"
    for name, mask in masks.items():
        weight = state["model"][name]
        assert torch.isfinite(weight).all(), f"{name}: non-finite weights"
        assert (weight[~mask] == 0).all(), f"{name}: {int((weight[~mask] != 0).sum())} pruned weights are not zero"
        assert (weight[mask] != 0).any(), f"{name}: every kept weight is zero"
    return masks


def assert_same_masks(masks: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert set(masks) == set(reference)
    for name, mask in masks.items():
        assert torch.equal(mask, reference[name]), f"{name}: mask differs from the reference"


def active(masks: dict[str, torch.Tensor]) -> int:
    return sum(int(mask.sum()) for mask in masks.values())


@pytest.fixture(scope="module")
def cpu_masks(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Masks a CPU fp32 run builds at set-up from the same seed and model (one step, before any update)."""
    cache: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    def get(*overrides: str) -> dict[str, torch.Tensor]:
        if overrides not in cache:
            out = tmp_path_factory.mktemp("cpu-reference")
            _, states = run(out, "ref", *overrides, "train.device=cpu", "train.epochs=1",
                            "train.max_steps_per_epoch=1")
            cache[overrides] = assert_masked(states[-1])
        return cache[overrides]
    return get


def _backend_classes() -> tuple[Any, Any]:
    from engine.backends import Backend, DistEnv

    return Backend, DistEnv


# ------------------------------------------------------------------------------------------------ autocast, layout
@pytest.mark.parametrize("precision,channels_last", [("bf16", False), ("fp16", False), ("bf16", True)])
def test_static_masks_stay_exact_on_cuda(tmp_path: Path, cpu_masks: Any, precision: str, channels_last: bool,
                                         record_property: Any) -> None:
    reference = cpu_masks(*RESNET, *MAGNITUDE)
    summary, states = run(tmp_path, "static", *RESNET, *MAGNITUDE, *CUDA, f"train.precision={precision}",
                          f"train.channels_last={str(channels_last).lower()}")
    assert summary["steps"] == 12 and len(states) == 2
    for state in states:            # after epoch 1 and after epoch 2
        assert_same_masks(assert_masked(state), reference)
    if precision == "fp16":
        record_property("grad_scaler", json.dumps(states[-1]["backend"].get("scaler"), default=str))


@pytest.mark.parametrize("kind", ["magnitude", "rigl"])
def test_fp16_scaler_skipped_steps_keep_pruned_weights_zero(kind: str, record_property: Any) -> None:
    """The backend's step with a GradScaler that starts far too high: the first steps overflow and are skipped
    (their unscaled gradients are inf, masked to NaN), the later ones apply. Pruned weights and their momentum stay
    exactly zero throughout, skipped steps leave the weights alone, a static mask never moves."""
    Backend, DistEnv = _backend_classes()
    device = DEVICE
    torch.manual_seed(0)
    model = models.build_model("resnet18", in_channels=3, image_size=32, num_classes=10, stem="cifar").to(device)
    backend = Backend(DistEnv(), device, "fp16")
    backend.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**24)
    module = backend.wrap(model)
    optimizer = build_optimizer(model, OptimConfig(lr=0.05))
    extra = {"scope": "layer"} if kind == "magnitude" else {"period": 3}
    config = method_class(kind).Config(method=kind, density=0.1, distribution="erk", **extra)
    method = build_method(config, model, optimizer, MethodContext(device=device, steps_per_epoch=100, epochs=1))
    method.setup()
    backend.attach_masks(method.masks)
    initial = {name: mask.clone() for name, mask in method.masks.items()}
    params = dict(model.named_parameters())
    inputs = torch.randn(32, 3, 32, 32, device=device)
    targets = torch.randint(0, 10, (32,), device=device)
    skipped = applied = 0
    for step in range(30):
        before = {name: p.detach().clone() for name, p in params.items()}
        with backend.autocast():
            loss = F.cross_entropy(module(inputs), targets)
        backend.backward(loss)
        scale = backend.scaler.get_scale()
        backend.step(optimizer, lambda: method.before_step(step))
        method.after_step(step)
        was_skipped = backend.scaler.get_scale() < scale
        skipped += was_skipped
        applied += not was_skipped
        for name, mask in method.masks.items():
            weight = params[name].detach()
            assert torch.isfinite(weight).all(), f"step {step}: {name} has non-finite weights"
            assert (weight[~mask] == 0).all(), f"step {step}: pruned weights of {name} are not zero"
            momentum = optimizer.state.get(params[name], {}).get("momentum_buffer")
            if momentum is not None:   # torch's fused SGD leaves new buffers uninitialised when step 0 is skipped
                assert (momentum[~mask] == 0).all(), (
                    f"step {step} ({'skipped' if was_skipped else 'applied'}): momentum of pruned weights of {name} "
                    f"is not zero (finite: {bool(torch.isfinite(momentum).all())})")
        if kind == "magnitude":
            assert_same_masks(dict(method.masks.items()), initial)
            if was_skipped:
                for name, p in params.items():
                    assert torch.equal(p.detach(), before[name]), f"skipped step {step} moved {name}"
        else:
            assert active(dict(method.masks.items())) == active(initial)
    record_property("skipped_steps", skipped)
    record_property("final_scale", backend.scaler.get_scale())
    assert skipped >= 1, "the scaler never skipped a step: the overflow path went untested"
    assert applied >= 1, "the scaler skipped every step"


def test_rigl_with_channels_last_weights(tmp_path: Path) -> None:
    _, states = run(tmp_path, "rigl-cl", *RESNET, *RIGL, *CUDA, "train.precision=bf16", "train.channels_last=true")
    first, last = (assert_masked(state) for state in states)
    assert states[-1]["method"]["updates"] == 6          # 12 steps, an update every 2
    assert active(first) == active(last)
    assert any(not torch.equal(first[name], last[name]) for name in first), "RigL never changed a mask"


@pytest.mark.parametrize("kind", ["magnitude", "rigl"])
def test_compiled_training_keeps_masks_exact(tmp_path: Path, cpu_masks: Any, kind: str) -> None:
    method = MAGNITUDE if kind == "magnitude" else RIGL
    _, states = run(tmp_path, f"compiled-{kind}", *CONV, *method, *CUDA, "train.precision=bf16",
                    "train.compile=true")
    masks = [assert_masked(state) for state in states]
    if kind == "magnitude":
        for state_masks in masks:
            assert_same_masks(state_masks, cpu_masks(*CONV, *MAGNITUDE))
    else:
        assert states[-1]["method"]["updates"] == 6
        assert active(masks[0]) == active(masks[-1])
        assert any(not torch.equal(masks[0][n], masks[-1][n]) for n in masks[0]), "RigL never changed a mask"


# ---------------------------------------------------------------------------------------- device normalisation
SHARDS, PER_SHARD, CLASSES = 4, 16, 4


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.gpu_acceptance import write_jpeg_shards

    root = tmp_path_factory.mktemp("shards")
    write_jpeg_shards(root, "train", SHARDS, PER_SHARD, (40, 36), CLASSES)
    write_jpeg_shards(root, "val", 1, PER_SHARD, (40, 36), CLASSES, seed=1)
    return root


def _shard_options() -> dict[str, Any]:
    return {"train_shards": [f"train-{i:06d}.tar" for i in range(SHARDS)], "val_shards": ["val-000000.tar"],
            "train_samples": SHARDS * PER_SHARD, "val_samples": PER_SHARD, "num_classes": CLASSES,
            "shuffle_buffer": 8}


def test_device_normalisation_matches_the_loader_normalisation(jpeg_shards: Path) -> None:
    device = DEVICE

    def batches(on_device: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg = DataConfig(name="imagenet_shards", root=str(jpeg_shards), batch_size=8, image_size=32, augment="none",
                         normalize_on_device=on_device, options=_shard_options())
        loaders = build_loaders(cfg, seed=0, device=device)
        out = []
        for x, y in loaders.train:
            if on_device:
                assert x.dtype == torch.uint8 and loaders.device_normalize is not None
                x = loaders.device_normalize(x.to(device))
            else:
                assert x.dtype == torch.float32 and loaders.device_normalize is None
                x = x.to(device)
            out.append((x, y))
        return out

    on, off = batches(True), batches(False)
    assert len(on) == len(off) == SHARDS * PER_SHARD // 8
    for (x_on, y_on), (x_off, y_off) in zip(on, off):
        assert torch.equal(y_on, y_off)
        assert x_on.dtype == torch.float32 and x_on.device.type == device.type
        torch.testing.assert_close(x_on, x_off, atol=1e-5, rtol=1e-5)


def test_training_on_device_normalised_batches(tmp_path: Path, jpeg_shards: Path) -> None:
    options = _shard_options()
    data = ["data.name=imagenet_shards", f"data.root={jpeg_shards}", "data.image_size=32", "data.batch_size=8",
            "data.augment=standard", "data.options.train_shards=[" + ",".join(options["train_shards"]) + "]",
            "data.options.val_shards=[val-000000.tar]", f"data.options.train_samples={options['train_samples']}",
            f"data.options.val_samples={options['val_samples']}", f"data.options.num_classes={CLASSES}",
            "data.options.shuffle_buffer=8"]
    summary, states = run(tmp_path, "shards", *CONV, *RIGL, *CUDA, "train.precision=bf16",
                          "train.max_steps_per_epoch=8", data=data)
    assert summary["steps"] == 16
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["test_loss"] == summary["test_loss"]   # not NaN
    for state in states:
        assert_masked(state)


# ------------------------------------------------------------------------------------------- resume, DeepSpeed
def assert_resume_equal(tmp_path: Path, *overrides: str) -> dict[str, Any]:
    """Two epochs straight, then epoch 2 again from the epoch-1 checkpoint: the same masks, weights and optimizer
    state, bit for bit. Returns the final state."""
    _, states = run(tmp_path, "full", *overrides)
    first, full = states
    assert_masked(first)
    full_masks = assert_masked(full)
    assert full["method"]["updates"] == 4                 # 8 steps, RigL every 2
    ckpt = sorted((tmp_path / "full" / "checkpoints").glob("ckpt-e0001-*.pt"))[0]
    _, again = run(tmp_path, "full", *overrides, f"resume={ckpt}")
    resumed = again[-1]
    assert resumed["step"] == full["step"] and resumed["epoch"] == full["epoch"]
    assert_same_masks(assert_masked(resumed), full_masks)
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), f"{name} differs after resume"
    for index, entry in full["optimizer"]["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                assert torch.equal(value, resumed["optimizer"]["state"][index][key]), f"optimizer {index}.{key}"
    return full


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_single_gpu_resume_is_exact(tmp_path: Path, precision: str) -> None:
    assert_resume_equal(tmp_path, *MLP, *RIGL, *CUDA, *DETERMINISTIC, f"train.precision={precision}",
                        "train.max_steps_per_epoch=4")


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_deepspeed_rigl_masks_exact_and_resume_equal(tmp_path: Path, stage: int, precision: str,
                                                     record_property: Any) -> None:
    pytest.importorskip("deepspeed")
    full = assert_resume_equal(tmp_path, *MLP, *RIGL, *CUDA, *DETERMINISTIC, f"train.precision={precision}",
                               "parallel.backend=deepspeed", f"parallel.zero_stage={stage}",
                               "train.max_steps_per_epoch=4")
    if precision == "fp16":
        record_property("loss_scaler", json.dumps(full["backend"].get("loss_scaler"), default=str))


def _two_rank_run(out: Path, dist_backend: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(out), dist_backend]
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        return subprocess.CompletedProcess(cmd, -9, "", f"timed out after {timeout} s: {error.stderr!r}"[-2000:])


def test_two_ranks_share_the_gpu_under_deepspeed(tmp_path: Path, record_property: Any) -> None:
    """RigL under ZeRO 2 in bf16 on two ranks of the one GPU. NCCL refuses two ranks on one device in recent
    versions; gloo, the fallback, carries CUDA tensors for some collectives only (broadcast, all-reduce), so ZeRO may
    need one it lacks. When both refuse, the test skips with their errors (a limit of the libraries, recorded in the
    JUnit properties). Otherwise: the MaskSet checks agreement across ranks after every update, and the gathered
    checkpoint shows both ranks' master partitions masked."""
    pytest.importorskip("deepspeed")
    used, errors = None, {}
    for dist_backend, timeout in (("nccl", 75), ("gloo", 120)):   # inside the acceptance run's 200 s per test
        result = _two_rank_run(tmp_path / dist_backend, dist_backend, timeout)
        if result.returncode == 0:
            used = dist_backend
            break
        errors[dist_backend] = result.stderr[-1500:]
        record_property(f"{dist_backend}_error", errors[dist_backend])
    if used is None:
        refused = (re.search(r"(?i)duplicate gpu|ncclInvalidUsage", errors["nccl"])
                   and re.search(r"(?i)gloo|not supported|unsupported", errors["gloo"]))
        message = "two ranks could not share the one GPU: NCCL: {} | gloo: {}".format(
            *(_last_error(errors[b]) for b in ("nccl", "gloo")))
        if refused:       # a limit of the communication libraries, not of this project: say so, do not fail
            pytest.skip(message)
        pytest.fail(message)
    record_property("dist_backend", used)
    summary = json.loads((tmp_path / used / "summary.json").read_text())
    assert summary["world_size"] == 2
    states = checkpoints(Path(summary["run_dir"]))
    for state in states:
        assert_masked(state)
    assert states[-1]["method"]["updates"] == 6


def _last_error(stderr: str) -> str:
    """The last exception line of a worker's output (torchrun's own summary lines say less)."""
    lines = [line.strip() for line in stderr.splitlines() if re.search(r"\w+(Error|Exception)\b:", line)]
    rest = [line.strip() for line in stderr.splitlines() if line.strip()]
    return (lines[-1] if lines else rest[-1] if rest else "no output")[:300]


def _two_rank_worker(out: str, dist_backend: str) -> None:
    os.environ["LOCAL_RANK"] = "0"        # one GPU: both ranks on cuda:0
    overrides = [f"output_dir={out}", "name=two", *SYNTHETIC, *COMMON, *MLP, *RIGL, *CUDA,
                 "train.precision=bf16", "parallel.backend=deepspeed", "parallel.zero_stage=2",
                 f"parallel.dist_backend={dist_backend}", "parallel.timeout_minutes=2"]
    summary = train(load_config(None, overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out, "summary.json").write_text(json.dumps(summary, default=str))


if __name__ == "__main__":
    _two_rank_worker(sys.argv[1], sys.argv[2])
