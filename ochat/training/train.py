"""Packed supervised fine-tuning with DeepSpeed.

    deepspeed --num_gpus 8 --module ochat.training.train \
        --model-path HF_DIR --data-path TOKENIZED_DIR --save-path OUT [--deepspeed-config zero2|zero3|zero3_offload]

Reads top to bottom: parse -> init distributed -> data -> model -> DeepSpeed -> self-check -> loop -> save.
Loss of one optimizer step = sum(w * CE) over the targets of all ranks and micro-steps / sum(w)
(ochat.training.loss). On a CPU (tests, the demo) it runs on gloo ranks in float32.
"""
import dataclasses
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from ochat.config.train_config import TrainConfig, load_deepspeed_config, parse_args
from ochat.training.batching import collate_pack
from ochat.training.checkpoint import (latest_hf_checkpoint, load_partitioned, load_state, save_hf_checkpoint,
                                      save_state)
from ochat.training.loss import loss_scale
from ochat.training.schedule import lr_at

# MFU denominators, dense bf16 FLOP/s. H100/H200/H800: 790 TFLOP/s, the measured ceiling of a bf16 8192^3 matmul
# on the project's H100/H200 machines (the 989 datasheet figure is not reached in practice), the same basis as
# bench/. A100/A800: 312 TFLOP/s, the datasheet figure (not measured here).
PEAK_FLOPS = {"H100": 790e12, "H200": 790e12, "H800": 790e12, "A100": 312e12, "A800": 312e12}
EXIT_AT_STEP = "OCHAT_TEST_EXIT_AT_STEP"  # tests: os._exit after this optimizer step (a hard kill)
VIRTUAL_RANKS = "OCHAT_TEST_VIRTUAL_RANKS"  # tests: one rank plays V ranks' packs as V micro-steps


class _VirtualRanks:
    """Tests: the packs that V ranks would get, interleaved as micro-steps of one rank (needs grad-accum V)."""

    def __init__(self, samplers):
        self.samplers = samplers

    def set_epoch(self, e):
        for s in self.samplers:
            s.set_epoch(e)

    def num_batches(self):
        return sum(s.num_batches() for s in self.samplers)

    def __iter__(self):
        for packs in zip(*self.samplers):
            yield from packs

    def stats(self):
        return self.samplers[0].stats()


class TrainError(Exception):
    """A problem the user can fix: printed as one line, exit code 1."""


def log(msg):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[ochat] {msg}", flush=True)


class PackDataset(torch.utils.data.Dataset):
    """Packs (lists of dataset indices) -> collated tensors, run in a DataLoader worker."""

    def __init__(self, dataset, packs, filler_token):
        self.dataset, self.packs, self.filler = dataset, packs, filler_token

    def __len__(self):
        return len(self.packs)

    def __getitem__(self, i):
        pack = self.packs[i]
        if not pack:  # empty pack: a 1-token pack of weight 0 so this rank still joins every collective
            return collate_pack([(np.array([self.filler], np.int32), np.zeros(1, np.float32))])
        return collate_pack([self.dataset[j] for j in pack])


