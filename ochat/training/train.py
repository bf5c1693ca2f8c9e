"""Packed supervised fine-tuning with DeepSpeed: the recipe.

    deepspeed --num_gpus 8 --module ochat.training.train \
        --model-path HF_DIR --data-path TOKENIZED_DIR --save-path OUT [--deepspeed-config zero2|zero3|zero3_offload]
    python -m ochat.training.train ...      # one process (one GPU, or the CPU), no launcher

`train()` reads top to bottom: runtime -> data -> model and engine -> resume -> self-check -> loop -> done.
Loss of one optimizer step = sum(w * CE) over the targets of all ranks and micro-steps / sum(w)
(ochat.training.loss); on a CPU (tests, the demo) it runs on gloo ranks in float32.
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback

import torch
import torch.distributed as dist

if not torch.cuda.is_available():  # before DeepSpeed is imported: its accelerator detection warns on every CPU rank
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from ochat.config.deepspeed import load_deepspeed_config, zero_stage, zero_stage
from ochat.config.errors import ConfigError
from ochat.config.train_config import PROG, TrainConfig, parse_args
from ochat.model import lora
from ochat.model.fp8 import FP8_TOKEN_MULTIPLE
from ochat.model.recompute import AutoRecompute
from ochat.model.transforms import selective_refusals
from ochat.training import preflight
from ochat.training.divergence import DivergenceGuard
from ochat.training.engine import build_engine, load_model
from ochat.training.loss import grad_average_ranks
from ochat.training.metrics import ProgressLog
from ochat.training.packs import PackPlan, eval_packs
from ochat.training.run_folder import RunFolder
from ochat.training.runtime import Stopped, StopRequest, TrainError, setup_runtime
from ochat.training.state import RunSettings, TrainState
from ochat.training.step import StepStats, eval_loss, train_step
from ochat.utils.log import log
from ochat.utils.ranks import is_main, rank


def train(cfg: TrainConfig) -> TrainState:
    """The whole job; returns where it stopped."""
    rt = setup_runtime(cfg)
    stop = StopRequest(watch_launcher=rt.launched)
    run = RunFolder.open(cfg)
    # ---------------------------------------------------------------- data
    train_ds, eval_ds = preflight.open_training_data(cfg)
    chat_format = preflight.check_chat_format(cfg, train_ds.meta)
    tokenizer = preflight.check_tokenizer(cfg, train_ds, chat_format)
    cfg = preflight.resolve_trainable_tokens(cfg, tokenizer)
    batch_max_len = cfg.pack_tokens(chat_format.context_length)
    ds_config = load_deepspeed_config(cfg.deepspeed_config, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                                      bf16=rt.bf16, transforms=cfg.transforms,
                                      skip_nonfinite_steps=cfg.max_skipped_steps > 0,
                                      bf16_master=cfg.master_dtype == "bf16")
    preflight.check_transforms(cfg, rt.world_size, rt.device, zero_stage(ds_config))
    preflight.check_lengths(batch_max_len, cfg.sequence_parallel, train=train_ds, eval=eval_ds)
    plan = PackPlan(train_ds, batch_max_len, world_size=rt.world_size, rank=rt.rank, grad_accum=cfg.grad_accum,
                    seed=cfg.seed, filler_token=tokenizer.eot_id, sequence_parallel=cfg.sequence_parallel,
                    token_multiple=FP8_TOKEN_MULTIPLE if cfg.fp8 else 1)
    settings = _run_settings(cfg, plan, train_ds)
    log(f"{len(train_ds)} conversations, {int(train_ds.lengths.sum())} tokens; {_plural(rt.world_size, 'rank')} x "
        f"{_plural(cfg.grad_accum, 'micro-step')} x {batch_max_len} tokens"
        + (f" (packs of {plan.sampler.batch_max_length} shared by {cfg.sequence_parallel} ranks)"
           if cfg.sequence_parallel > 1 else "")
        + f"; {settings.total_steps} steps ({settings.warmup_steps} warmup)")
    # ---------------------------------------------------------------- model and engine
    preflight.check_attention(cfg.attn_impl, rt.device)
    average_ranks = grad_average_ranks(ds_config, rt.world_size)  # what DeepSpeed divides the gradients by
    model = load_model(cfg, rt, ds_config)
    preflight.check_vocabulary(model.config.vocab_size, tokenizer)
    if not cfg.no_save:
        adapters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        run.check_disk_space(model.config.num_params(), rt.bf16, cfg.master_dtype == "bf16",
                             adapters=adapters if cfg.lora_rank else None, merged=cfg.merge_lora)
    engine = build_engine(cfg, rt, model, ds_config, total_steps=settings.total_steps,
                          warmup_steps=settings.warmup_steps)
    run.bind(engine, tokenizer=tokenizer, chat_format=chat_format, settings=settings)
    state = _resume(run, settings) if cfg.resume else TrainState()
    if state.global_step >= settings.total_steps:
        log(f"the run in {run.path} has already trained all its {settings.total_steps} steps (checkpoint "
            f"{state.last_checkpoint}): nothing to do. To train further, start a new run from that checkpoint "
            f"(--model-path {state.last_checkpoint}) with another --save-path")
        run.close()
        return state
    if not cfg.skip_self_check:
        preflight.self_check(engine, model.config.vocab_size, rt.device, rt.bf16, cfg.sequence_parallel,
                             plan.token_multiple, pack_wide_scales=cfg.fp8 == "tensorwise")
    recompute = AutoRecompute(model, batch_max_len, rt.device, selective=not selective_refusals(
        cfg.transforms, zero_stage(ds_config))) if cfg.gradient_checkpointing == "auto" else None
    # ---------------------------------------------------------------- loop
    progress = ProgressLog(cfg, model.config, metrics_path=run.metrics_path, world_size=rt.world_size,
                           device=rt.device, total_steps=settings.total_steps, resumed_at=state.global_step)
    t_start, first_step = time.time(), state.global_step
    divergence = DivergenceGuard(cfg.max_skipped_steps, cfg.spike_factor)
    while state.global_step < settings.total_steps:
        epoch, steps = state.epoch, plan.steps_in_epoch(state.epoch)
        efficiency = plan.packing_efficiency(epoch)
        progress.start_epoch(epoch, state.step_in_epoch, steps)
        for micro_batches in plan.steps(epoch, state.step_in_epoch, pin_memory=rt.cuda):
            stats = train_step(engine, micro_batches, average_ranks, stop.requested())
            _stop_if_diverged(divergence.check(stats), stats, state, run)
            if recompute is not None:
                recompute.after_step()
            state.advance(steps)
            eta = (time.time() - t_start) / (state.global_step - first_step) * (settings.total_steps - state.global_step)
            progress.step(epoch, state.global_step, stats, eta, efficiency)
            if state.global_step == settings.total_steps or (stats.stop_requested and state.step_in_epoch == 0):
                break  # the epoch's end comes first
            if stats.stop_requested:
                _stop_for_signal(run, state, stop, saved=False)
            run.after_step(state)
        progress.end_epoch()
        last = state.global_step == settings.total_steps
        if eval_ds is not None and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or last):
            packs = eval_packs(eval_ds, batch_max_len, world_size=rt.world_size, rank=rt.rank,
                               filler_token=tokenizer.eot_id, sequence_parallel=cfg.sequence_parallel,
                               token_multiple=plan.token_multiple)
            progress.eval(epoch, state.global_step, eval_loss(engine, packs))
        saved = run.after_epoch(state, epoch, last)
        if stats.stop_requested and not last:
            _stop_for_signal(run, state, stop, saved=saved)
    progress.close()
    peak = f"; peak GPU memory {torch.cuda.max_memory_allocated(rt.device) / 2**30:.1f} GiB" if rt.cuda else ""
    saved = f"checkpoint {state.last_checkpoint}" if state.last_checkpoint else "no checkpoint written (--no-save)"
    log(f"done: {state.global_step} steps in {time.time() - t_start:.1f}s; {saved}{peak}")
    dist.barrier()
    run.close()
    return state


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _run_settings(cfg: TrainConfig, plan: PackPlan, train_ds) -> RunSettings:
    total = sum(plan.steps_in_epoch(e) for e in range(cfg.epochs))
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    warmup = cfg.lr_warmup_steps if cfg.lr_warmup_steps is not None else int(round(cfg.lr_warmup_ratio * total))
    return RunSettings(dataset=RunSettings.dataset_fingerprint(train_ds.lengths, train_ds.meta.get("tokenizer_sha256")),
                       batch_max_len=plan.sampler.batch_max_length, world_size=plan.world_size, slots=plan.slots,
                       seed=cfg.seed, epochs=cfg.epochs,
                       total_steps=total, warmup_steps=warmup, expert_parallel=cfg.expert_parallel,
                       adapters=_adapters(cfg))


def _adapters(cfg: TrainConfig) -> str:
    """The LoRA adapters a run trains, as RunSettings records them."""
    if not cfg.lora_rank:
        return "none"
    t = cfg.transforms
    tokens = f" trainable tokens {cfg.lora_trainable_tokens}" if t.lora_trainable_tokens else ""
    return (f"LoRA rank {t.lora_rank} alpha {t.lora_alpha or lora.default_alpha(t.lora_rank):g} targets "
            f"{t.lora_targets}{tokens} on {'the NF4-quantised ' if t.qlora else ''}{cfg.model_path}")


def _resume(run: RunFolder, settings: RunSettings) -> TrainState:
    """The state of the last run in the run folder, whose settings must be these."""
    saved = run.latest()
    if saved is None:
        raise TrainError(f"--resume: no resume state under {run.states_dir}")
    state, saved_settings = saved
    changed = settings.differences(saved_settings)
    if changed:
        raise TrainError(f"--resume: the saved run differs ({'; '.join(changed)}): resume with its settings (the "
                         f"same data, --batch-max-len, --seed, --epochs, --max-steps, GPUs, --grad-accum, "
                         f"--expert-parallel; with LoRA its flags and --model-path), or start a new --save-path")
    if state.global_step < settings.total_steps:  # a finished run has nothing to load
        run.load_state()
    log(f"resumed at epoch {state.epoch} step-in-epoch {state.step_in_epoch} (global step {state.global_step})")
    return state


def _stop_if_diverged(why: str | None, stats: StepStats, state: TrainState, run: RunFolder) -> None:
    """End the run, saving nothing from this step on, when `why` says it diverged (ochat.training.divergence)."""
    if why is None:
        return
    raise TrainError(f"training diverged at step {state.global_step + 1} (epoch {state.epoch}): {why} (loss "
                     f"{stats.loss:.4g}, grad norm {stats.grad_norm:.4g}); nothing saved from it. Newest good resume "
                     f"state: {run.last_state or 'none'}; newest checkpoint: {state.last_checkpoint or 'none'}. "
                     f"Lower --lr (now {stats.lr:.3g} at this step) or check the data.")


def _stop_for_signal(run: RunFolder, state: TrainState, stop: StopRequest, saved: bool) -> None:
    """Save the resume state after this step (unless --no-save, or `saved` already) and end the run with the
    signal's exit status."""
    name = signal.Signals(stop.signal or signal.SIGTERM).name  # a rank that got no signal stops for another's
    if not run.writes_states:
        raise Stopped(f"stopped by {name} after step {state.global_step} (--no-save: nothing saved)", stop.exit_status)
    if not saved:
        run.save_state(state)
    raise Stopped(f"stopped by {name} after step {state.global_step}; resume state saved: run the same command with "
                  f"--resume to continue", stop.exit_status)


def main(argv=None) -> None:
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        if is_main():
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:
        train(cfg)
    except (TrainError, ConfigError, Stopped) as e:
        if is_main():
            kind = "stopped" if isinstance(e, Stopped) else "error"
            print(f"{PROG}: {kind}: {e}", file=sys.stderr, flush=True)
        os._exit(e.status)  # other ranks may wait in a collective: the launcher ends them
    except torch.OutOfMemoryError:
        print(f"{PROG}: error: out of GPU memory. Lower --batch-max-len (now {cfg.batch_max_len or 'its default'}), add "
              f"--gradient-checkpointing, or use --deepspeed-config zero3 / zero3_offload.", file=sys.stderr, flush=True)
        os._exit(1)
    except Exception as e:  # a bug, or a failure ochat does not know: the traceback, then end this rank at once
        traceback.print_exc()
        print(f"{PROG}: error on rank {rank()}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}",
              file=sys.stderr, flush=True)
        os._exit(1)  # exiting normally would wait for the other ranks in a collective, or for DataLoader workers


if __name__ == "__main__":
    main()
    # Everything is written, closed and flushed: skip the interpreter's teardown, whose finalisers (torch, gloo)
    # keep each rank about 2 s longer.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
