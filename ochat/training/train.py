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
import signal
import sys
import time

import torch
import torch.distributed as dist

from ochat.config.train_config import PROG, ConfigError, TrainConfig, load_deepspeed_config, parse_args
from ochat.training import preflight
from ochat.training.checkpoint import Saves
from ochat.training.engine import build_engine, load_model
from ochat.training.fp8 import FP8_TOKEN_MULTIPLE
from ochat.training.loss import grad_average_ranks
from ochat.training.metrics import ProgressLog
from ochat.training.packs import PackPlan, eval_packs
from ochat.training.recompute import AutoRecompute
from ochat.training.runtime import StopRequest, Stopped, TrainError, log, setup_runtime
from ochat.training.state import RunSettings, TrainState, latest_state, load_state
from ochat.training.step import StepStats, eval_loss, train_step


def train(cfg: TrainConfig) -> TrainState:
    """The whole job; returns where it stopped."""
    rt = setup_runtime(cfg)
    stop = StopRequest(watch_launcher=rt.launched)
    save_path_lock = preflight.prepare_save_path(cfg, rt.is_main)  # noqa: F841 (held until the process ends)
    # ---------------------------------------------------------------- data
    train_ds, eval_ds = preflight.open_training_data(cfg)
    chat_format = preflight.check_chat_format(cfg, train_ds.meta)
    tokenizer = preflight.check_tokenizer(cfg, train_ds, chat_format)
    batch_max_len = cfg.batch_max_len or (cfg.batch_size_per_gpu or 8) * chat_format.context_length
    preflight.check_long_context(cfg, rt.world_size, rt.device)
    preflight.check_lengths(batch_max_len, cfg.sequence_parallel, train=train_ds, eval=eval_ds)
    plan = PackPlan(train_ds, batch_max_len, world_size=rt.world_size, rank=rt.rank, grad_accum=cfg.grad_accum,
                    seed=cfg.seed, filler_token=tokenizer.eot_id, sequence_parallel=cfg.sequence_parallel,
                    token_multiple=FP8_TOKEN_MULTIPLE if cfg.fp8 else 1)
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
                                      offload_activations=cfg.offload_activations, compile_layers=cfg.compile)
    average_ranks = grad_average_ranks(ds_config, rt.world_size)  # what DeepSpeed divides the gradients by
    model = load_model(cfg, rt, ds_config)
    preflight.check_vocabulary(model.config.vocab_size, tokenizer)
    if not cfg.no_save:
        preflight.check_disk_space(cfg.save_path, model.config.num_params(), rt.bf16)
    engine = build_engine(cfg, rt, model, ds_config, total_steps=settings.total_steps,
                          warmup_steps=settings.warmup_steps)
    state = _resume(cfg, engine, settings) if cfg.resume else TrainState()
    if not cfg.skip_self_check:
        preflight.self_check(engine, model.config.vocab_size, rt.device, rt.bf16, cfg.sequence_parallel,
                             plan.token_multiple, pack_wide_scales=cfg.fp8 == "tensorwise")
    recompute = AutoRecompute(model, batch_max_len, rt.device) if cfg.gradient_checkpointing == "auto" else None
    # ---------------------------------------------------------------- loop
    progress = ProgressLog(cfg, model.config, world_size=rt.world_size, device=rt.device,
                           total_steps=settings.total_steps, is_main=rt.is_main, resumed_at=state.global_step)
    saves = Saves(cfg, engine, tokenizer=tokenizer, chat_format=chat_format, settings=settings)
    t_start, first_step, skipped_in_row = time.time(), state.global_step, 0
    while state.global_step < settings.total_steps:
        epoch, steps = state.epoch, plan.steps_in_epoch(state.epoch)
        efficiency = plan.packing_efficiency(epoch)
        progress.start_epoch(epoch, state.step_in_epoch, steps)
        for micro_batches in plan.steps(epoch, state.step_in_epoch, pin_memory=rt.cuda):
            stats = train_step(engine, micro_batches, average_ranks, stop.requested())
            skipped_in_row = _stop_if_diverged(stats, state, skipped_in_row, cfg.max_skipped_steps)
            if recompute is not None:
                recompute.after_step()
            state.advance(steps)
            eta = (time.time() - t_start) / (state.global_step - first_step) * (settings.total_steps - state.global_step)
            progress.step(epoch, state.global_step, stats, eta, efficiency)
            if state.global_step == settings.total_steps or (stats.stop_requested and state.step_in_epoch == 0):
                break  # the epoch's end comes first
            if stats.stop_requested:
                _stop_for_signal(saves, state, stop, saved=False)
            if saves.state_due(state):
                saves.save_state(state)
        progress.end_epoch()
        last = state.global_step == settings.total_steps
        if eval_ds is not None and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or last):
            packs = eval_packs(eval_ds, batch_max_len, world_size=rt.world_size, rank=rt.rank,
                               filler_token=tokenizer.eot_id, sequence_parallel=cfg.sequence_parallel,
                               token_multiple=plan.token_multiple)
            progress.eval(epoch, state.global_step, eval_loss(engine, packs))
        if saves.checkpoint_due(epoch, last):
            saves.save_checkpoint(state, "final" if last else f"ep_{epoch}")
        if stats.stop_requested and not last:
            _stop_for_signal(saves, state, stop, saved=saves.checkpoint_due(epoch, last))
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
                       batch_max_len=plan.sampler.batch_max_length, world_size=plan.world_size, slots=plan.slots,
                       seed=cfg.seed, epochs=cfg.epochs,
                       total_steps=total, warmup_steps=warmup)


