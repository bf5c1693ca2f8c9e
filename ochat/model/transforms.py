"""Every change training makes to a built model, in one place, in one order, with the combinations refused.

`PackedCausalLM.from_pretrained` gives the checkpoint's plain decoder (with --expert-parallel its expert layers
already sharded, each rank reading only its experts). `apply_transforms(model, transforms)` then changes it, always
in this order:

0. LoRA           the decoder layers' linear layers chosen by --lora-targets (and an expert model's stacked experts)
                  get LoRA adapters (lora.py, peft's layers; float32, under ZeRO-3 in the partitioned weights'
                  dtype) and every other parameter is frozen. First, so
                  that the later steps see the wrapped layers: recompute (every mode, selective too: the adapters'
                  rank-r products kept, their B GEMMs rerun), tiled MLP (its tiles' params include the
                  adapters), compile and sequence parallelism act on an adapted model (tested: the same loss and
                  adapter gradients); fp8 and offload are refused with it (not yet tested together), compile also
                  with --qlora or --lora-dropout. With --qlora the frozen linear layers of the decoder layers and
                  an expert model's stacked experts then become 4-bit NF4 (qlora.py; the routers stay; under
                  expert parallelism each rank quantises only its experts, as the whole layer's would be: tested,
                  as with sequence parallelism, to give the one-rank QLoRA loss and adapter gradients).
                  --lora-trainable-tokens also trains the embedding and lm_head rows of the tokens it names
                  (lora.TokenRows). Under ZeRO-3 the parameters ochat reads outside their
                  own modules (the wrapped layers' weights and adapters, the rows, the experts' adapters) are
                  registered with the module whose forward reads them (lora.py).
1. fp8            the decoder layers' linear layers become torchao Float8Linear (fp8.py); each one's forward is
                  compiled unless step 5 compiles the whole layer.
2. recompute      which decoder layers are recomputed in the backward, and how (recompute.py): a fraction of them,
                  evenly spread, fully; every layer selectively (GEMM outputs kept; the norms, RoPE, GLU and, with
                  selective-attention, attention recomputed); or `auto`: all of them fully, until
                  recompute.AutoRecompute settles each layer on none, selective or full after two steps. Selective
                  recompute takes LoRA and QLoRA (no dequantised weight kept) and is refused with fp8, compile,
                  tiled MLP, offload, sequence and expert parallelism and ZeRO-3 (`selective_refusals`); auto then
                  chooses between none and full only.
3. tiled MLP      each decoder layer's MLP runs over N slices of the tokens (memory.py, DeepSpeed's TiledMLP; an
                  expert block through memory.TiledExperts, its routing sums added up over the slices).
4. offload        the inputs of checkpointed layers wait in CPU memory (memory.py, DeepSpeed's checkpointing).
5. compile        each decoder layer compiled by torch.compile (after fp8: the float8 casts compile with it); an
                  expert block runs uncompiled between compiled pieces, as attention does.
6. sequence parallelism   every attention routed over the ranks of a sequence-parallel group
                  (sequence_parallel.py); attention stays outside compiled graphs, so it composes with 1-4. An expert
                  model's load-balancing loss takes the whole pack's tokens per expert from the group.
7. expert parallelism     each expert layer keeps only this rank's share of the experts, the rows routed to them
                  exchanged by all-to-all over an expert-parallel group (expert_parallel.py); done before step 0
                  when the model was not sharded at load, so that LoRA's expert adapters cover this rank's experts
                  only. Composes with recompute, LoRA, QLoRA, sequence parallelism (tested; with sequence
                  parallelism DeepSpeed's expert-parallel groups of N consecutive ranks may lie inside or across
                  the sequence-parallel groups: expert_parallel.py), tiled MLP (tested: every rank runs each
                  expert block over exactly K slices of --tiled-mlp K, each with its own all-to-alls, so the same
                  count on every rank, in the tiled backward's recompute too) and compile (tested: the expert
                  block, all-to-alls included, runs uncompiled between the compiled pieces, so every rank makes the
                  same exchanges); is refused with ZeRO-3.

The load-balancing loss's coefficient (`--router-aux-loss-coef`) replaces config.json's on an expert model (any
time: it is read at each forward). Mixture-of-experts models take recompute, LoRA (attention, shared experts and
the routed experts' stacked weights, under ZeRO-2 or ZeRO-3, also with --expert-parallel; not with --lora-dropout
on the experts), QLoRA (the stacked experts in NF4 too, with or without their adapters; also with sequence or expert
parallelism), tiled MLP, compile (not with LoRA on the experts) and sequence parallelism (tested: the same loss,
load-balancing loss and gradients as without them); fp8 and offload are refused with them (not yet built or
tested on expert blocks).
`refusals` holds every rule about which combinations are refused; the trainer asks it at parse time, with the
DeepSpeed config, and before training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ochat.model.config import ModelConfig
from ochat.utils.log import log


@dataclass(frozen=True)
class ModelTransforms:
    """What to change in a built model (the trainer's flags of the same names)."""

    fp8: str | None = None  # tensorwise | rowwise
    recompute: float | str = 0.0  # share of decoder layers fully checkpointed, "selective", "selective-attention", "auto"
    tiled_mlp: int = 1  # slices per MLP; 1: off
    offload_activations: bool = False
    compile: bool = False
    sequence_parallel: int = 1  # ranks per group sharing a pack; 1: off
    lora_rank: int = 0  # LoRA adapters' rank; 0: off (full fine-tuning)
    lora_alpha: float | None = None  # None: lora.default_alpha(rank)
    lora_dropout: float = 0.0
    lora_targets: str = "all"  # a preset of lora.TARGETS
    qlora: bool = False  # the frozen decoder linears in 4-bit NF4 under the LoRA adapters
    # tokens whose embedding and lm_head rows train with LoRA: ids, or strings the tokenizer has yet to resolve
    # (ochat.training.preflight.resolve_trainable_tokens); the model takes ids only
    lora_trainable_tokens: tuple[int | str, ...] = ()
    seed: int = 0  # of what a transform draws at random (LoRA's initial A)
    router_aux_loss_coef: float | None = None  # expert models' load-balancing loss weight; None: config.json's
    expert_parallel: int = 1  # ranks per group splitting each expert layer's experts; 1: off


def selective_refusals(t: ModelTransforms, zero_stage: int | None = None) -> list[str]:
    """Why the decoder layers cannot take selective recompute beside the other transforms of `t` (empty: they can),
    one line each."""
    reasons = (
        ("--fp8", t.fp8, "float8 linears run compiled, their GEMMs not the aten.mm the selective recompute keeps"),
        ("--compile", t.compile, "a compiled layer already recomputes its norms, RoPE and GLU (the compiler's "
                                 "min-cut partitioner): use a fraction or auto"),
        ("--tiled-mlp", t.tiled_mlp > 1, "TiledMLP recomputes the MLP slice by slice; keeping its GEMM outputs would "
                                         "undo that"),
        ("--offload-activations", t.offload_activations, "offload moves fully checkpointed layers' inputs; a "
                                                          "selective layer's kept tensors would stay on the GPU"),
        ("--sequence-parallel", t.sequence_parallel > 1, "not yet tested with the all-to-all around attention"),
        ("--expert-parallel", t.expert_parallel > 1, "not yet tested with the experts' all-to-all"),
        ("ZeRO-3", zero_stage == 3, "not yet tested with the weights ZeRO-3 gathers in hooks that the recompute "
                                    "reruns"),
    )
    return [f"selective recompute is not supported with {flag}: {why}" for flag, on, why in reasons if on]


def refusals(t: ModelTransforms, *, zero_stage: int | None = None, reduce_scatter: bool = True,
             cuda: bool | None = None, model: ModelConfig | None = None, world_size: int | None = None) -> list[str]:
    """Why this combination cannot train, one line each (empty: it can). Each rule runs once its facts are given:
    the flags alone at parse time; the DeepSpeed config's ZeRO stage and reduce_scatter once it is read; the
    device, the model's shape and the number of ranks before the model is loaded."""
    from ochat.model import expert_parallel, sequence_parallel

    out = []
    if t.recompute in ("selective", "selective-attention"):
        out += [f"--gradient-checkpointing {t.recompute}: {line}" for line in selective_refusals(t, zero_stage)]
    if t.offload_activations and not t.recompute:
        out.append("--offload-activations moves the inputs of checkpointed layers to CPU memory: add "
                   "--gradient-checkpointing")
    if t.compile and (t.sequence_parallel > 1 or t.tiled_mlp > 1 or t.offload_activations):
        out.append("--compile compiles whole decoder layers, which --sequence-parallel, --tiled-mlp and "
                   "--offload-activations change: drop --compile or those flags")
    if t.compile and zero_stage == 3:
        out.append("--compile needs ZeRO stage 2 or lower (ZeRO-3 gathers each layer's weights in hooks that a "
                   "compiled layer cannot run)")
    if t.sequence_parallel > 1 and not reduce_scatter:  # the gradient averaging ochat.training.loss relies on
        out.append("--sequence-parallel needs ZeRO's reduce_scatter (remove \"reduce_scatter\": false)")
    if t.offload_activations and cuda is False:
        out.append("--offload-activations moves activations from GPU to CPU memory: it needs a GPU")
    if t.lora_rank:
        others = [flag for flag, on in (("--fp8", t.fp8), ("--offload-activations", t.offload_activations)) if on]
        if others:
            out.append(f"--lora-rank is not yet supported with {', '.join(others)}: drop one or the other")
        if t.compile and (t.qlora or t.lora_dropout):
            out.append("--compile with LoRA is not yet supported with --qlora or --lora-dropout: drop one or the other")
        outside = [i for i in t.lora_trainable_tokens if isinstance(i, int) and model is not None
                   and i >= model.vocab_size]
        if outside:
            out.append(f"--lora-trainable-tokens: token id {outside[0]} is outside the model's vocabulary "
                       f"({model.vocab_size} rows)")
    else:
        if t.lora_alpha is not None or t.lora_dropout:
            out.append("--lora-alpha and --lora-dropout configure LoRA adapters: add --lora-rank")
        if t.lora_trainable_tokens:
            out.append("--lora-trainable-tokens trains embedding and lm_head rows beside LoRA adapters: add "
                       "--lora-rank")
    if model is not None and model.arch.experts is not None:
        unsupported = [flag for flag, on in (("--fp8", t.fp8), ("--offload-activations", t.offload_activations))
                       if on]
        if unsupported:
            out.append(f"{', '.join(unsupported)} not yet supported with a mixture-of-experts model "
                       f"({model.model_type})")
        if t.lora_rank and t.lora_targets in ("mlp", "all"):  # the presets that adapt the stacked experts
            if t.compile:
                out.append(f"--compile is not yet supported with LoRA on {model.model_type}'s experts: drop it or use "
                           f"--lora-targets attention")
            if t.lora_dropout:
                out.append(f"--lora-dropout: the adapters of {model.model_type}'s experts have none (peft's "
                           f"target_parameters adapters): drop it or use --lora-targets attention")
    elif model is not None:
        out += [f"{flag} {what} mixture-of-experts models; {model.model_type} has no experts" for flag, what, on in (
            ("--router-aux-loss-coef", "weighs the load-balancing loss of", t.router_aux_loss_coef is not None),
            ("--expert-parallel", "splits the experts of", t.expert_parallel > 1)) if on]
    if t.expert_parallel > 1 and zero_stage is not None and (zero_stage != 2 or not reduce_scatter):
        out.append("--expert-parallel needs ZeRO stage 2 with reduce_scatter (DeepSpeed's reduction of MoE gradients; "
                   "ZeRO-3 would partition each rank's experts over all ranks, stages 0-1 are untested)")
    if t.qlora and not t.lora_rank:
        out.append("--qlora quantises the frozen base under LoRA adapters: add --lora-rank")
    if t.qlora and zero_stage == 3:
        out.append("--qlora needs ZeRO stage 2 or lower (ZeRO-3 partitions every weight, and torchao's 4-bit NF4 "
                   "weights cannot be partitioned by DeepSpeed)")
    try:
        if world_size is not None:
            sequence_parallel.Layout(world_size, 0, t.sequence_parallel)
        if model is not None and t.sequence_parallel > 1:
            sequence_parallel.kv_repeats(model.num_attention_heads, model.num_key_value_heads, t.sequence_parallel)
        if t.expert_parallel > 1 and (model is None or model.arch.experts is not None):
            expert_parallel.check_sizes(model.num_experts if model is not None else None, t.expert_parallel,
                                        world_size)
    except ValueError as e:
        out.append(str(e))
    return out


def apply_transforms(model: nn.Module, t: ModelTransforms, *, ds_config: dict | None = None,
                     emulate_fp8: bool = False, device: torch.device | str | None = None) -> None:
    """Change `model` (a PackedCausalLM) in place as `t` asks, in the module's order. `ds_config`: DeepSpeed's
    config, whose activation_checkpointing section configures offload; `emulate_fp8`: float8 casts with
    higher-precision matmuls (CPUs), left uncompiled (compiling buys speed on a GPU, only time on a CPU); `device`:
    where the model trains, if it was loaded elsewhere (--qlora's base in CPU memory): each decoder layer goes there
    as it is quantised, the rest after, before the later steps.
    Sequence parallelism creates DeepSpeed's groups at its first call in a process: collective, after
    torch.distributed started; so does expert parallelism."""
    from ochat.model import expert_parallel, memory, sequence_parallel
    from ochat.model.fp8 import enable_fp8
    from ochat.model.lora import add_lora, default_alpha
    from ochat.model.qlora import nf4_bytes_per_weight, quantize_base

    if t.router_aux_loss_coef is not None:
        model.router_aux_loss_coef = t.router_aux_loss_coef
    expert_parallel.enable(model, t.expert_parallel)  # step 7, before LoRA: see the module docstring
    if t.lora_rank:
        alpha = default_alpha(t.lora_rank) if t.lora_alpha is None else t.lora_alpha
        trainable = add_lora(model, t.lora_rank, alpha, t.lora_dropout, t.lora_targets, t.seed,
                             t.lora_trainable_tokens)
        tokens = f", embedding and lm_head rows of tokens {list(t.lora_trainable_tokens)}" if t.lora_trainable_tokens \
            else ""
        held = " (of the experts, this rank's only)" if t.expert_parallel > 1 and t.lora_targets != "attention" else ""
        log(f"LoRA (rank {t.lora_rank}, alpha {alpha:g}, targets {t.lora_targets}{tokens}): {trainable} trainable "
            f"parameters{held}, the rest frozen")
    if t.qlora:
        modules, weights = quantize_base(model, device)
        log(f"QLoRA: {modules} frozen linear layers and expert stacks of the decoder layers ({weights / 1e9:.2f}B "
            f"weights) in 4-bit NF4, {weights * nf4_bytes_per_weight() / 1e9:.2f} GB instead of "
            f"{weights * 2 / 1e9:.2f} GB in bf16; dequantised in each forward")
    if device is not None:
        model.to(device)
    if t.fp8:
        converted = enable_fp8(model, t.fp8, compile=not (t.compile or emulate_fp8), emulate=emulate_fp8)
        log(f"fp8 ({t.fp8} scaling): {converted} linear layers of the decoder layers train in float8")
    if t.recompute == "auto":
        model.gradient_checkpointing_enable(1.0)  # what fits if anything does, until AutoRecompute decides
    elif t.recompute in ("selective", "selective-attention"):
        model.gradient_checkpointing_enable(1.0, t.recompute)
    elif t.recompute:
        model.gradient_checkpointing_enable(t.recompute)
    memory.tile_mlp(model, t.tiled_mlp)
    if t.offload_activations:
        memory.offload_checkpoints(model, ds_config or {})
    if t.compile:
        model.compile_layers()
        log("compile: each decoder layer runs compiled (torch.compile); the first steps include compiling")
    sequence_parallel.enable(model, t.sequence_parallel)
