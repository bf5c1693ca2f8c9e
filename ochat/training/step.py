"""One optimizer step of the DeepSpeed engine over a step's micro-batches: the trainer's step, which the
benchmarks call too.

Loss of the step = sum(w * CE) over every target of all ranks and micro-steps / sum(w) (ochat.training.loss),
plus, for a mixture-of-experts model, router_aux_loss_coef x the token-weighted mean of the packs' load-balancing
losses (ochat.model.experts). The step's weight sum and token count are known before its first forward pass (the
micro-batches are collated ahead), so each micro-step's backward is already scaled right. One value is read back
to the host per step: the reduced statistics (with an expert model's tokens per expert), after the optimizer step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ochat.kernels.linear_cross_entropy import LossSums
from ochat.training.loss import loss_scale


@dataclass(frozen=True)
class StepStats:
    """One optimizer step, summed over all ranks and micro-steps."""

    loss: float  # sum(w * CE) / sum(w); 0 for a step without targets
    weight_sum: float  # sum(w)
    target_tokens: int  # tokens with w > 0
    correct: int  # targets whose argmax prediction is the label
    tokens: int  # tokens in the packs (all ranks)
    sum_len_sq: float  # sum of squared conversation lengths (the attention FLOPs term)
    grad_norm: float  # before clipping
    skipped: bool  # the optimizer skipped the update (a non-finite gradient)
    lr: float
    seconds: float
    stop_requested: bool  # some rank was asked to stop (ochat.training.runtime.StopRequest)
    aux_loss: float = 0.0  # expert models: coef x token-weighted mean load-balancing loss (trained on, not in `loss`)
    expert_load: float = 0.0  # mixture of experts: max / mean tokens per expert, worst layer (step.expert_load)

    @property
    def token_accuracy(self) -> float:
        return self.correct / max(self.target_tokens, 1)


def forward_loss(engine, batch: dict, device: torch.device) -> LossSums:
    """The loss sums of one collated pack (only the target rows go through the lm_head and the loss)."""
    return engine(batch["input_ids"].to(device, non_blocking=True), batch["position_ids"].to(device, non_blocking=True),
                  batch["cu_seqlens"].to(device, non_blocking=True), batch["max_seqlen"],
                  labels=batch["labels"].to(device, non_blocking=True),
                  label_weights=batch["label_weights"].to(device, non_blocking=True),
                  target_index=batch["target_index"].to(device, non_blocking=True), real_tokens=_real_tokens(batch))


def _real_tokens(batch: dict) -> int:
    """The pack's tokens that are not filler (the collate appends fillers after them)."""
    return batch.get("real_tokens", batch["input_ids"].numel())


def _pack_counts(micro_batches: list[dict], stop: bool, pin: bool) -> dict[str, torch.Tensor]:
    """Weight sum, token count and sum of squared lengths of the micro-batches (from their CPU tensors), and the
    stop flag, as one pinned host tensor's named views. A pack shared by N sequence-parallel ranks counts 1/N of
    its squared lengths on each (its cu_seqlens are the whole pack's), so the sums over all ranks count it once."""
    seqlens = [(b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).double() for b in micro_batches]
    values = dict(weight_sum=sum(float(b["label_weights"].sum()) for b in micro_batches),
                  real_tokens=float(sum(map(_real_tokens, micro_batches))), stop=float(stop),
                  tokens=float(sum(b["input_ids"].numel() for b in micro_batches)),
                  sum_len_sq=sum(float(s.pow(2).sum()) / b.get("sequence_parallel", 1)
                                 for s, b in zip(seqlens, micro_batches)))
    host = torch.tensor(list(values.values()), dtype=torch.float64, pin_memory=pin)
    return dict(zip(values, host.unbind()))