def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except TrainError as e:
        print(f"ochat.training.train: error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # other ranks may wait in a collective: the launcher ends them
    except torch.OutOfMemoryError:
        bml = cfg.batch_max_len or "8 x context"
        print(f"ochat.training.train: error: out of GPU memory. Lower --batch-max-len (now {bml}), add "
              f"--gradient-checkpointing, or use --deepspeed-config zero3 / zero3_offload.", file=sys.stderr, flush=True)
        os._exit(1)


def train(cfg: TrainConfig):
    import deepspeed
    from ochat.data import load_tokenizer, open_dataset
    from ochat.training.model import PackedCausalLM
    from ochat.training.multipack_sampler import MultipackDistributedBatchSampler

    # ---------------------------------------------------------------- init distributed
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", max(cfg.local_rank, 0)))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and cuda)  # CPU: float32 (exact tests, exact resume)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    # ---------------------------------------------------------------- data
    if not os.path.exists(os.path.join(cfg.data_path, "meta.json")):
        raise TrainError(f"{cfg.data_path}/meta.json not found: pre-tokenize with `python -m ochat.data.generate_dataset`")
    train_ds = open_dataset(cfg.data_path, "train")
    meta = train_ds.meta
    try:
        eval_ds = open_dataset(cfg.data_path, "eval")
        eval_ds = eval_ds if len(eval_ds) else None
    except Exception:
        eval_ds = None
    from ochat.config import get_model_type
    model_type_name = cfg.model_type or meta["model_type"]
    if cfg.model_type and cfg.model_type != meta["model_type"]:
        raise TrainError(f"the dataset was tokenized for model type {meta['model_type']!r}, not {cfg.model_type!r}: "
                         f"re-run ochat.data.generate_dataset with --model-type {cfg.model_type}")
    model_type = get_model_type(model_type_name)
    tokenizer = _check_tokenizer(cfg, meta, model_type, load_tokenizer)
    context = model_type.context_length
    batch_max_len = cfg.batch_max_len or (cfg.batch_size_per_gpu or 8) * context
    longest = int(train_ds.lengths.max())
    if longest > batch_max_len:
        raise TrainError(f"the dataset has a conversation of {longest} tokens, longer than --batch-max-len "
                         f"{batch_max_len}: raise --batch-max-len or re-tokenize with a lower --max-length")
    G = cfg.grad_accum
    virtual = int(os.environ.get(VIRTUAL_RANKS, "0") or 0)
    if virtual:
        assert world == 1 and G == virtual, f"{VIRTUAL_RANKS} needs one rank and --grad-accum {virtual}"
        sampler = _VirtualRanks([MultipackDistributedBatchSampler(train_ds.lengths, batch_max_len, num_replicas=virtual,
                                                                  rank=r, seed=cfg.seed) for r in range(virtual)])
    else:
        sampler = MultipackDistributedBatchSampler(train_ds.lengths, batch_max_len, num_replicas=world, rank=rank,
                                                   seed=cfg.seed)
    steps_per_epoch = []
    for e in range(cfg.epochs):
        sampler.set_epoch(e)
        steps_per_epoch.append(math.ceil(sampler.num_batches() / G))
    total_steps = sum(steps_per_epoch)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = cfg.lr_warmup_steps if cfg.lr_warmup_steps is not None else int(round(cfg.lr_warmup_ratio * total_steps))
    log(f"{len(train_ds)} conversations, {int(train_ds.lengths.sum())} tokens; {world} ranks x {G} micro-steps "
        f"x {batch_max_len} tokens; {total_steps} steps ({warmup} warmup)")

    # ---------------------------------------------------------------- model
    ds_config = load_deepspeed_config(cfg.deepspeed_config, grad_accum=G, grad_clip=cfg.grad_clip, bf16=bf16)
    zero = ds_config.get("zero_optimization", {})
    t_load = time.time()
    try:
        if zero.get("stage") == 3:  # partitioned from the start: no rank holds the whole model
            model = load_partitioned(cfg.model_path, ds_config, cfg.attn_impl)
        else:  # float32 here; DeepSpeed keeps the fp32 master copy and casts the module to bf16
            model = PackedCausalLM.from_pretrained(cfg.model_path, dtype=torch.float32, device=device,
                                                   attn_impl=cfg.attn_impl)
    except (OSError, ValueError) as e:
        raise TrainError(f"cannot load the model from {cfg.model_path}: {e}")
    log(f"model: {model.config.num_params() / 1e9:.2f}B parameters from {cfg.model_path} in {time.time() - t_load:.1f}s"
        + (" (partitioned over the ranks: ZeRO-3)" if zero.get("stage") == 3 else ""))
    vocab = model.config.vocab_size
    if tokenizer.eot_id >= vocab or meta["vocab_size"] > vocab:
        raise TrainError(f"the model's vocabulary ({vocab}) lacks the end-of-turn token {model_type.eot_token!r} "
                         f"(id {tokenizer.eot_id}): add it first with `python -m ochat.training.add_tokens`")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(cfg.gradient_checkpointing)
    decay = [p for p in model.parameters() if _is_matrix(p)]
    no_decay = [p for p in model.parameters() if not _is_matrix(p)]  # norms and biases: no weight decay
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ---------------------------------------------------------------- DeepSpeed
    if zero.get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        optimizer = DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, adamw_mode=True)
    else:
        ds_config["zero_allow_untested_optimizer"] = True
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=cuda)

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total_steps, warmup, 1.0, cfg.lr_min_ratio))

    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    start_epoch, start_step, global_step = 0, 0, 0
    if cfg.resume:
        client = load_state(engine, cfg.save_path)
        if client is None:
            raise TrainError(f"--resume: no DeepSpeed state under {cfg.save_path}/ds_state")
        start_epoch, start_step, global_step = client["epoch"], client["step_in_epoch"], client["global_step"]
        log(f"resumed at epoch {start_epoch} step-in-epoch {start_step} (global step {global_step})")
    resumed_steps = global_step

    def forward(batch):
        return engine(batch["input_ids"].to(device, non_blocking=True), batch["position_ids"].to(device, non_blocking=True),
                      batch["cu_seqlens"].to(device, non_blocking=True), batch["max_seqlen"],
                      labels=batch["labels"].to(device, non_blocking=True),
                      label_weights=batch["label_weights"].to(device, non_blocking=True),
                      target_index=batch["target_index"].to(device, non_blocking=True))

    def saves_at_epoch_end(epoch, done):
        """Whether the end of this epoch writes a checkpoint (HF folder + DeepSpeed state)."""
        every = bool(cfg.save_every and (epoch + 1) % cfg.save_every == 0)
        return not cfg.no_save and (done or epoch == cfg.epochs - 1 or every)

    # ---------------------------------------------------------------- self-check
    if not cfg.skip_self_check:
        _self_check(engine, vocab, device, bf16)

    # ---------------------------------------------------------------- loop
    peak = next((v for k, v in PEAK_FLOPS.items() if cuda and k in torch.cuda.get_device_name(device)), None)
    wandb = _init_wandb(cfg, rank)
    filler = int(tokenizer.eot_id)
    exit_at = int(os.environ.get(EXIT_AT_STEP, "0") or 0)
    show_bar = rank == 0 and sys.stdout.isatty()
    t_start = time.time()
    last_good = latest_hf_checkpoint(cfg.save_path) if cfg.resume else None
    done = False
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        packs = list(sampler)
        packs += [[]] * (-len(packs) % G)  # every optimizer step has exactly G micro-steps on every rank
        first = start_step if epoch == start_epoch else 0
        # its own generator: creating the loader must not draw from the global RNG (exact RNG state on resume)
        loader = torch.utils.data.DataLoader(PackDataset(train_ds, packs[first * G:], filler), batch_size=None,
                                             shuffle=False, num_workers=1, pin_memory=cuda, prefetch_factor=2 * G,
                                             generator=torch.Generator().manual_seed(cfg.seed + epoch))
        it = iter(loader)
        n_steps = len(packs) // G
        bar = None
        if show_bar:
            from tqdm import tqdm
            bar = tqdm(total=n_steps, initial=first, desc=f"epoch {epoch}", dynamic_ncols=True)
        engine.train()
        for step in range(first, n_steps):
            t0 = time.time()
            micro = [next(it) for _ in range(G)]  # the whole step first: its weight sum is known up front
            stats = torch.tensor([sum(float(b["label_weights"].sum()) for b in micro), 0.0, 0.0, 0.0,
                                  sum(b["input_ids"].numel() for b in micro),
                                  sum(float((b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).double().pow(2).sum()) for b in micro)],
                                 dtype=torch.float64, pin_memory=cuda).to(device, non_blocking=True)  # no host wait
            w_sum = stats[0].clone()
            dist.all_reduce(w_sum)
            scale = loss_scale(w_sum, world, G).float()  # on the device: no host sync before the forward passes
            lr = scheduler.get_last_lr()[0] if scheduler is not None else cfg.lr  # the rate this step uses
            for b in micro:
                out = forward(b)
                engine.backward(out.weighted_loss * scale)
                engine.step()
                stats[1] += out.weighted_loss.detach().double()
                stats[2] += out.correct.detach().double()
                stats[3] += out.targets.detach().double()
            dist.all_reduce(stats)
            global_step += 1
            loss = float(stats[1] / stats[0]) if stats[0] > 0 else 0.0
            if not math.isfinite(loss):
                raise TrainError(f"the loss became {loss} at step {global_step} (epoch {epoch}); stopping. "
                                 f"Last good checkpoint: {last_good or 'none'}. Try a lower --lr.")
            dt = max(time.time() - t0, 1e-9)
            tok = float(stats[4]) / world
            tps = tok / dt
            mfu = (_step_flops(model.config, float(stats[4]), float(stats[5])) / world / dt / peak) if peak else float("nan")
            gnorm = engine.get_global_grad_norm()
            gnorm = float(gnorm) if gnorm is not None else float("nan")
            eta = (time.time() - t_start) / max(global_step - resumed_steps, 1) * (total_steps - global_step)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s_gpu=f"{tps:.0f}", mfu=_pct(mfu), eta=f"{eta/60:.1f}m")
                bar.update(1)
            elif rank == 0 and (global_step % cfg.log_every == 0 or global_step == 1):
                print(f"[ochat] epoch {epoch} step {global_step}/{total_steps} loss {loss:.4f} lr {lr:.3e} "
                      f"grad_norm {gnorm:.3f} tokens/s/gpu {tps:.0f} mfu {_pct(mfu)} eta {eta/60:.1f}m", flush=True)
            if wandb is not None:
                wandb.log({"train/loss": loss, "train/token_accuracy": float(stats[2] / max(stats[3], 1)), "train/lr": lr,
                           "train/grad_norm": gnorm, "train/tokens_per_s_per_gpu": tps, "train/mfu": mfu,
                           "train/packing_efficiency": sampler.stats().get("efficiency"), "epoch": epoch}, step=global_step)
            if cfg.max_steps and global_step >= cfg.max_steps:
                done = True
            if (cfg.save_state_every and not cfg.no_save and global_step % cfg.save_state_every == 0
                    and not ((done or step + 1 == n_steps) and saves_at_epoch_end(epoch, done))):
                # mid-epoch resume point (collective); skipped where the epoch's own save follows at once
                save_state(engine, cfg.save_path, epoch=epoch, step_in_epoch=step + 1, global_step=global_step)
                log(f"saved DeepSpeed state at epoch {epoch} step-in-epoch {step + 1} (global step {global_step})")
            if exit_at and global_step == exit_at:
                os._exit(17)  # tests: a hard kill, no cleanup
            if done:
                break
        if bar is not None:
            bar.close()
        del it, loader
        last_epoch = done or epoch == cfg.epochs - 1
        if eval_ds is not None and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or last_epoch):
            ev = _evaluate(engine, eval_ds, batch_max_len, world, rank, filler, forward)
            log(f"epoch {epoch} eval/loss {ev:.4f}")
            if wandb is not None:
                wandb.log({"eval/loss": ev}, step=global_step)
        if saves_at_epoch_end(epoch, done):
            name = "final" if last_epoch else f"ep_{epoch}"
            path = os.path.join(cfg.save_path, name)
            save_hf_checkpoint(engine, model.config.to_hf_config(), tokenizer, cfg, path, model_path=cfg.model_path,
                               eot_token=model_type.eot_token, eot_id=int(tokenizer.eot_id), bos_id=int(tokenizer.bos_id))
            save_state(engine, cfg.save_path, epoch=epoch + 1 if not done else epoch,
                       step_in_epoch=0 if not done else step + 1, global_step=global_step)
            last_good = path
            log(f"saved {path}")
        if done:
            break
    if wandb is not None:
        wandb.finish()
    peak_mem = f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if cuda else ""
    log(f"done: {global_step} steps in {time.time() - t_start:.1f}s; checkpoint {last_good}{peak_mem}")
    dist.barrier()