def _resume(cfg: TrainConfig, engine, settings: RunSettings) -> TrainState:
    """The state of the last run in cfg.save_path, whose settings must be these."""
    saved = latest_state(cfg.save_path)
    if saved is None:
        raise TrainError(f"--resume: no resume state under {cfg.save_path}/ds_state")
    state, saved_settings = saved
    changed = settings.differences(saved_settings)
    if changed:
        raise TrainError(f"--resume: the saved run differs ({'; '.join(changed)}): resume with its settings (the "
                         f"same data, --batch-max-len, --seed, --epochs, --max-steps, GPUs and --grad-accum), or start "
                         f"a new --save-path")
    load_state(engine, cfg.save_path)
    log(f"resumed at epoch {state.epoch} step-in-epoch {state.step_in_epoch} (global step {state.global_step})")
    return state


def _stop_if_diverged(stats: StepStats, state: TrainState, skipped_in_row: int, allowed: int) -> int:
    """A non-finite loss or gradient norm ends the run unsaved, unless the optimizer skipped that update and no
    more than `allowed` updates in a row were skipped. Returns the updates skipped in a row so far."""
    skipped_in_row = skipped_in_row + 1 if stats.skipped else 0
    finite = math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)
    if (stats.skipped and skipped_in_row > allowed) or (not finite and not stats.skipped):
        raise TrainError(f"training diverged at step {state.global_step + 1} (epoch {state.epoch}): loss {stats.loss}, "
                         f"grad norm {stats.grad_norm}" + (f", {skipped_in_row} update(s) in a row skipped" if
                                                           stats.skipped else "")
                         + f"; nothing saved from it. Last good checkpoint: {state.last_checkpoint or 'none'}. Lower "
                         f"--lr (now {stats.lr:.3g} at this step) or check the data.")
    return skipped_in_row


def _stop_for_signal(saves: Saves, state: TrainState, stop: StopRequest, saved: bool) -> None:
    """Save the resume state after this step (unless --no-save, or `saved` already) and end the run with the
    signal's exit status."""
    name = signal.Signals(stop.signal or signal.SIGTERM).name  # a rank that got no signal stops for another's
    if saves.cfg.no_save:
        raise Stopped(f"stopped by {name} after step {state.global_step} (--no-save: nothing saved)", stop.exit_status)
    if not saved:
        saves.save_state(state)
    raise Stopped(f"stopped by {name} after step {state.global_step}; resume state saved: run the same command with "
                  f"--resume to continue", stop.exit_status)


def main(argv=None) -> None:
    try:
        cfg = parse_args(argv)
    except ConfigError as e:  # before torch.distributed: the launcher's RANK says who speaks
        if os.environ.get("RANK", "0") == "0":
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:
        train(cfg)
    except (TrainError, ConfigError, Stopped) as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            kind = "stopped" if isinstance(e, Stopped) else "error"
            print(f"{PROG}: {kind}: {e}", file=sys.stderr, flush=True)
        os._exit(e.status)  # other ranks may wait in a collective: the launcher ends them
    except torch.OutOfMemoryError:
        bml = cfg.batch_max_len or "8 x context"
        print(f"{PROG}: error: out of GPU memory. Lower --batch-max-len (now {bml}), add "
              f"--gradient-checkpointing, or use --deepspeed-config zero3 / zero3_offload.", file=sys.stderr, flush=True)
        os._exit(1)


if __name__ == "__main__":
    main()
