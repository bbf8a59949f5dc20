"""The ``parallel`` section of a run config: which backend wraps the model, and the settings it needs.

Kept free of torch and DeepSpeed imports so that loading a config costs nothing beyond the dataclass.
"""

from __future__ import annotations

import json
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

    ``deepspeed`` needs an explicit choice; ``zero_stage``, ``deepspeed_config`` (a DeepSpeed JSON file of one's own)
    and ``deepspeed_extra`` (more DeepSpeed config keys) apply to it only. The file, then ``deepspeed_extra``, are
    merged into the generated config, sections one level deep; neither may set a key the generated config owns.
    """

    backend: Literal["auto", "none", "ddp", "deepspeed"] = "auto"
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"   # auto: nccl on CUDA, gloo on CPU
    find_unused_parameters: bool = False
    # a collective that waits longer than this for a rank ends the run, naming the rank; 10 minutes is well above
    # the longest legitimate wait (rank 0 writing a checkpoint, a first torch.compile, an uneven evaluation shard)
    # and a third of torch's 30-minute default
    timeout_minutes: float = 10.0
    zero_stage: int = 2
    deepspeed_extra: dict[str, Any] = field(default_factory=dict)
    deepspeed_config: str | None = None     # path or fsspec URL of a DeepSpeed JSON config (ds_config.json)

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
        self._file_keys: dict[str, Any] = {}
        if self.deepspeed_config is not None:
            if self.backend != "deepspeed":
                raise ValueError(f"deepspeed_config is set but backend is {self.backend}; set "
                                 "parallel.backend=deepspeed or drop deepspeed_config")
            self._file_keys = _read_deepspeed_file(self.deepspeed_config)
            _check_deepspeed_keys(self._file_keys, f"deepspeed_config {self.deepspeed_config}", in_file=True)
        _check_deepspeed_keys(self.deepspeed_extra, "deepspeed_extra", in_file=False)

    def deepspeed_keys(self) -> dict[str, Any]:
        """The user's DeepSpeed keys: the ``deepspeed_config`` file, overridden by ``deepspeed_extra`` (one level
        deep for sections, so ``deepspeed_extra.zero_optimization.overlap_comm`` keeps the file's other ZeRO keys)."""
        return merge_deepspeed(self._file_keys, self.deepspeed_extra)


def merge_deepspeed(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra``'s keys on top; a section (a mapping in both) is merged key by key, one level deep."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _read_deepspeed_file(url: str) -> dict[str, Any]:
    """The JSON object in a DeepSpeed config file; a missing file or bad JSON fails in one line."""
    import fsspec   # here, so that loading a config without the file costs nothing more

    try:
        with fsspec.open(url, "r") as handle:
            text = handle.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ValueError(f"deepspeed_config {url}: no such file; give the path of a DeepSpeed JSON config "
                         "(e.g. ds_config.json) or drop deepspeed_config") from None
    try:
        keys = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"deepspeed_config {url} is not valid JSON: {error.msg} at line {error.lineno} column "
                         f"{error.colno}; fix the file") from None
    if not isinstance(keys, dict):
        raise ValueError(f"deepspeed_config {url} must hold a JSON object of DeepSpeed keys, got "
                         f"{type(keys).__name__}; fix the file")
    return keys


def _check_deepspeed_keys(keys: dict[str, Any], source: str, *, in_file: bool) -> None:
    """Refuse keys that the generated config owns or that masking does not support (ZeRO offload); ``source`` names
    where they came from (deepspeed_extra, or the file)."""
    fix = "remove it from the file and set that instead" if in_file else "set that instead"
    for key, owner in DEEPSPEED_OWNED_KEYS.items():
        if key in keys:
            raise ValueError(f"{source} sets {key}, which is generated from {owner}; {fix}")
    zero = keys.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"{source} must hold a mapping under zero_optimization, got {zero!r}")
    if "stage" in zero:
        raise ValueError(f"{source} sets zero_optimization.stage, which is generated from parallel.zero_stage; "
                         f"{fix}")
    for key in ("offload_optimizer", "offload_param"):
        if key in zero:
            raise ValueError(f"{source} sets zero_optimization.{key}, which is refused: masking under ZeRO offload "
                             "is not verified; train without offload")