def _is_matrix(p: torch.nn.Parameter) -> bool:
    """2-D or more (a ZeRO-3 partition is flat: its full shape is ds_shape)."""
    return len(getattr(p, "ds_shape", p.shape)) >= 2


def _pct(x):
    return "n/a" if not math.isfinite(x) else f"{x:.1%}"


def _check_tokenizer(cfg, meta, model_type, load_tokenizer):
    """The dataset must have been tokenized with this model's tokenizer."""
    try:
        tok = load_tokenizer(cfg.model_path, model_type)
    except Exception as e:
        raise TrainError(f"cannot load a tokenizer from {cfg.model_path}: {e}")
    if meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != tok.sha256:
        if meta.get("vocab_size") != tok.vocab_size or meta.get("eot_token_id") != tok.eot_id:
            raise TrainError(f"{cfg.data_path} was tokenized with another tokenizer (vocab {meta.get('vocab_size')}, "
                             f"end-of-turn id {meta.get('eot_token_id')}) than {cfg.model_path}'s (vocab {tok.vocab_size}, "
                             f"end-of-turn id {tok.eot_id}): re-run ochat.data.generate_dataset with this tokenizer")
        log("warning: the dataset's tokenizer file checksum differs from the model's; vocabularies agree, continuing")
    return tok


