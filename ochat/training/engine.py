"""The model and the DeepSpeed engine that trains it: loading (whole, or partitioned under ZeRO-3), the
optimizer with its weight-decay groups, and the learning-rate schedule."""
from __future__ import annotations

import time

import torch

from ochat.config.deepspeed import offloads_optimizer, zero_stage
from ochat.config.train_config import TrainConfig
from ochat.model import expert_parallel, lora, sequence_parallel
from ochat.model.decoder import PackedCausalLM
from ochat.model.transforms import apply_transforms
from ochat.training import zero_step
from ochat.training.runtime import Runtime, TrainError
from ochat.training.schedule import lr_at
from ochat.utils.log import log


def load_model(cfg: TrainConfig, rt: Runtime, ds_config: dict) -> PackedCausalLM:
    """The checkpoint at cfg.model_path with the flags' transforms applied (ochat.model.transforms): partitioned
    from the start under ZeRO-3 (no rank holds the whole model), else whole in float32 on this rank's device
    (DeepSpeed keeps the fp32 master copy and casts the module to bf16; with --qlora in bf16 when the run is, read
    into CPU memory and moved to the device a decoder layer at a time as it is quantised, so the device never
    holds the unquantised base whole); with --expert-parallel each rank reads only its experts."""
    zero3 = zero_stage(ds_config) == 3
    t0 = time.time()
    try:
        if zero3:
            model = PackedCausalLM.from_pretrained_partitioned(cfg.model_path, ds_config, cfg.attn_impl)
        else:  # QLoRA quantises the frozen base from bf16, and needs no float32 master copy of it
            dtype = torch.bfloat16 if cfg.qlora and ds_config["bf16"]["enabled"] else torch.float32
            model = PackedCausalLM.from_pretrained(cfg.model_path, dtype=dtype,
                                                   device="cpu" if cfg.qlora else rt.device, attn_impl=cfg.attn_impl,
                                                   expert_parallel=cfg.expert_parallel)
    except (OSError, ValueError) as e:
        raise TrainError(f"cannot load the model from {cfg.model_path}: {e}") from None
    log(f"model: {_count(model.config.num_params())} parameters from {cfg.model_path} in {time.time() - t0:.1f}s"
        + (" (partitioned over the ranks: ZeRO-3)" if zero3 else ""))
    apply_transforms(model, cfg.transforms, ds_config=ds_config, emulate_fp8=not rt.cuda,
                     device=rt.device if cfg.qlora and not zero3 else None)
    return model


def _count(n: int) -> str:
    """A parameter count as people write it: 1.10B, 354.8M, 52.3K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'B' else 1}f}{unit}"
    return str(n)


def _is_matrix(p: torch.nn.Parameter) -> bool:
    """2-D or more (a ZeRO-3 partition is flat: its full shape is ds_shape)."""
    return len(getattr(p, "ds_shape", p.shape)) >= 2


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters (with LoRA, only the adapters' and trained token rows'), weight decay on the
    matrices only; norms and biases get none (gpt-oss's stacked expert biases, [E, N], are biases by their name),
    nor do trained token rows (they hold the rows' values, not a difference from the base: decay would pull the
    tokens' embeddings towards zero, not towards the base model)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = [_is_matrix(p) and not n.endswith("bias") and not lora.is_token_rows(n) for n, p in named]
    return [{"params": [p for (_, p), d in zip(named, decayed) if d], "weight_decay": weight_decay},
            {"params": [p for (_, p), d in zip(named, decayed) if not d], "weight_decay": 0.0}]


def build_engine(cfg: TrainConfig, rt: Runtime, model: PackedCausalLM, ds_config: dict, *, total_steps: int,
                 warmup_steps: int):
    """The DeepSpeed engine: AdamW (DeepSpeed's CPU Adam when the optimizer is offloaded), the warmup + cosine
    schedule of ochat.training.schedule, and with --sequence-parallel DeepSpeed's sequence-parallel groups (which
    apply_transforms made; ZeRO shards over all ranks); under ZeRO 1-3 its gradient norm and clip streamlined
    (ochat.training.zero_step)."""
    import deepspeed

    groups = weight_decay_groups(model, cfg.weight_decay)
    # the trained expert shards (or their LoRA adapters) in groups of their own, as DeepSpeed's ZeRO wants them; with
    # LoRA on attention alone the frozen experts leave nothing for DeepSpeed's MoE handling (it needs a MoE group)
    if cfg.expert_parallel > 1 and expert_parallel.trains_experts(model):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(
            [dict(g, name=f"group_{i}") for i, g in enumerate(groups)])
        expert_parallel.show_deepspeed(model, cfg.expert_parallel)
    adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **adam)
    else:
        ds_config["zero_allow_untested_optimizer"] = True
        optimizer = torch.optim.AdamW(groups, fused=rt.cuda, **adam)

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total_steps, warmup_steps, 1.0, cfg.lr_min_ratio))

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
                                      mpu=sequence_parallel.deepspeed_mpu(cfg.sequence_parallel))
    streamlined = zero_step.streamline(engine.optimizer)
    if streamlined:
        log(f"optimizer step: ZeRO's {' and '.join(streamlined)}")
    return engine
