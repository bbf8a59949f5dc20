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
            "model.options.hidden=[64]", "sparsity.method=probe_churn", "sparsity.density=0.3", "sparsity.scope=layer",
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
            f"eval{s}:{base},name=eval{s},parallel.backend=ddp,train.grad_accum_steps=2,train.clip_grad_norm=1.0,"
            f"resume={tmp}/{run}/checkpoints/ckpt-e0002-s00000016.pt",
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
def launch(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], str]:
    """(per-rank records, the launch's stdout + stderr)."""
    tmp = tmp_path_factory.mktemp("ds")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/deepspeed_probe.py", str(tmp), *_scenarios(tmp)],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)], result.stdout + result.stderr


@pytest.fixture(scope="module")
def ranks(launch: tuple[list[dict[str, Any]], str]) -> list[dict[str, Any]]:
    return launch[0]


def test_start_up_noise_comes_from_rank_0_at_most_once(launch: tuple[list[dict[str, Any]], str]) -> None:
    """Rank 1 prints nothing of DeepSpeed's start-up; warnings that name nothing the user can change are dropped."""
    output = launch[1]
    assert output.count("deepspeed_shm_comm_op built successfully") <= 1, output[-3000:]
    for dropped in ("No CUDA runtime is found", "untested optimizer", "all_gather_into_tensor` is deprecated"):
        assert dropped not in output, output[-3000:]


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
    """`python -m launcher train parallel.backend=deepspeed` alone: a group of one, no rendezvous needed. With a
    ds_config.json of the user's own: its keys reach DeepSpeed, and the run directory keeps the merged config."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    own = tmp_path / "ds_config.json"
    own.write_text(json.dumps({"wall_clock_breakdown": False, "zero_optimization": {"contiguous_gradients": False}}))
    result = subprocess.run(
        [sys.executable, "-m", "launcher", "train", f"output_dir={tmp_path}", "name=one", "model.name=mlp",
         "model.options.hidden=[16]", "train.epochs=1", "train.max_steps_per_epoch=4", "sparsity.method=random",
         "sparsity.density=0.5", "monitor.progress=false", "parallel.backend=deepspeed", "parallel.zero_stage=1",
         f"parallel.deepspeed_config={own}", "parallel.deepspeed_extra.zero_optimization.overlap_comm=false"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == 4
    assert all(layer["nonzero"] <= layer["kept"] for layer in summary["layers"].values())
    used = json.loads((tmp_path / "one" / "deepspeed_config.json").read_text())
    assert used["wall_clock_breakdown"] is False and used["train_micro_batch_size_per_gpu"] == 128  # the default
    assert {k: used["zero_optimization"][k] for k in ("stage", "contiguous_gradients", "overlap_comm")} == {
        "stage": 1, "contiguous_gradients": False, "overlap_comm": False}
    assert "untested optimizer" not in result.stdout + result.stderr


def test_generated_config_takes_the_file_then_deepspeed_extra(tmp_path: Path) -> None:
    from engine.backends.config import ParallelConfig
    from engine.backends.deepspeed import deepspeed_config

    own = tmp_path / "ds_config.json"
    own.write_text(json.dumps({"wall_clock_breakdown": True, "steps_per_print": 50,
                               "zero_optimization": {"overlap_comm": True, "contiguous_gradients": True}}))
    cfg = ParallelConfig(backend="deepspeed", zero_stage=1, deepspeed_config=str(own),
                         deepspeed_extra={"zero_optimization": {"overlap_comm": False}, "wall_clock_breakdown": False})
    assert deepspeed_config(cfg, "bf16", micro_batch_size=8, grad_accum_steps=2, clip_grad_norm=1.0,
                            model_numel=1000) == {
        "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1, "reduce_bucket_size": 1000, "allgather_bucket_size": 1000,
                              "overlap_comm": False, "contiguous_gradients": True},
        "bf16": {"enabled": True}, "fp16": {"enabled": False}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 50, "wall_clock_breakdown": False}


@pytest.mark.parametrize(("content", "message"), [
    (None, "parallel.deepspeed_config {path}: no such file; give the path of a DeepSpeed JSON config"),
    ('{"a": 1,', "parallel.deepspeed_config {path} is not valid JSON: Expecting property name enclosed in double "
                 "quotes at line 1 column 9; fix the file"),
    ("[1, 2]", "parallel.deepspeed_config {path} must hold a JSON object of DeepSpeed keys, got list"),
    ('{"train_batch_size": 256}', "parallel.deepspeed_config {path} sets train_batch_size, which is generated from "
                                  "data.batch_size and train.grad_accum_steps; remove it from the file and set that "
                                  "instead"),
    ('{"optimizer": {"type": "Adam"}}', "parallel.deepspeed_config {path} sets optimizer, which is generated from "
                                        "optim; remove it from the file"),
    ('{"zero_optimization": {"stage": 3}}', "parallel.deepspeed_config {path} sets zero_optimization.stage, which is "
                                            "generated from parallel.zero_stage; remove it from the file"),
    ('{"zero_optimization": {"offload_param": {"device": "cpu"}}}',
     "parallel.deepspeed_config {path} sets zero_optimization.offload_param, which is refused"),
])
def test_a_bad_deepspeed_config_file_fails_in_one_line(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "ds_config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["parallel.backend=deepspeed", f"parallel.deepspeed_config={path}"])
    text = str(info.value)
    assert text.startswith(message.format(path=path)) and "\n" not in text


def test_the_file_needs_the_deepspeed_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the command line: exit 2 and one line, before any worker starts."""
    from launcher.cli import main

    path = tmp_path / "ds_config.json"
    path.write_text("{}")
    assert main(["train", f"parallel.deepspeed_config={path}", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("parallel.deepspeed_config is set but backend is auto; set parallel.backend=deepspeed or "
                        "drop deepspeed_config") and "\n" not in err
    assert not list(tmp_path.glob("*/config.yaml"))


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