def _self_check(engine, vocab, device, bf16):
    """Refuse to train if conversations of a pack can see each other. Two comparisons on random packs:

    - isolation: replacing the first conversation's tokens must leave the later conversations' logits
      unchanged. Same shapes, same kernels: an isolated attention changes them by exactly 0 (tolerance
      1e-3 of the logit scale), while a leak changes them by about the logits' own size, in any dtype.
    - equivalence: packed logits equal each conversation run alone, to 1e-4 of the scale in float32. In
      bf16 the two runs have different shapes, so they round differently, and that noise grows with the
      model (0.22 on logits of 6.2 for a random 7B model): there only a gross mismatch (10%) is refused.
    """
    g = torch.Generator().manual_seed(1234)
    lens = [7, 3, 12]
    convs = [torch.randint(0, vocab, (n,), generator=g) for n in lens]
    other_first = torch.randint(0, vocab, (lens[0],), generator=g)

    def logits(conversations):
        b = collate_pack([(c.numpy().astype(np.int32), np.ones(len(c), np.float32)) for c in conversations])
        return engine(b["input_ids"].to(device), b["position_ids"].to(device), b["cu_seqlens"].to(device),
                      b["max_seqlen"]).float()

    was_training = engine.training
    engine.eval()
    with torch.no_grad():
        packed = logits(convs)
        perturbed = logits([other_first] + convs[1:])
        alone = torch.cat([logits([c]) for c in convs])
    engine.train(was_training)
    scale = max(1.0, alone.abs().max().item())
    leak = (packed - perturbed)[lens[0]:].abs().max().item()
    diff = (packed - alone).abs().max().item()
    if not leak <= 1e-3 * scale:
        raise TrainError(f"self-check failed: changing one conversation of a pack changed the logits of the others by "
                         f"{leak:.3g} (logit scale {scale:.3g}): the attention backend lets conversations see each "
                         f"other. Try another --attn-impl.")
    if not diff <= (0.1 if bf16 else 1e-4) * scale:
        raise TrainError(f"self-check failed: packed logits differ from per-conversation logits by {diff:.3g} "
                         f"(logit scale {scale:.3g}): positions or attention are wrong for packed input. "
                         f"Try another --attn-impl.")
    log(f"self-check passed (a pack's conversations do not see each other: {leak:.1e}; "
        f"packed vs per-conversation logits: max diff {diff:.2e} on a scale of {scale:.2g})")


