"""DeepSpeed on two CPU ranks (gloo): masks stay exact under ZeRO 0, 1 and 2, checkpoints resume and cross to DDP.

One torchrun launch runs every scenario (tests/deepspeed_probe.py): importing DeepSpeed costs more than the runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import ConfigError
from engine.run_config import load_config

REPO = Path(__file__).resolve().parents[1]
STAGES = (0, 1, 2)


def _base(tmp: Path) -> list[str]:
    return [f"output_dir={tmp}", "data.name=digits", "data.batch_size=32", "model.name=mlp",
            "model.options.hidden=[64]", "sparsity.method=probe_churn", "sparsity.density=0.3", "sparsity.scope=local",
            "sparsity.distribution=uniform", "train.epochs=2", "train.max_steps_per_epoch=8", "monitor.progress=false",
            "optim.name=adamw", "optim.lr=0.03", "optim.weight_decay=0.05", "train.device=cpu",
            "checkpoint.keep=2"]


def _scenarios(tmp: Path) -> list[str]:
    base = ",".join(_base(tmp))
    ds = "parallel.backend=deepspeed"
    out = []
    for s in STAGES:
        run = f"ds{s}"
        out += [
            f"static{s}:{base},name=static{s},{ds},parallel.zero_stage={s},sparsity.every=0,train.epochs=1",
            f"{run}:{base},name={run},{ds},parallel.zero_stage={s},train.grad_accum_steps=2,train.clip_grad_norm=1.0",
            # the DDP backend evaluates the DeepSpeed run's final checkpoint (epochs already done: evaluate only)
            f"eval{s}:{base},name=eval{s},parallel.backend=ddp,resume={tmp}/{run}/checkpoints/ckpt-e0002-s00000016.pt",
            f"resumed{s}:{base},name={run},{ds},parallel.zero_stage={s},train.grad_accum_steps=2,"
            f"train.clip_grad_norm=1.0,resume={tmp}/{run}/checkpoints/ckpt-e0001-s00000008.pt",
        ]
    out += [
        f"ddp:{base},name=ddp,parallel.backend=ddp",
        f"fromddp:{base},name=ddp,{ds},parallel.zero_stage=2,resume={tmp}/ddp/checkpoints/ckpt-e0001-s00000008.pt",
        f"bf16:{base},name=bf16,{ds},parallel.zero_stage=2,train.precision=bf16,train.epochs=1",
        # bf16 at stage 1 with fp32 gradient accumulation: DeepSpeed's BF16_Optimizer (whole-parameter grad buffers)
        f"bf16acc:{base},name=bf16acc,{ds},parallel.zero_stage=1,train.precision=bf16,train.epochs=1,"
        "parallel.deepspeed_extra.data_types.grad_accum_dtype=fp32",
    ]
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ds")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/deepspeed_probe.py", str(tmp), *_scenarios(tmp)],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _assert_masked_zero(record: dict[str, Any]) -> None:
    assert record["masks"]
    for name, mask in record["masks"].items():
        assert (record["master"][name][~mask] == 0).all(), f"{name}: fp32 master nonzero where pruned"
        assert (record["module"][name][~mask] == 0).all(), f"{name}: module weight nonzero where pruned"
        assert (record["master"][name][mask] != 0).any()


@pytest.mark.parametrize("stage", STAGES)
def test_static_mask_stays_exact(ranks: list[dict[str, Any]], stage: int) -> None:
    for rank in ranks:
        _assert_masked_zero(rank[f"static{stage}"])
    for name, mask in ranks[0][f"static{stage}"]["masks"].items():
        assert torch.equal(mask, ranks[1][f"static{stage}"]["masks"][name])


@pytest.mark.parametrize("stage", STAGES)
def test_prune_and_grow_reach_the_master_weights_and_optimizer_state(ranks: list[dict[str, Any]], stage: int) -> None:
    for rank in ranks:
        record = rank[f"ds{stage}"]
        assert record["events"] == 8           # 2 epochs of 8 optimizer steps, churn every 2
        assert record["steps_checked"] == 16 and record["state_checked"] > 0
        assert record["violations"] == []
        assert record["grown_state_max"] == 0.0
        _assert_masked_zero(record)
    first, second = (rank[f"ds{stage}"] for rank in ranks)
    for name, mask in first["masks"].items():
        assert torch.equal(mask, second["masks"][name])
        assert torch.equal(first["master"][name], second["master"][name])


@pytest.mark.parametrize("stage", STAGES)
def test_resume_continues_with_the_same_masks_and_weights(ranks: list[dict[str, Any]], stage: int) -> None:
    full, resumed = ranks[0][f"ds{stage}"], ranks[0][f"resumed{stage}"]
    assert resumed["summary"]["steps"] == full["summary"]["steps"]
    for name, mask in full["masks"].items():
        assert torch.equal(mask, resumed["masks"][name])
    for name, tensor in full["master"].items():
        assert torch.equal(tensor, resumed["master"][name]), f"{name} differs after resume"


@pytest.mark.parametrize("stage", STAGES)
def test_ddp_evaluates_a_deepspeed_checkpoint_to_the_same_accuracy(ranks: list[dict[str, Any]], stage: int) -> None:
    trained, evaluated = ranks[0][f"ds{stage}"], ranks[0][f"eval{stage}"]
    assert evaluated["summary"]["test_acc"] == trained["summary"]["test_acc"]
    assert evaluated["summary"]["test_loss"] == pytest.approx(trained["summary"]["test_loss"], rel=1e-6)
    for name, tensor in trained["master"].items():
        assert torch.equal(tensor, evaluated["master"][name])


def test_deepspeed_resumes_a_ddp_checkpoint(ranks: list[dict[str, Any]]) -> None:
    ddp, continued = ranks[0]["ddp"], ranks[0]["fromddp"]
    assert continued["summary"]["steps"] == ddp["summary"]["steps"]
    _assert_masked_zero(continued)
    for name, mask in ddp["masks"].items():
        assert torch.equal(mask, continued["masks"][name])
        torch.testing.assert_close(continued["master"][name], ddp["master"][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label", ["bf16", "bf16acc"])
def test_bf16_masks_stay_exact(ranks: list[dict[str, Any]], label: str) -> None:
    for rank in ranks:
        record = rank[label]
        assert record["events"] >= 1 and record["violations"] == [] and record["grown_state_max"] == 0.0
        assert record["steps_checked"] == 8 and record["state_checked"] > 0
        _assert_masked_zero(record)


@pytest.mark.parametrize(("overrides", "message"), [
    (["parallel.backend=deepspeed", "parallel.zero_stage=3"], "parallel.zero_stage 3 is refused: ZeRO-3 shards"),
    (["parallel.zero_stage=4"], "parallel.zero_stage must be 0, 1 or 2, got 4"),
    (["parallel.backend=deepspeed", "parallel.deepspeed_extra.gradient_accumulation_steps=4"],
     "parallel.deepspeed_extra sets gradient_accumulation_steps, which is generated from train.grad_accum_steps"),
    (["parallel.backend=deepspeed", "parallel.deepspeed_extra.zero_optimization.stage=1"],
     "parallel.deepspeed_extra sets zero_optimization.stage, which is generated from parallel.zero_stage"),
    (["parallel.deepspeed_extra.wall_clock_breakdown=true"], "parallel.deepspeed_extra is set but backend is auto"),
    (["parallel.backend=deepspeed", "parallel.deepspeed_extra.zero_optimization.offload_optimizer.device=cpu"],
     "parallel.deepspeed_extra sets zero_optimization.offload_optimizer, which is refused"),
    (["parallel.backend=deepspeed", "parallel.zero_stage=0", "train.precision=bf16"],
     "parallel.zero_stage 0 with train.precision bf16 is refused"),
])
def test_config_errors_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises((ConfigError, ValueError)) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text


def test_one_process_without_a_launcher(tmp_path: Path) -> None:
    """`python -m launcher train parallel.backend=deepspeed` alone: a group of one, no rendezvous needed."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "launcher", "train", f"output_dir={tmp_path}", "name=one", "model.name=mlp",
         "model.options.hidden=[16]", "train.epochs=1", "train.max_steps_per_epoch=4", "sparsity.method=random",
         "sparsity.density=0.5", "monitor.progress=false", "parallel.backend=deepspeed", "parallel.zero_stage=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == 4
    assert all(layer["nonzero"] <= layer["kept"] for layer in summary["layers"].values())


def test_two_nodes_through_the_deepspeed_launcher_and_a_hostfile(tmp_path: Path) -> None:
    """Multi-node the DeepSpeed way, on loopback: a hostfile of two one-slot "nodes", one `deepspeed` launcher per node
    (--no_ssh --node_rank, as on clusters without passwordless ssh), RigL under ZeRO 2 across both."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    launchers: list[subprocess.Popen] = []
    try:
        launchers += [subprocess.Popen(
            [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
             f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}", "--no_local_rank", "--module",
             "launcher", "train", f"output_dir={tmp_path}", "name=nodes", "model.name=mlp", "model.options.hidden=[32]",
             "train.epochs=2", "sparsity.method=rigl", "sparsity.density=0.2", "sparsity.period=5",
             "monitor.progress=false", "monitor.tensorboard=false", "parallel.backend=deepspeed",
             "parallel.zero_stage=2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True)
            for rank in (0, 1)]
        logs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    finally:
        for launcher in launchers:      # a node that died leaves the other waiting at the rendezvous
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    assert [launcher.returncode for launcher in launchers] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    summary = json.loads((tmp_path / "nodes" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] > 0
    assert all(layer["nonzero"] <= layer["kept"] for layer in summary["layers"].values())
