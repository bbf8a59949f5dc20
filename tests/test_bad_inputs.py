"""The bad-input table: every case exits 2 with exactly one line on stderr, no traceback, and nothing written.

Each case runs the launcher in this process (``launcher.cli.main``) against a shared directory holding one finished
tiny run and a set of broken files; the whole tree (names, sizes, modification times) is compared before and after,
so a case that creates, moves or rewrites anything fails. One case runs as a subprocess: ``--nproc-per-node 2`` with
a missing resume target must be refused before torchrun starts.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.cli import main
from test_config import BAD_INPUTS as CONFIG_CASES

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.options.hidden=[8]", "train.epochs=1", "train.max_steps_per_epoch=2", "monitor.tensorboard=false",
        "monitor.progress=false", "data.batch_size=64"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run (``runs/good``) and the broken inputs the cases point at."""
    root = tmp_path_factory.mktemp("bad_inputs")
    assert main(["train", *TINY, f"output_dir={root}/runs", "name=good"]) == 0
    ckpt = sorted((root / "runs/good/checkpoints").glob("ckpt-*.pt"))[-1]
    (root / "README").write_text("a readme, not a checkpoint\n")
    (root / "empty.pt").write_bytes(b"")
    (root / "trunc.pt").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    torch.save([1, 2, 3], root / "list.pt")
    torch.save({"format": "other/1", "weights": torch.zeros(2)}, root / "foreign.pt")
    (root / "afile").write_text("x")
    (root / "binary.yaml").write_bytes(bytes(range(256)))
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "bad.yaml").write_text("optim: [1, 2\n")
    (root / "confdir").mkdir()
    (root / "empty_ckpts").mkdir()
    cifar = root / "cifar/cifar-10-batches-py"     # right names, wrong bytes: fails the published md5
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(cifar / name, "wb") as handle:
            pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, handle)
    raw = root / "mnist/MNIST/raw"                  # a truncated idx file
    raw.mkdir(parents=True)
    for prefix, n in (("train", 4), ("t10k", 2)):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + np.array([n, 28, 28], ">u4").tobytes()
                                                         + bytes(n * 28 * 28 - (7 if prefix == "t10k" else 0)))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + np.array([n], ">u4").tobytes()
                                                         + bytes(n))
    (root / "svhn").mkdir()
    for name in ("train_32x32.mat", "test_32x32.mat"):
        (root / "svhn" / name).write_bytes(b"MATLAB 5.0 MAT-file, not really")
    for name, text in {"garbage": "{not json", "list": "[1, 2]", "partial": '{"test_acc": 0.5}'}.items():
        (root / "reports" / name).mkdir(parents=True)
        (root / "reports" / name / "summary.json").write_text(text)
    (root / "reports/binary").mkdir()
    (root / "reports/binary/summary.json").write_bytes(bytes(range(256)))
    (root / "reports/dir/summary.json").mkdir(parents=True)
    return root


