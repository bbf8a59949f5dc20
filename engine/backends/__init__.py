"""How the model is run across processes: nothing (one process), torch DDP, or DeepSpeed.

``build_backend`` picks one from the ``parallel`` config and the launch environment. DeepSpeed is imported only when
it is asked for (``engine.backends.deepspeed``): importing it takes seconds.
"""

from __future__ import annotations

import torch

from engine.backends.base import Backend, DistEnv, EnvChanges, pick_device
from engine.backends.config import DEEPSPEED_OWNED_KEYS, ParallelConfig
from engine.backends.ddp import DDPBackend

__all__ = ["DEEPSPEED_OWNED_KEYS", "Backend", "DDPBackend", "DistEnv", "EnvChanges", "ParallelConfig",
           "build_backend", "pick_device"]


def build_backend(cfg: ParallelConfig, env: DistEnv, device: torch.device, precision: str) -> Backend:
    """The backend the config and the launch environment call for; ``shutdown()`` it when the run ends."""
    if cfg.backend == "none" and env.world_size > 1:
        raise ValueError(f"parallel.backend is none but {env.world_size} processes were started; "
                         "set parallel.backend=ddp or start one process")
    if cfg.backend == "deepspeed":
        from engine.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(env, device, precision, cfg)
    if cfg.backend == "ddp" or (cfg.backend == "auto" and env.world_size > 1):
        return DDPBackend(env, device, precision, cfg)
    return Backend(env, device, precision)