def _evaluate(engine, eval_ds, batch_max_len, world, rank, filler, forward):
    from ochat.training.multipack_sampler import MultipackDistributedBatchSampler
    s = MultipackDistributedBatchSampler(eval_ds.lengths, max(batch_max_len, int(eval_ds.lengths.max())),
                                         num_replicas=world, rank=rank, seed=0)
    s.set_epoch(0)
    data = PackDataset(eval_ds, list(s), filler)
    sums = torch.zeros(2, dtype=torch.float64, device=next(engine.module.parameters()).device)
    engine.eval()
    with torch.no_grad():
        for i in range(len(data)):
            out = forward(data[i])
            sums[0] += out.weighted_loss.double()
            sums[1] += out.weight.double()
    engine.train()
    dist.all_reduce(sums)
    return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")


def _step_flops(config, tokens, sum_len_sq):
    """Training FLOPs of a step (all ranks) from its token count and sum of squared sequence lengths."""
    return config.flops_per_token(sum_len_sq / max(tokens, 1)) * tokens


def _init_wandb(cfg, rank):
    if rank != 0 or not cfg.wandb_project or cfg.wandb_mode == "disabled":
        return None
    import wandb
    wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, mode=cfg.wandb_mode, config=dataclasses.asdict(cfg))
    return wandb


if __name__ == "__main__":
    main()
