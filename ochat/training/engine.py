"""The model and the DeepSpeed engine that trains it: loading (whole, or partitioned under ZeRO-3), the
optimizer with its weight-decay groups, and the learning-rate schedule."""
from __future__ import annotations

import time

import torch

from ochat.config.train_config import TrainConfig
from ochat.training import hf_weights, memory, sequence_parallel
from ochat.training.fp8 import enable_fp8
from ochat.training.model import PackedCausalLM
from ochat.training.runtime import Runtime, TrainError, log
from ochat.training.schedule import lr_at


def load_model(cfg: TrainConfig, rt: Runtime, ds_config: dict) -> PackedCausalLM:
    """The checkpoint at cfg.model_path: partitioned from the start under ZeRO-3 (no rank holds the whole
    model), else whole in float32 on this rank's device (DeepSpeed keeps the fp32 master copy and casts the
    module to bf16)."""
    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    t0 = time.time()
    try:
        if zero3:
            model = hf_weights.load_partitioned(cfg.model_path, ds_config, cfg.attn_impl)
        else:
            model = PackedCausalLM.from_pretrained(cfg.model_path, dtype=torch.float32, device=rt.device,
                                                   attn_impl=cfg.attn_impl)
    except (OSError, ValueError) as e:
        raise TrainError(f"cannot load the model from {cfg.model_path}: {e}") from None
    log(f"model: {model.config.num_params() / 1e9:.2f}B parameters from {cfg.model_path} in {time.time() - t0:.1f}s"
        + (" (partitioned over the ranks: ZeRO-3)" if zero3 else ""))
    if cfg.fp8:
        converted = enable_fp8(model, cfg.fp8, compile=not cfg.compile, emulate=not rt.cuda)
        log(f"fp8 ({cfg.fp8} scaling): {converted} linear layers of the decoder layers train in float8")
    set_memory_features(model, cfg, ds_config)
    if cfg.compile:
        model.compile_layers()
        log("compile: each decoder layer runs compiled (torch.compile); the first steps include compiling")
    return model


def set_memory_features(model: PackedCausalLM, cfg: TrainConfig, ds_config: dict) -> None:
    """Activation checkpointing, the tiled MLP and activation offload, as cfg asks."""
    if cfg.gradient_checkpointing and cfg.gradient_checkpointing != "auto":  # auto: ochat.training.recompute
        model.gradient_checkpointing_enable(cfg.gradient_checkpointing)
    memory.tile_mlp(model, cfg.tiled_mlp)
    if cfg.offload_activations:
        memory.offload_checkpoints(model, ds_config)


def _is_matrix(p: torch.nn.Parameter) -> bool:
    """2-D or more (a ZeRO-3 partition is flat: its full shape is ds_shape)."""
    return len(getattr(p, "ds_shape", p.shape)) >= 2


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices only; norms and biases get none."""
    params = list(model.parameters())
    return [{"params": [p for p in params if _is_matrix(p)], "weight_decay": weight_decay},
            {"params": [p for p in params if not _is_matrix(p)], "weight_decay": 0.0}]


def build_engine(cfg: TrainConfig, rt: Runtime, model: PackedCausalLM, ds_config: dict, *, total_steps: int,
                 warmup_steps: int):
    """The DeepSpeed engine: AdamW (DeepSpeed's CPU Adam when the optimizer is offloaded), the warmup + cosine
    schedule of ochat.training.schedule, and with --sequence-parallel DeepSpeed's sequence-parallel groups (the
    model's attention routed over them, ZeRO over all ranks)."""
    import deepspeed

    groups = weight_decay_groups(model, cfg.weight_decay)
    adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **adam)
    else:
        ds_config["zero_allow_untested_optimizer"] = True
        optimizer = torch.optim.AdamW(groups, fused=rt.cuda, **adam)

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total_steps, warmup_steps, 1.0, cfg.lr_min_ratio))

    mpu = sequence_parallel.enable(model, cfg.sequence_parallel)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
                                      mpu=mpu)
    return engine
