"""Backends leave the process as they found it: a process group they did not create survives, the environment is
restored, and the same backend can run again in the same process (a Ray Tune worker runs many trials).

The backends are used directly on a tiny model (prepare, one step, shutdown), not through the trainer.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from engine.backends import Backend, DDPBackend, DistEnv, EnvChanges, ParallelConfig, build_backend
from launcher.common import is_worker

CPU = torch.device("cpu")
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def bare_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A process started without a launcher: no launch variables, no process group; DeepSpeed on the CPU."""
    for key in LAUNCH_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert not dist.is_initialized(), "a previous test left a process group behind"
    yield
    if dist.is_initialized():       # a failed test must not poison the next one
        dist.destroy_process_group()


@pytest.fixture
def own_group(bare_process: None) -> Iterator[dist.ProcessGroup]:
    """A one-rank gloo group the test makes itself, as Ray Train or a notebook would: in-memory store, no port."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD


def _one_step(backend: Backend) -> None:
    """Prepare a tiny model and take one optimizer step through the backend; the weights must move."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    module, optimizer = backend.prepare(model, optimizer, micro_batch_size=4, grad_accum_steps=1,
                                        clip_grad_norm=None)
    before = [p.detach().clone() for p in model.parameters()]
    with backend.sync_context(True):
        loss = nn.functional.cross_entropy(module(torch.randn(4, 8)), torch.arange(4))
        backend.backward(loss)
    backend.step(optimizer, lambda: None)
    assert any(not torch.equal(old, new) for old, new in zip(before, model.parameters()))
    assert backend.all_reduce(torch.ones(1)).item() == 1.0


def _assert_usable(group: dist.ProcessGroup) -> None:
    assert dist.is_initialized() and dist.group.WORLD is group, "the backend destroyed a group it did not create"
    tensor = torch.ones(3)
    dist.all_reduce(tensor)
    assert tensor.tolist() == [1.0, 1.0, 1.0]


def _assert_not_a_worker() -> None:
    assert DistEnv.from_environ() == DistEnv()
    assert not is_worker(), "the launcher would take this process for a torchrun worker"


def test_single_process_backend_changes_nothing(bare_process: None) -> None:
    environ = dict(os.environ)
    backend = build_backend(ParallelConfig(), DistEnv(), CPU, "fp32")
    assert type(backend) is Backend
    _one_step(backend)
    backend.shutdown()
    assert dict(os.environ) == environ and not dist.is_initialized()


def test_ddp_keeps_a_group_it_did_not_create(own_group: dist.ProcessGroup) -> None:
    environ = dict(os.environ)
    backend = build_backend(ParallelConfig(backend="ddp"), DistEnv(), CPU, "fp32")
    assert isinstance(backend, DDPBackend)
    _one_step(backend)
    backend.shutdown()
    _assert_usable(own_group)
    assert dict(os.environ) == environ


def test_ddp_destroys_the_group_it_created_and_runs_again(bare_process: None) -> None:
    environ = dict(os.environ)
    for _ in range(2):
        backend = build_backend(ParallelConfig(backend="ddp"), DistEnv(), CPU, "fp32")
        assert dist.is_initialized()
        _one_step(backend)
        wrapper = weakref.ref(backend.module)
        backend.shutdown()
        assert wrapper() is None, "the DDP wrapper (and its reducer) outlived the process group"
        assert not dist.is_initialized()
        assert dict(os.environ) == environ


def test_deepspeed_keeps_a_group_it_did_not_create_and_restores_the_environment(
        own_group: dist.ProcessGroup) -> None:
    environ = dict(os.environ)            # before DeepSpeed's import too: it sets a variable of its own
    backend = build_backend(ParallelConfig(backend="deepspeed", zero_stage=2), DistEnv(), CPU, "fp32")
    assert os.environ["RANK"] == "0"      # DeepSpeed reads the launch variables; the backend fills them in
    _one_step(backend)
    backend.shutdown()
    _assert_usable(own_group)
    assert dict(os.environ) == environ
    _assert_not_a_worker()


def test_deepspeed_with_its_own_group_runs_twice_and_leaves_nothing(bare_process: None) -> None:
    environ = dict(os.environ)
    for stage in (1, 2):
        backend = build_backend(ParallelConfig(backend="deepspeed", zero_stage=stage), DistEnv(), CPU, "fp32")
        _one_step(backend)
        engine = weakref.ref(backend.module)
        backend.shutdown()
        assert engine() is None, "the DeepSpeed engine outlived the process group"
        assert not dist.is_initialized()
        assert dict(os.environ) == environ, f"stage {stage}"
        _assert_not_a_worker()


def test_env_changes_put_back_set_changed_and_removed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSETRAIN_TEST_CHANGED", "before")
    monkeypatch.setenv("SPARSETRAIN_TEST_REMOVED", "kept")
    monkeypatch.delenv("SPARSETRAIN_TEST_ADDED", raising=False)
    environ = dict(os.environ)
    changes = EnvChanges()
    with changes.watch():
        os.environ["SPARSETRAIN_TEST_CHANGED"] = "during"
        os.environ["SPARSETRAIN_TEST_ADDED"] = "new"
        del os.environ["SPARSETRAIN_TEST_REMOVED"]
    with changes.watch():
        os.environ["SPARSETRAIN_TEST_CHANGED"] = "again"    # the first original value is the one put back
    os.environ["SPARSETRAIN_TEST_OUTSIDE"] = "not ours"     # changed outside a watch: left alone
    changes.restore()
    assert os.environ.pop("SPARSETRAIN_TEST_OUTSIDE") == "not ours"
    assert dict(os.environ) == environ


def test_deepspeed_runs_again_after_torch_destroyed_its_world(bare_process: None) -> None:
    """Ray Train or a test tears its group down with torch's destroy_process_group, leaving DeepSpeed's cached
    groups stale: the next run (in a fresh world) must not trip over them."""
    for _ in range(2):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        backend = build_backend(ParallelConfig(backend="deepspeed", zero_stage=2), DistEnv(), CPU, "fp32")
        _one_step(backend)
        backend.shutdown()
        dist.destroy_process_group()