# (case id, command line after the command, the start of the one stderr line). {root}: the shared directory;
# {run}: the finished run; {ckpt}: its latest checkpoint. Train cases get TINY and output_dir={root}/runs first.
TRAIN_CASES: list[tuple[str, list[str], str]] = [
    # resume targets
    ("resume-missing", ["resume=/nonexistent"], "resume error: /nonexistent does not exist"),
    ("resume-missing-url", ["resume=memory://nowhere/run"], "resume error: memory://nowhere/run does not exist"),
    ("resume-readme", ["resume={root}/README"], "resume error: {root}/README is not a sparsetrain checkpoint"),
    ("resume-truncated", ["resume={root}/trunc.pt"], "resume error: {root}/trunc.pt is not a sparsetrain checkpoint"),
    ("resume-empty", ["resume={root}/empty.pt"], "resume error: {root}/empty.pt is not a sparsetrain checkpoint"),
    ("resume-list", ["resume={root}/list.pt"], "resume error: {root}/list.pt is not a sparsetrain checkpoint"),
    ("resume-foreign-format", ["resume={root}/foreign.pt"], "resume error: {root}/foreign.pt is not a sparsetrain "
                                                            "training checkpoint (format 'other/1')"),
    ("resume-empty-dir", ["resume={root}/empty_ckpts"], "resume error: no checkpoint in {root}/empty_ckpts"),
    ("resume-bad-protocol", ["resume=foo://x/ckpt.pt"], "resume error: foo://x/ckpt.pt: Protocol not known: foo"),
    ("resume-other-width", ["resume={run}", "model.options.hidden=[16]"],
     "resume error: {ckpt} was trained with other settings (model.options.hidden [8] -> [16])"),
    ("resume-other-model", ["resume={run}", "model.name=conv", "model.options={{}}"], "resume error: {ckpt} was "
                                                                                       "trained with other settings"),
    ("resume-other-density", ["resume={run}", "sparsity.method=magnitude", "sparsity.density=0.5"],
     "resume error: {ckpt} was trained with other settings"),
    ("resume-other-lr", ["resume={run}", "optim.lr=0.3"], "resume error: {ckpt} was trained with other settings "
                                                          "(optim.lr 0.1 -> 0.3)"),
    ("resume-other-seed", ["resume={ckpt}", "seed=5"], "resume error: {ckpt} was trained with other settings (seed"),
    ("resume-shorter", ["resume={run}", "train.epochs=1", "train.max_steps_per_epoch=1"],
     "resume error: {ckpt} was trained with other settings (train.max_steps_per_epoch 2 -> 1)"),
    ("resume-auto-changed", ["name=good", "resume=auto", "optim.lr=0.2"],
     "resume error: {ckpt} was trained with other settings (optim.lr 0.1 -> 0.2)"),
    ("checkpoint-dir-of-other-run", ["checkpoint.dir={run}/checkpoints"],
     "run error: checkpoint.dir {run}/checkpoints belongs to run {run}"),
    ("checkpoint-dir-other-run-dir", ["checkpoint.dir={run}"], "run error: checkpoint.dir {run} is the directory "
                                                                 "of another run"),
    ("checkpoint-dir-under-file", ["checkpoint.dir={root}/afile/ckpts"], "config error: checkpoint.dir "
                                                                          "{root}/afile/ckpts lies under the file"),
    # output_dir
    ("output-unknown-protocol", ["output_dir=foo://runs"], "config error: output_dir foo://runs: Protocol not known"),
    ("output-s3-without-s3fs", ["output_dir=s3://bucket/runs"], "config error: output_dir s3://bucket/runs: Install "
                                                                "s3fs"),
    ("output-under-file", ["output_dir={root}/afile/runs"], "config error: output_dir {root}/afile/runs lies under "
                                                            "the file {root}/afile"),
    ("output-is-file", ["output_dir={root}/afile"], "config error: output_dir {root}/afile is a file; choose a "
                                                    "directory path"),
    ("output-unwritable", ["output_dir=/sys/sparsetrain-runs"], "config error: output_dir /sys/sparsetrain-runs is "
                                                                "not writable"),
    ("output-unwritable-proc", ["output_dir=/proc/sparsetrain-runs"], "config error: output_dir "
                                                                      "/proc/sparsetrain-runs is not writable"),
    # devices and processes
    ("device-cuda", ["train.device=cuda"], "config error: train.device is cuda but no CUDA device is visible"),
    ("nccl-on-cpu", ["parallel.dist_backend=nccl"], "config error: parallel.dist_backend nccl needs CUDA"),
    ("nccl-device-cpu", ["parallel.dist_backend=nccl", "train.device=cpu"], "config error: parallel.dist_backend"),
    ("nproc-0", ["--nproc-per-node", "0"], "config error: --nproc-per-node must be at least 1, got 0"),
    ("nproc-negative", ["--nproc-per-node", "-1"], "config error: --nproc-per-node must be at least 1, got -1"),
    ("backend-none-2-procs", ["--nproc-per-node", "2", "parallel.backend=none"],
     "config error: parallel.backend none trains in one process"),
    # model widths and sizes
    ("mlp-width-0", ["model.options.hidden=[0]"], "config error: model mlp: option hidden must hold positive widths"),
    ("mlp-width-negative", ["model.options.hidden=[-4]"], "config error: model mlp: option hidden must hold"),
    ("mlp-no-hidden", ["model.options.hidden=[]"], "config error: model mlp: option hidden must list at least one"),
    ("mlp-width-text", ["model.options.hidden=[8, wide]"], "config error: model: model mlp: option hidden[1]"),
    ("conv-width-0", ["model.name=conv", "model.options={{width: 0}}"], "config error: model conv: option width must "
                                                                         "be >= 1, got 0"),
    ("conv-width-negative", ["model.name=conv", "model.options={{width: -2}}"], "config error: model conv: option "
                                                                                  "width must be >= 1"),
    ("wrn-depth", ["model.name=wide_resnet", "model.options={{depth: 27}}"], "config error: model wide_resnet: "
                                                                             "depth 27 is invalid"),
    ("vit-patch", ["model.name=vit", "model.options={{dim: 96, heads: 3}}"], "config error: model vit: image_size 8 "
                                                                            "is not divisible by patch_size 16"),
    # seeds and the loop
    ("seed-over-64-bits", ["seed=36893488147419103232"], "config error: seed must be an integer in [0, 2**63)"),
    ("seed-2-63", ["seed=9223372036854775808"], "config error: seed must be an integer in [0, 2**63)"),
    ("seed-negative", ["seed=-1"], "config error: seed must be an integer in [0, 2**63), got -1"),
    ("seed-float", ["seed=1.5"], "config error: seed must be an integer"),
    ("grad-accum-over-batches", ["train.grad_accum_steps=1000"], "config error: the training set gives"),
    ("grad-accum-0", ["train.grad_accum_steps=0"], "config error: train.grad_accum_steps must be at least 1"),
    ("max-steps-0", ["train.max_steps_per_epoch=0"], "config error: train.max_steps_per_epoch must be at least 1"),
    ("eval-every-0", ["train.eval_every_epochs=0"], "config error: train.eval_every_epochs must be at least 1"),
    ("label-smoothing-1", ["train.label_smoothing=1.0"], "config error: train.label_smoothing must be in [0, 1)"),
    ("clip-negative", ["train.clip_grad_norm=-1"], "config error: train.clip_grad_norm must be positive"),
    ("loss-unknown", ["train.loss=hinge2"], "config error: train.loss"),
    ("device-tpu", ["train.device=tpu"], "config error: train.device must be one of"),
    ("compile-deepspeed", ["train.compile=true", "parallel.backend=deepspeed"], "config error: train.compile is not "
                                                                                "supported"),
    # optimiser and schedule
    ("momentum-1", ["optim.momentum=1.0"], "config error: optim.momentum must be in [0, 1)"),
    ("weight-decay-negative", ["optim.weight_decay=-0.1"], "config error: optim.weight_decay must be >= 0"),
    ("eps-0", ["optim.eps=0"], "config error: optim.eps must be positive"),
    ("betas-out", ["optim.name=adam", "optim.betas=[0.9, 1.5]"], "config error: optim.betas must both be in [0, 1)"),
    ("nesterov-adam", ["optim.name=adam", "optim.nesterov=true"], "config error: optim.nesterov needs name: sgd"),
    ("lr-inf", ["optim.lr=.inf"], "config error: optim.lr"),
    ("lr-nan", ["optim.lr=.nan"], "config error: optim.lr"),
    ("warmup-negative", ["lr_schedule.warmup_epochs=-1"], "config error: lr_schedule.warmup_epochs must be >= 0"),
    ("warmup-too-long", ["train.epochs=2", "lr_schedule.warmup_epochs=2"], "config error: lr_schedule.warmup_epochs"),
    ("milestones-decreasing", ["train.epochs=9", "lr_schedule.name=step", "lr_schedule.milestones=[5, 3]"],
     "config error: lr_schedule.milestones must be increasing"),
    ("gamma-0", ["lr_schedule.gamma=0"], "config error: lr_schedule.gamma must be in (0, 1]"),
    ("min-lr-negative", ["lr_schedule.min_lr=-1"], "config error: lr_schedule.min_lr must be >= 0"),
    # data
    ("data-unknown", ["data.name=cifar"], "config error: data.name 'cifar' is not a registered data set"),
    ("batch-size-negative", ["data.batch_size=-8"], "config error: data.batch_size must be a positive integer"),
    ("eval-batch-size-0", ["data.eval_batch_size=0"], "config error: data.eval_batch_size must be a positive"),
    ("num-workers-negative", ["data.num_workers=-1"], "config error: data.num_workers must be >= 0"),
    ("image-size-0", ["data.image_size=0"], "config error: data.image_size must be a positive integer"),
    ("augment-unknown", ["data.augment=heavy"], "config error: data.augment"),
    ("val-fraction-1", ["data.val_fraction=1.0"], "config error: data.val_fraction must be in [0, 1)"),
    ("data-root-empty", ["data.root="], "config error: data.root must be a non-empty path"),
    ("prefetch-0", ["data.prefetch_factor=0"], "config error: data.prefetch_factor must be a positive integer"),
    ("data-option-unknown", ["data.name=cifar10", "data.options.channels=3"], "config error: data: options.channels "
                                                                              "is not an option"),
    ("data-missing", ["data.name=cifar10", "data.root={root}/nowhere", "model.name=conv", "model.options={{}}"],
     "data error: "),
    ("data-cifar-md5", ["data.name=cifar10", "data.root={root}/cifar", "model.name=conv", "model.options={{}}"],
     "data error: data_batch_1, data_batch_2"),
    ("data-mnist-truncated", ["data.name=mnist", "data.root={root}/mnist", "model.name=conv", "model.options={{}}"],
     "data error: {root}/mnist/MNIST/raw/t10k-images-idx3-ubyte is corrupt or truncated"),
    ("data-svhn-md5", ["data.name=svhn", "data.root={root}/svhn", "model.name=conv", "model.options={{}}"],
     "data error: train_32x32.mat, test_32x32.mat in {root}/svhn do not match"),
    ("download-without-network", ["data.name=cifar10", "data.root={root}/fresh", "data.download=true",
                                  "model.name=conv", "model.options={{}}"], "data error: data.download could not "
                                                                            "fetch cifar10"),
    # sparsity, monitor, checkpoint, parallel
    ("density-0", ["sparsity.method=magnitude", "sparsity.density=0"], "config error: sparsity.density must be in"),
    ("density-negative", ["sparsity.method=random", "sparsity.density=-0.5"], "config error: sparsity.density"),
    ("method-unknown", ["sparsity.method=snipp"], "config error: sparsity.method 'snipp' is not a known"),
    ("dead-neurons-val", ["monitor.dead_neurons=val"], "config error: monitor.dead_neurons val needs a held-out"),
    ("log-every-0", ["monitor.log_every_steps=0"], "config error: monitor.log_every_steps must be"),
    ("tensorboard-text", ["monitor.tensorboard=maybe"], "config error: monitor.tensorboard must be true or false"),
    ("checkpoint-every-0", ["checkpoint.every_epochs=0"], "config error: checkpoint.every_epochs"),
    ("checkpoint-dir-empty", ["checkpoint.dir=' '"], "config error: checkpoint.dir must be a non-empty path"),
    ("zero-stage-3", ["parallel.zero_stage=3"], "config error: parallel.zero_stage 3 is refused"),
    ("timeout-0", ["parallel.timeout_minutes=0"], "config error: parallel.timeout_minutes must be positive"),
    ("deepspeed-extra-without-deepspeed", ["parallel.deepspeed_extra={{x: 1}}"], "config error: "
                                                                                 "parallel.deepspeed_extra is set"),
    ("name-empty", ["name="], "config error: name must be a non-empty run name"),
    ("unknown-section", ["trian.epochs=3"], "config error: unknown key 'trian'"),
    # config files
    ("config-directory", ["@{root}/confdir"], "config error: config file {root}/confdir is a directory"),
    ("config-binary", ["@{root}/binary.yaml"], "config error: config file {root}/binary.yaml is not"),
    ("config-list", ["@{root}/list.yaml"], "config error: config file {root}/list.yaml must hold a mapping"),
    ("config-bad-yaml", ["@{root}/bad.yaml"], "config error: config file {root}/bad.yaml is not valid YAML"),
    ("config-missing", ["@{root}/nope.yaml"], "config error: config file {root}/nope.yaml not found"),
]

