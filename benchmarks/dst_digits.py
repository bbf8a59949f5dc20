"""Accuracy of every dynamic sparse method at 90% sparsity on scikit-learn's digits, against dense and a static mask.

An MLP 64-128-64-10 (every layer sparse), batch 64, SGD momentum 0.9 (LR 0.1, cosine), 20 epochs, masks updated every
10 steps (about 2 updates per epoch); each method with its own defaults otherwise (DSR with N_p 200, as there are
only 1,702 active weights). Several seeds; prints the mean, min and max test accuracy, the final density and the
training time. A measurement script, not a test: the figures in docs/experiments.md come from it.

    python3 -m benchmarks.dst_digits                     # every method, seeds 0-2
    python3 -m benchmarks.dst_digits --methods set,rigl --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile

from engine.run_config import load_config
from engine.trainer import train

COMMON = ["data.name=digits", "data.batch_size=64", "model.name=mlp", "model.options.hidden=[128,64]",
          "optim.lr=0.1", "train.epochs=20", "monitor.progress=false", "monitor.tensorboard=false",
          "checkpoint.every_epochs=1000", "checkpoint.save_final=false"]
PERIODIC = ["sparsity.density=0.1", "sparsity.period=10"]
METHODS = {
    "dense": ["sparsity.method=dense"],
    "static": ["sparsity.method=random", "sparsity.density=0.1", "sparsity.scope=layer"],
    "set": ["sparsity.method=set", *PERIODIC],
    "rigl": ["sparsity.method=rigl", *PERIODIC],
    "dsr": ["sparsity.method=dsr", *PERIODIC, "sparsity.period_epochs=[]", "sparsity.periods=[]",
            "sparsity.target_pruned=200", "sparsity.targets.exclude_roles=[]"],
    "deep_r": ["sparsity.method=deep_r", "sparsity.density=0.1"],
    "soft_deep_r": ["sparsity.method=soft_deep_r", "sparsity.density=0.1"],
    "hashednet": ["sparsity.method=hashednet", "sparsity.density=0.1"],
    "iterative": ["sparsity.method=iterative", "sparsity.density=0.1", "sparsity.start_epoch=2",
                  "sparsity.prunes=8", "sparsity.every_epochs=1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"digits, MLP 64-128-64-10, 20 epochs, 90% sparse, seeds {seeds}")
    print(f"{'method':<12} {'test acc mean':>13} {'min':>7} {'max':>7} {'density':>8} {'train s':>8}")
    with tempfile.TemporaryDirectory() as out:
        for name in args.methods.split(","):
            with contextlib.redirect_stdout(io.StringIO()):          # each run's own summary table
                runs = [train(load_config(None, [*COMMON, *METHODS[name], f"seed={seed}", f"output_dir={out}",
                                                 f"name={name}-{seed}"])) for seed in seeds]
            accs = [100 * r["test_acc"] for r in runs]
            print(f"{name:<12} {statistics.mean(accs):>13.2f} {min(accs):>7.2f} {max(accs):>7.2f} "
                  f"{statistics.mean(r['density'] for r in runs):>8.4f} "
                  f"{statistics.mean(r['wall_time_s'] for r in runs):>8.1f}", flush=True)


if __name__ == "__main__":
    main()
