"""Packed supervised fine-tuning with DeepSpeed: the recipe.

    deepspeed --num_gpus 8 --module ochat.training.train \
        --model-path HF_DIR --data-path TOKENIZED_DIR --save-path OUT [--deepspeed-config zero2|zero3|zero3_offload]
    python -m ochat.training.train ...      # one process (one GPU, or the CPU), no launcher

`train()` reads top to bottom: runtime -> data -> model and engine -> resume -> self-check -> loop -> done.
Loss of one optimizer step = sum(w * CE) over the targets of all ranks and micro-steps / sum(w)
(ochat.training.loss); on a CPU (tests, the demo) it runs on gloo ranks in float32.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.distributed as dist

from ochat.config.train_config import TrainConfig, load_deepspeed_config, parse_args
from ochat.training import preflight
from ochat.training.checkpoint import Saves
from ochat.training.engine import build_engine, load_model
from ochat.training.loss import grad_average_ranks
from ochat.training.metrics import ProgressLog
from ochat.training.packs import PackPlan, eval_packs
from ochat.training.runtime import TrainError, log, setup_runtime
from ochat.training.state import RunSettings, TrainState, has_state, load_state
from ochat.training.step import StepStats, eval_loss, train_step


def train(cfg: TrainConfig) -> TrainState:
    """The whole job; returns where it stopped."""
    rt = setup_runtime(cfg)
    preflight.prepare_save_path(cfg, rt.is_main)
    # ---------------------------------------------------------------- data
    train_ds, eval_ds = preflight.open_training_data(cfg)
    model_type = preflight.check_model_type(cfg, train_ds.meta)
    tokenizer = preflight.check_tokenizer(cfg, train_ds.meta, model_type)
    batch_max_len = cfg.batch_max_len or (cfg.batch_size_per_gpu or 8) * model_type.context_length
    preflight.check_long_context(cfg, rt.world_size, rt.device)
    preflight.check_lengths(batch_max_len, cfg.sequence_parallel, train=train_ds, eval=eval_ds)
    plan = PackPlan(train_ds, batch_max_len, world_size=rt.world_size, rank=rt.rank, grad_accum=cfg.grad_accum,
                    seed=cfg.seed, filler_token=tokenizer.eot_id, sequence_parallel=cfg.sequence_parallel)
    settings = _run_settings(cfg, plan, train_ds)
    log(f"{len(train_ds)} conversations, {int(train_ds.lengths.sum())} tokens; {rt.world_size} ranks x {cfg.grad_accum} "
        f"micro-steps x {batch_max_len} tokens"
        + (f" (packs of {plan.sampler.batch_max_length} shared by {cfg.sequence_parallel} ranks)"
           if cfg.sequence_parallel > 1 else "")
        + f"; {settings.total_steps} steps ({settings.warmup_steps} warmup)")
    # ---------------------------------------------------------------- model and engine
    preflight.check_attention(cfg.attn_impl, rt.device)
    ds_config = load_deepspeed_config(cfg.deepspeed_config, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                                      bf16=rt.bf16, sequence_parallel=cfg.sequence_parallel,
                                      offload_activations=cfg.offload_activations)
    average_ranks = grad_average_ranks(ds_config, rt.world_size)  # what DeepSpeed divides the gradients by
    model = load_model(cfg, rt, ds_config)
    preflight.check_vocabulary(model.config.vocab_size, tokenizer, model_type)
    engine = build_engine(cfg, rt, model, ds_config, total_steps=settings.total_steps,
                          warmup_steps=settings.warmup_steps)
    state = _resume(cfg, engine, settings) if cfg.resume else TrainState()
    if not cfg.skip_self_check:
        preflight.self_check(engine, model.config.vocab_size, rt.device, rt.bf16, cfg.sequence_parallel)
    # ---------------------------------------------------------------- loop
    progress = ProgressLog(cfg, model.config, world_size=rt.world_size, device=rt.device,
                           total_steps=settings.total_steps, is_main=rt.is_main, resumed_at=state.global_step)
    saves = Saves(cfg, engine, tokenizer=tokenizer, model_type=model_type, settings=settings)
    t_start, first_step = time.time(), state.global_step
    while state.global_step < settings.total_steps:
        epoch, steps = state.epoch, plan.steps_in_epoch(state.epoch)
        efficiency = plan.packing_efficiency(epoch)
        progress.start_epoch(epoch, state.step_in_epoch, steps)
        for micro_batches in plan.steps(epoch, state.step_in_epoch, pin_memory=rt.cuda):
            stats = train_step(engine, micro_batches, average_ranks)
            _stop_if_diverged(stats, state)
            state.advance(steps)
            eta = (time.time() - t_start) / (state.global_step - first_step) * (settings.total_steps - state.global_step)
            progress.step(epoch, state.global_step, stats, eta, efficiency)
            if state.global_step == settings.total_steps:
                break
            if saves.state_due(state):
                saves.save_state(state)
        progress.end_epoch()
        last = state.global_step == settings.total_steps
        if eval_ds is not None and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or last):
            packs = eval_packs(eval_ds, batch_max_len, world_size=rt.world_size, rank=rt.rank,
                               filler_token=tokenizer.eot_id, sequence_parallel=cfg.sequence_parallel)
            progress.eval(epoch, state.global_step, eval_loss(engine, packs))
        if saves.checkpoint_due(epoch, last):
            saves.save_checkpoint(state, "final" if last else f"ep_{epoch}")
    progress.close()
    peak = f"; peak GPU memory {torch.cuda.max_memory_allocated(rt.device) / 2**30:.1f} GiB" if rt.cuda else ""
    log(f"done: {state.global_step} steps in {time.time() - t_start:.1f}s; checkpoint {state.last_checkpoint}{peak}")
    dist.barrier()
    return state


def _run_settings(cfg: TrainConfig, plan: PackPlan, train_ds) -> RunSettings:
    total = sum(plan.steps_in_epoch(e) for e in range(cfg.epochs))
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    warmup = cfg.lr_warmup_steps if cfg.lr_warmup_steps is not None else int(round(cfg.lr_warmup_ratio * total))
    return RunSettings(dataset=RunSettings.dataset_fingerprint(train_ds.lengths, train_ds.meta.get("tokenizer_sha256")),
                       batch_max_len=plan.sampler.batch_max_length, slots=plan.slots, seed=cfg.seed, epochs=cfg.epochs,
                       total_steps=total, warmup_steps=warmup)


def _resume(cfg: TrainConfig, engine, settings: RunSettings) -> TrainState:
    """The state of the last run in cfg.save_path, whose settings must be these."""
    if not has_state(cfg.save_path):
        raise TrainError(f"--resume: no DeepSpeed state under {cfg.save_path}/ds_state")
    state, saved = load_state(engine, cfg.save_path)
    changed = settings.differences(saved)
    if changed:
        raise TrainError(f"--resume: this run would train other packs or another schedule than the saved one "
                         f"({'; '.join(changed)}); keep those settings (ranks x --grad-accum may be split differently "
                         f"as long as the product stays), or start a new --save-path")
    log(f"resumed at epoch {state.epoch} step-in-epoch {state.step_in_epoch} (global step {state.global_step})")
    return state


def _stop_if_diverged(stats: StepStats, state: TrainState) -> None:
    """A non-finite loss or gradient, or an update the optimizer skipped for one, ends the run unsaved."""
    if stats.skipped or not (math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)):
        raise TrainError(f"training diverged at step {state.global_step + 1} (epoch {state.epoch}): loss {stats.loss}, "
                         f"grad norm {stats.grad_norm}{', update skipped' if stats.skipped else ''}; nothing saved from "
                         f"it. Last good checkpoint: {state.last_checkpoint or 'none'}. Lower --lr (now {stats.lr:.3g} "
                         f"at this step) or check the data.")


def main(argv=None) -> None:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except TrainError as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"ochat.training.train: error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # other ranks may wait in a collective: the launcher ends them
    except torch.OutOfMemoryError:
        bml = cfg.batch_max_len or "8 x context"
        print(f"ochat.training.train: error: out of GPU memory. Lower --batch-max-len (now {bml}), add "
              f"--gradient-checkpointing, or use --deepspeed-config zero3 / zero3_offload.", file=sys.stderr, flush=True)
        os._exit(1)


if __name__ == "__main__":
    main()