OTHER_CASES: list[tuple[str, list[str], str]] = [
    ("prune-compression-400", ["prune", "--compressions", "400"], "config error: --compressions '400' goes past 12"),
    ("prune-compression-inf", ["prune", "--compressions", "inf"], "config error: --compressions 'inf' must hold "
                                                                  "finite"),
    ("prune-compression-nan", ["prune", "--compressions", "nan"], "config error: --compressions 'nan' must hold"),
    ("prune-compression-range-inf", ["prune", "--compressions", "0:inf:1"], "config error: --compressions "
                                                                             "'0:inf:1' must be start:stop:step"),
    ("prune-compression-tiny-step", ["prune", "--compressions", "0:6:1e-9"], "config error: --compressions "
                                                                              "'0:6:1e-9' must stay within"),
    ("prune-compression-negative", ["prune", "--compressions", "-1"], "config error: --compressions '-1' must hold"),
    ("report-missing", ["report", "{root}/nowhere"], "report error: {root}/nowhere: no summary.json in it"),
    ("report-garbage", ["report", "{root}/reports/garbage"], "report error: {root}/reports/garbage/summary.json is "
                                                             "not a readable run summary"),
    ("report-binary", ["report", "{root}/reports/binary"], "report error: {root}/reports/binary/summary.json is not"),
    ("report-list", ["report", "{root}/reports/list"], "report error: {root}/reports/list/summary.json holds a list"),
    ("report-partial", ["report", "{root}/reports/partial"], "report error: {root}/reports/partial/summary.json "
                                                             "lacks"),
    ("report-directory", ["report", "{root}/reports/dir"], "report error: {root}/reports/dir/summary.json is not"),
    ("lottery-other-method", ["lottery", "sparsity.method=magnitude"], "config error: sparsity.method must be "
                                                                      "lottery_level"),
    ("lottery-with-resume", ["lottery", "sparsity.method=lottery_level", "resume=auto"], "config error: resume is "
                                                                                         "managed per level"),
    ("lottery-remote", ["lottery", "sparsity.method=lottery_level", "output_dir=memory://lottery"], "config error: "
                                                                                                   "output_dir"),
]

