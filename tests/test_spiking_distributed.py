"""Two CPU ranks (gloo) training spiking nets with different data per rank: Grad R (DDP and DeepSpeed ZeRO 0) and
spiking Deep R end with identical weights, theta, masks and optimizer state; DeepSpeed ZeRO 1 is refused in one line
before any worker starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("spiking")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/spiking_probe.py", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env=env)
    (out / "probe.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key, value in a.items():
        if isinstance(value, dict):
            same(value, b[key], f"{what} {key}")
        else:
            assert torch.equal(value, b[key]), f"{what}: {key} differs across ranks"


@pytest.mark.parametrize("name", ["grad_r", "deep_r", "grad_r_zero0"])
def test_two_ranks_end_identical(name: str, probe: Path) -> None:
    ranks = [torch.load(probe / f"rank{r}-{name}.pt", weights_only=True) for r in range(2)]
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])      # each rank sees its own data
    assert ranks[0]["steps"] == 24
    for key in ("model", "masks", "theta", "optimizer"):
        same(ranks[0][key], ranks[1][key], f"{name} {key}")
    metrics = ranks[0]["metrics"]
    assert metrics == ranks[1]["metrics"] and ranks[0]["firing_rate"] == ranks[1]["firing_rate"]
    assert metrics["connectivity"] < 0.9 and metrics["rewiring/pruned"] > 0       # it pruned
    for key, mask in ranks[0]["masks"].items():
        assert (ranks[0]["model"][key][~mask] == 0).all() and (ranks[0]["model"][key][mask] != 0).all()
    if name.startswith("grad_r"):
        for key, theta in ranks[0]["theta"].items():
            assert torch.equal(theta > 0, ranks[0]["masks"][key])                    # alive exactly while theta > 0


def test_grad_r_matches_between_ddp_and_deepspeed_zero0(probe: Path) -> None:
    ddp, zero = (torch.load(probe / f"rank0-{name}.pt", weights_only=True) for name in ("grad_r", "grad_r_zero0"))
    same(ddp["masks"], zero["masks"], "masks")
    for key, value in ddp["model"].items():
        assert torch.allclose(value, zero["model"][key], atol=1e-6), key


def test_deepspeed_zero1_is_refused_before_any_worker() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "launcher", "train", "--nproc-per-node", "2", "model.name=spiking_mlp",
         "train.loss=rate_mse", "optim.name=adam", "sparsity.method=grad_rewiring", "parallel.backend=deepspeed",
         "parallel.zero_stage=1"], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "grad_rewiring runs under DeepSpeed only at parallel.zero_stage=0" in lines[0], lines
