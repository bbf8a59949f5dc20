"""The GPU acceptance script cannot rot between GPU leases: its dry run (CPU, tiny models, the same code) runs here and
must write every key the GPU run writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_acceptance import SECTIONS, expected_keys, key_paths

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_writes_every_key_of_the_gpu_run(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_acceptance", "--dry-run", "--out", str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    data = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert key_paths(data) == expected_keys()
    assert data["meta"]["dry_run"] is True
    for section in SECTIONS:
        assert data[section]["status"] in ("ok", "skipped", "partial"), (section, data[section]["note"])
    assert data["tests"]["status"] == "ok" and data["tests"]["failed"] == 0 and data["tests"]["errors"] == 0
    assert data["tests"]["skipped"] == len(data["tests"]["cases"]) > 0        # no CUDA here: every gpu test skips
    for slot in ("resnet50", "vit_s16"):
        for mode in ("eager", "compiled"):
            for variant in ("dense", "static", "rigl"):
                entry = data["throughput"][slot]["modes"][mode][variant]
                assert entry["images_per_s"] > 0 and entry["vs_dense"] > 0, (slot, mode, variant)
        assert data["throughput"][slot]["modes"]["eager"]["rigl"]["rigl_updates"] == 1
    assert data["prune_at_init"]["synflow"]["seconds"] > 0 and data["prune_at_init"]["snip"]["seconds"] > 0
    assert data["loader"]["loader_images_per_s"] > 0 and data["loader"]["train_images_per_s"] > 0
    table = (tmp_path / "gpu_acceptance.txt").read_text()
    assert "throughput" in table and "goals" in table and "tests [ok]" in table