CONFIG_TABLE = [(f"config-{'-'.join(case.values[0] if hasattr(case, 'values') else case[0])}",
                 list(case.values[0] if hasattr(case, "values") else case[0]),
                 "config error: " + (case.values[1] if hasattr(case, "values") else case[1]))
                for case in CONFIG_CASES]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under root: (size, mtime_ns); directories' mtimes catch created-then-removed files
    only where a name changed, so sizes and names are what matter."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.stat(path)
            found[os.path.relpath(path, root)] = (0 if name in dirs else info.st_size,
                                                  0 if name in dirs else info.st_mtime_ns)
    return found


def _argv(case: list[str], world: Path, command: str | None) -> list[str]:
    run = world / "runs/good"
    ckpt = sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1]
    fill = [item.format(root=world, run=run, ckpt=ckpt) for item in case]
    if command is not None:
        return fill
    config = [item[1:] for item in fill if item.startswith("@")]
    rest = [item for item in fill if not item.startswith("@")]
    return ["train", *config, *TINY, f"output_dir={world}/runs", *rest]


def _check_refused(argv: list[str], expected: str, world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _tree(world)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:   # argparse's own refusals
        code = exit_.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, (code, captured.err[-2000:])
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert lines[0].startswith(expected), lines[0]
    assert _tree(world) == before


@pytest.mark.parametrize("case, expected", [(c[1], c[2]) for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses_in_one_line(case: list[str], expected: str, world: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(world)

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", offline)   # no case may reach the network
    run, ckpt = world / "runs/good", sorted((world / "runs/good/checkpoints").glob("ckpt-*.pt"))[-1]
    _check_refused(_argv(case, world, None), expected.format(root=world, run=run, ckpt=ckpt), world, capsys)


@pytest.mark.parametrize("case, expected", [(c[1], c[2]) for c in OTHER_CASES], ids=[c[0] for c in OTHER_CASES])
def test_other_commands_refuse_in_one_line(case: list[str], expected: str, world: Path,
                                           capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(world)
    argv = _argv(case, world, case[0])
    if argv[0] in ("prune", "lottery"):
        argv += [*TINY, f"output_dir={world}/runs"] if not any(a.startswith("output_dir=") for a in argv) else TINY
    _check_refused(argv, expected.format(root=world), world, capsys)


@pytest.mark.parametrize("case, expected", [(c[1], c[2]) for c in CONFIG_TABLE], ids=[c[0] for c in CONFIG_TABLE])
def test_config_table_refused_by_train(case: list[str], expected: str, world: Path,
                                       capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/test_config.py's table of bad keys and values, through the whole command."""
    monkeypatch.chdir(world)
    _check_refused(["train", f"output_dir={world}/runs", *case], expected, world, capsys)


def test_table_has_every_case() -> None:
    assert len(TRAIN_CASES) + len(OTHER_CASES) + len(CONFIG_TABLE) >= 100
    assert len({c[0] for c in TRAIN_CASES + OTHER_CASES + CONFIG_TABLE}) == len(TRAIN_CASES + OTHER_CASES +
                                                                                  CONFIG_TABLE)


def test_two_processes_missing_resume_refused_before_torchrun(tmp_path: Path) -> None:
    """Refused by the launcher itself: one line, well under the 30 s a failing torchrun start used to take."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "launcher", "train", "--nproc-per-node", "2",
                             "resume=/nonexistent", f"output_dir={tmp_path}"], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["resume error: /nonexistent does not exist; pass a checkpoint "
                                                  "file, a checkpoint directory, a run directory or 'auto'"]
    assert time.perf_counter() - started < 25   # about 6 s: the launcher's imports
    assert not any(tmp_path.iterdir())
    assert json.dumps(result.stdout) == '""'
