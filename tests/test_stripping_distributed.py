"""Two CPU ranks (gloo) whose held-out data alone would mark different neurons dead strip the same weights, under DDP
and under DeepSpeed ZeRO 2 (tests/stripping_probe.py does the work, one torchrun launch per backend)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("ddp", "deepspeed")
OVERRIDES = ["data.name=digits", "data.batch_size=32", "data.val_fraction=0.25", "model.name=vit_strip",
             "model.options.patch_size=2", "model.options.dim=16", "model.options.depth=1", "model.options.heads=2",
             "sparsity.method=synaptic_stripping", "sparsity.stripping_factor=0.3", "train.epochs=2",
             "train.max_steps_per_epoch=1", "train.device=cpu", "monitor.progress=false", "monitor.tensorboard=false",
             "optim.name=adamw", "optim.lr=0.01"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("strip2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    for backend in BACKENDS:     # one launch each: a second two-rank group in the same workers can hang gloo
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=2", "tests/stripping_probe.py", str(out), backend,
                                 f"output_dir={out}", *OVERRIDES], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
    return {b: [torch.load(out / f"{b}-rank{r}.pt", weights_only=True) for r in range(2)] for b in BACKENDS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_that_disagree_alone_strip_the_same_weights(ranks: dict[str, list[dict]], backend: str) -> None:
    zero, one = ranks[backend]
    fc1_relu = "blocks.0.mlp.act1"
    assert not torch.equal(zero["local"][fc1_relu], one["local"][fc1_relu]), "the planting left no disagreement"
    for linear, relu in zero["layers"]:
        # dead means dead on every rank's data: the decision is the AND of the ranks' own verdicts, on both ranks
        assert torch.equal(zero["decided"][relu], zero["local"][relu] & one["local"][relu])
        assert torch.equal(zero["decided"][relu], one["decided"][relu])
    assert zero["decided"][fc1_relu][:4].all()                              # planted dead everywhere
    assert zero["stripped"] == one["stripped"] > 0
    for name, mask in zero["masks"].items():
        assert torch.equal(mask, one["masks"][name]), f"{name}: masks differ across ranks"
        linear = name.removesuffix(".weight")
        relu = dict(zero["layers"])[linear]
        before, dead = zero["before"][name], zero["decided"][relu]
        for row in range(mask.shape[0]):
            live = before[row] != 0
            expected = live & (before[row] < torch.quantile(before[row][live], 0.3)) if dead[row] else \
                torch.zeros_like(live)
            assert torch.equal(~mask[row], expected), f"{name} row {row}"
        for rank in (zero, one):
            assert (rank["after"][name][~mask] == 0).all()                    # the module's weights
            assert (rank["masters"][name][~mask] == 0).all()                  # the fp32 masters (ZeRO) / params
            moments = [m for m in rank["moments"][name].values() if m.shape == mask.shape]
            assert len(moments) == 2 and all((m[~mask] == 0).all() for m in moments)   # Adam's two moments
