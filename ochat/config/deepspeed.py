"""DeepSpeed configs: the shipped ones (`deepspeed/zero2.json`, `zero3.json`, `zero3_offload.json`) or a user's
JSON file, read and completed in one place, and the one reader of the facts ochat takes from them.

A config is the dict `deepspeed.initialize` takes. Its "auto" values are filled from the trainer's flags; the
model transforms it must carry (sequence parallelism's group size, offloaded activation checkpoints) are set
from `ModelTransforms`, and combinations that cannot train are refused (ochat.model.transforms.refusals).
"""
from __future__ import annotations

import json
import os

from ochat.config.errors import ConfigError
from ochat.model.transforms import ModelTransforms, refusals

DEEPSPEED_CONFIGS = {
    name: os.path.join(os.path.dirname(__file__), "deepspeed", name + ".json")
    for name in ("zero2", "zero3", "zero3_offload")
}


def zero_stage(ds_config: dict) -> int:
    """The ZeRO stage (0 when the config has none)."""
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def offloads_optimizer(ds_config: dict) -> bool:
    """Whether the optimizer states live in CPU memory (then DeepSpeed's CPU Adam steps them)."""
    return ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"


def sequence_parallel_size(ds_config: dict) -> int:
    """Ranks per sequence-parallel group (1: none)."""
    return ds_config.get("sequence_parallel_size", 1)


def load_deepspeed_config(name_or_path: str, *, grad_accum: int, grad_clip: float, bf16: bool,
                          transforms: ModelTransforms = ModelTransforms(), skip_nonfinite_steps: bool = False,
                          bf16_master: bool = False) -> dict:
    """Read a shipped config by name (zero2, zero3, zero3_offload) or a JSON file; fill its "auto" values; set
    `sequence_parallel_size` and `activation_checkpointing.cpu_checkpointing` from `transforms`; raise
    ConfigError for a combination of the config and the transforms that cannot train.

    bf16's `check_grad_overflow` (unless the config sets it): on only with `skip_nonfinite_steps` (the trainer's
    --max-skipped-steps > 0). Under ZeRO 1-2 it scans every gradient for inf/nan before the optimizer step, a
    dozen small kernels per parameter and a host synchronisation (on one H200 it made the 1.1B shape's step 11%
    slower), only so that DeepSpeed can skip the update. Without it a non-finite gradient still shows in the
    gradient norm, and ochat.training.divergence stops the run at that step, saving nothing from it.

    `bf16_master` (--master-dtype bf16): DeepSpeed's bf16 master weights, gradients and optimizer states
    (`bf16_master_weights_and_grads`, `bf16_optimizer_states`), 10 bytes per parameter instead of 16 and no
    float32 copies around the update; bf16 ZeRO 1-3 runs without optimizer offload only."""
    path = DEEPSPEED_CONFIGS.get(name_or_path, name_or_path)
    try:
        with open(path) as fh:
            ds = json.load(fh)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--deepspeed-config {name_or_path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed-config {name_or_path}: expected a JSON object")
    fill = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": grad_clip}
    for k, v in fill.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = bf16
    ds["bf16"].setdefault("check_grad_overflow", skip_nonfinite_steps)
    if bf16_master:
        _check_bf16_master(name_or_path, ds, transforms)
        ds["bf16"].update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
    ds.pop("train_batch_size", None)
    if transforms.sequence_parallel > 1:
        ds["sequence_parallel_size"] = transforms.sequence_parallel
    if transforms.offload_activations:
        ds.setdefault("activation_checkpointing", {})["cpu_checkpointing"] = True
    problems = refusals(transforms, zero_stage=zero_stage(ds),
                        reduce_scatter=ds.get("zero_optimization", {}).get("reduce_scatter", True))
    if problems:
        raise ConfigError(f"--deepspeed-config {name_or_path}: {problems[0]}")
    return ds


def _check_bf16_master(name: str, ds: dict, transforms: ModelTransforms) -> None:
    """Raise ConfigError where DeepSpeed's bf16 master weights cannot (or need not) run."""
    why = ("it needs a bf16 run (--dtype bf16; auto is float32 on CPUs)" if not ds["bf16"]["enabled"] else
           "DeepSpeed keeps bf16 master weights under ZeRO 1-3 only" if zero_stage(ds) == 0 else
           "offloaded optimizer states are stepped by DeepSpeed's CPU Adam in float32" if offloads_optimizer(ds) else
           "LoRA's optimizer holds only the adapters, whose float32 update costs next to nothing"
           if transforms.lora_rank else None)
    if why:
        raise ConfigError(f"--master-dtype bf16 with --deepspeed-config {name} is refused: {why}")
