"""The ``parallel`` section of a run config: which backend wraps the model, and the settings it needs.

Kept free of torch and DeepSpeed imports so that loading a config costs nothing beyond the dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# DeepSpeed keys sparsetrain writes itself, and the setting that owns each (deepspeed_extra may not override them).
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "data.batch_size and train.grad_accum_steps",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.clip_grad_norm",
    "fp16": "train.precision",
    "bf16": "train.precision",
    "optimizer": "optim",
    "scheduler": "lr_schedule",
}


@dataclass
class ParallelConfig:
    """backend auto = DDP when launched with several processes (torchrun), else a single process.

    ``deepspeed`` needs an explicit choice; ``zero_stage`` and ``deepspeed_extra`` (more DeepSpeed config keys,
    merged into the generated config) apply to it only.
    """

    backend: Literal["auto", "none", "ddp", "deepspeed"] = "auto"
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"   # auto: nccl on CUDA, gloo on CPU
    find_unused_parameters: bool = False
    timeout_minutes: float = 30.0
    zero_stage: int = 2
    deepspeed_extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.timeout_minutes <= 0:
            raise ValueError(f"timeout_minutes must be positive, got {self.timeout_minutes}")
        if self.zero_stage == 3:
            raise ValueError("zero_stage 3 is refused: ZeRO-3 shards the module weights themselves, so no rank holds "
                             "a whole layer to mask or score; use zero_stage 0, 1 or 2")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.deepspeed_extra and self.backend != "deepspeed":
            raise ValueError(f"deepspeed_extra is set but backend is {self.backend}; set parallel.backend=deepspeed "
                             "or drop deepspeed_extra")
        self._check_deepspeed_extra()

    def _check_deepspeed_extra(self) -> None:
        """Refuse extra keys that the generated config owns or that masking does not support (ZeRO offload)."""
        for key, owner in DEEPSPEED_OWNED_KEYS.items():
            if key in self.deepspeed_extra:
                raise ValueError(f"deepspeed_extra sets {key}, which is generated from {owner}; set that instead")
        zero = self.deepspeed_extra.get("zero_optimization", {})
        if not isinstance(zero, dict):
            raise ValueError(f"deepspeed_extra must hold a mapping under zero_optimization, got {zero!r}")
        if "stage" in zero:
            raise ValueError("deepspeed_extra sets zero_optimization.stage, which is generated from "
                             "parallel.zero_stage; set that instead")
        for key in ("offload_optimizer", "offload_param"):
            if key in zero:
                raise ValueError(f"deepspeed_extra sets zero_optimization.{key}, which is refused: masking under "
                                 "ZeRO offload is not verified; train without offload")
