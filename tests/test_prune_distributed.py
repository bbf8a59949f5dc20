"""Two CPU ranks (gloo, torchrun): data-dependent scores are combined, so both ranks build the same masks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_snip_and_grasp_masks_agree_across_ranks_that_saw_different_batches(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/prune_probe.py", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for method in ("snip", "grasp"):
        a, b = ranks[0][f"{method}_samples"], ranks[1][f"{method}_samples"]
        assert len(a) == len(b) == 30   # 6 per class over 2 ranks: 3 per class each, 10 classes
        assert not any(torch.equal(x, y) for x in a for y in b)   # no scoring sample is shared
        masks = [ranks[r][method] for r in range(2)]
        total = sum(m.numel() for m in masks[0].values())
        assert sum(int(m.sum()) for m in masks[0].values()) == round(0.1 * total)
        for name, mask in masks[0].items():
            assert torch.equal(mask, masks[1][name]), f"{method}: {name} differs across ranks"