def train_step(engine, micro_batches: list[dict], average_ranks: int, stop_requested: bool = False) -> StepStats:
    """Forward, backward and the optimizer step over `micro_batches` (this rank's share of one step; their
    number must equal the engine's gradient accumulation steps); returns the step's stats over all ranks.
    average_ranks: what DeepSpeed divides the summed gradients by (ochat.training.loss.grad_average_ranks;
    the world size without sequence parallelism). `stop_requested` (this rank's) travels with the stats, so
    every rank learns whether any rank must stop."""
    t0 = time.perf_counter()
    device = engine.device
    counts = {k: v.to(device, non_blocking=True) for k, v in _pack_counts(micro_batches, stop_requested, device.type == "cuda").items()}
    totals = torch.stack([counts["weight_sum"], counts["real_tokens"]])
    dist.all_reduce(totals)
    weight_sum, real_tokens = totals.unbind()
    scale = loss_scale(weight_sum, average_ranks, len(micro_batches)).float()  # on the device: no host sync here
    aux_scale = loss_scale(real_tokens, average_ranks, len(micro_batches)).float()  # aux sums are per token
    lr = engine.get_lr()[0]
    skipped_before = engine.skipped_steps
    sums = {k: torch.zeros((), dtype=torch.float64, device=device)
            for k in ("loss_sum", "correct", "target_tokens", "aux_sum")}
    expert_tokens = None
    for batch in micro_batches:
        out = forward_loss(engine, batch, device)
        loss = out.weighted_loss * scale
        if out.aux_loss is not None:
            loss = loss + out.aux_loss * aux_scale
            sums["aux_sum"] += out.aux_loss.detach().double()
        engine.backward(loss)
        engine.step()
        sums["loss_sum"] += out.weighted_loss.detach().double()
        sums["correct"] += out.correct.detach().double()
        sums["target_tokens"] += out.targets.detach().double()
        if out.expert_tokens is not None:
            expert_tokens = out.expert_tokens.double() + (0 if expert_tokens is None else expert_tokens)
    reduced = {**counts, **sums}
    stacked = torch.stack(list(reduced.values()))
    if expert_tokens is not None:  # tokens per expert travel with the sums
        stacked = torch.cat([stacked, expert_tokens.flatten()])
    dist.all_reduce(stacked)
    values = stacked.tolist()  # the step's one read back to the host
    total = dict(zip(reduced, values))
    grad_norm = engine.get_global_grad_norm()
    aux = total["aux_sum"] / total["real_tokens"] if total["real_tokens"] > 0 else 0.0
    load = 0.0 if expert_tokens is None else expert_load(torch.tensor(values[len(reduced):]).view_as(expert_tokens))
    return StepStats(loss=total["loss_sum"] / total["weight_sum"] if total["weight_sum"] > 0 else 0.0,
                     weight_sum=total["weight_sum"], target_tokens=int(total["target_tokens"]),
                     correct=int(total["correct"]), tokens=int(total["tokens"]), sum_len_sq=total["sum_len_sq"],
                     grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                     skipped=engine.skipped_steps > skipped_before, lr=lr, seconds=time.perf_counter() - t0,
                     stop_requested=total["stop"] > 0, aux_loss=aux, expert_load=load)


def expert_load(expert_tokens: torch.Tensor) -> float:
    """Tokens of the busiest expert over the mean per expert, in the most unbalanced layer ([layers, E] counts):
    1.0 is a perfect balance, E / k one expert taking every token."""
    mean = expert_tokens.mean(dim=1).clamp(min=1e-9)
    return float((expert_tokens.max(dim=1).values / mean).max())


def eval_loss(engine, packs) -> float:
    """sum(w * CE) / sum(w) over this rank's eval `packs` and every other rank's (collective); nan without targets."""
    device = engine.device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # sum(w * CE), sum(w)
    engine.eval()
    with torch.no_grad():
        for batch in packs:
            out = forward_loss(engine, batch, device)
            sums += torch.stack([out.weighted_loss.double(), out.weight.double()])
    engine.train()
    dist.all_reduce(sums)
    weighted, weight = sums.tolist()
    return weighted / weight if weight > 0 else float("nan")
