"""Two CPU processes under torchrun (gloo): identical weights and masks on both ranks; the launcher's own spawn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_ranks_end_with_identical_weights_and_masks(tmp_path: Path) -> None:
    overrides = [f"output_dir={tmp_path}", "name=ddp", "data.name=digits", "data.batch_size=32",
                 "data.augment=standard", "model.name=conv", "model.options.width=8", "sparsity.method=random",
                 "sparsity.density=0.3", "sparsity.scope=layer", "sparsity.distribution=erk", "train.epochs=2",
                 "train.max_steps_per_epoch=8", "monitor.progress=false", "optim.name=adamw", "optim.lr=0.003",
                 "optim.weight_decay=0.05"]
    result = _torchrun(["tests/ddp_probe.py", str(tmp_path), *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["summary_steps"] == 16
    for name, tensor in ranks[0]["model"].items():
        assert torch.equal(tensor, ranks[1]["model"][name]), f"{name} differs across ranks"
    assert ranks[0]["masks"]
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name])
        assert (ranks[0]["model"][name][~mask] == 0).all()
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and list((tmp_path / "ddp" / "checkpoints").glob("ckpt-*.pt"))


def test_launcher_spawns_workers_with_nproc_per_node(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "launcher", "train", "--nproc-per-node", "2", f"output_dir={tmp_path}", "name=spawn",
         "model.name=mlp", "model.options.hidden=[16]", "train.epochs=1", "train.max_steps_per_epoch=4",
         "sparsity.method=magnitude", "sparsity.density=0.5", "monitor.progress=false"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "spawn" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert result.stdout.count("sparsetrain run summary") == 1   # only rank 0 prints


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_over_a_c10d_rendezvous_on_loopback(tmp_path: Path) -> None:
    """`torchrun --nnodes 2` twice on this machine: two 'nodes' meeting at a c10d rendezvous train as one job."""
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    overrides = [f"output_dir={tmp_path}", "name=nodes", "model.name=mlp", "model.options.hidden=[16]",
                 "train.epochs=1", "train.max_steps_per_epoch=4", "sparsity.method=random", "sparsity.density=0.5",
                 "monitor.progress=false"]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
         "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=sparsetrain-test",
         "tests/ddp_probe.py", str(tmp_path), *overrides],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world_size"] == 2
    for name, tensor in ranks[0]["model"].items():
        assert torch.equal(tensor, ranks[1]["model"][name])
