"""Training configuration: one frozen dataclass, its command line, an optional run file, and its checks.

Each field carries its own help text and the values it accepts (a range or a list of choices), so the
command line, `--help` (every default shown), the run file and the checks all come from one definition.

    deepspeed --module ochat.training.train --config run.yaml --lr 1e-5     # flags override the file

A run file (YAML or JSON) holds any flag as a key, in either spelling (`batch-max-len` or `batch_max_len`).
Every flag also has OpenChat's underscore spelling on the command line (`--model_path`). Unknown flags and
keys are errors (OpenChat's trainer silently ignored them); a value out of range is a one-line error at
parse time, before anything starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Optional

from ochat.config.deepspeed import DEEPSPEED_CONFIGS
from ochat.config.errors import ConfigError
from ochat.kernels.attention import BACKENDS as ATTENTION_BACKENDS
from ochat.model.fp8 import RECIPES as FP8_RECIPES
from ochat.model.lora import TARGETS as LORA_TARGETS
from ochat.model.transforms import ModelTransforms, refusals

PROG = "ochat.training.train"
CONVERSATIONS_PER_PACK = 8  # the default pack: this many conversations of the chat format's context length
DTYPE_CHOICES = ("auto", "bf16", "float32")  # fp16 is refused: bf16 needs no loss scaling and every GPU ochat targets has it
MASTER_DTYPES = ("float32", "bf16")
WANDB_MODES = ("online", "offline", "disabled")


def _opt(default, help: str, *, choices=None, low=None, high=None, low_open=False, const=None, parse=None):
    """A config field: its default, help text and accepted values (low/high bounds, inclusive unless low_open;
    `parse` turns the flag's text into the value when the field's type alone does not)."""
    return field(default=default, metadata=dict(help=help, choices=choices, low=low, high=high, low_open=low_open,
                                                 const=const, parse=parse))


RECOMPUTE_WORDS = ("auto", "selective", "selective-attention")  # --gradient-checkpointing's settings beside a fraction


def _fraction_or_word(text: str) -> float | str:
    return str(text) if str(text) in RECOMPUTE_WORDS else float(text)


def _token_list(text: str | None) -> tuple[int | str, ...]:
    """--lora-trainable-tokens' comma-separated items: numbers as token ids, anything else as token strings (spaces
    around an item dropped); ConfigError on an empty item."""
    if not text:
        return ()
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise ConfigError(f"--lora-trainable-tokens {text!r}: an empty item (give token ids or strings, "
                          f"comma-separated)")
    return tuple(int(item) if item.isdigit() else item for item in items)


def _required(help: str):
    return field(metadata=dict(help=help))


@dataclass(frozen=True)
class TrainConfig:
    model_path: str = _required("Hugging Face checkpoint folder to start from")
    data_path: str = _required("folder written by `python -m ochat.data.generate_dataset` (train.arrow, eval.arrow, "
                               "meta.json)")
    save_path: str = _required("output folder: ep_N/ and final/ Hugging Face checkpoints, ds_state/ for --resume")
    model_type: Optional[str] = _opt(None, "model type the dataset was made for (checked against its meta.json; "
                                           "default: the dataset's)")
    epochs: int = _opt(5, "passes over the training data", low=1)
    lr: float = _opt(2e-5, "peak learning rate", low=0.0, low_open=True)
    lr_min_ratio: float = _opt(0.1, "the cosine schedule decays to lr x this", low=0.0, high=1.0)
    lr_warmup_steps: Optional[int] = _opt(None, "linear warmup steps (default: --lr-warmup-ratio of all steps)", low=0)
    lr_warmup_ratio: float = _opt(0.05, "warmup as a share of all steps, when --lr-warmup-steps is not given",
                                  low=0.0, high=1.0)
    weight_decay: float = _opt(0.1, "AdamW weight decay of the weight matrices (norms and biases get none)", low=0.0)
    beta1: float = _opt(0.9, "AdamW beta1", low=0.0, high=1.0)
    beta2: float = _opt(0.95, "AdamW beta2", low=0.0, high=1.0)
    eps: float = _opt(1e-5, "AdamW epsilon", low=0.0, low_open=True)
    batch_max_len: Optional[int] = _opt(None, "tokens per GPU per micro-step: the pack size, x --sequence-parallel "
                                              f"(default: {CONVERSATIONS_PER_PACK} x the chat format's context length)",
                                        low=1)
    batch_size_per_gpu: Optional[int] = _opt(None, "OpenChat's spelling: batch-max-len = this x context length", low=1)
    grad_accum: int = _opt(1, "micro-steps per optimizer step", low=1)
    grad_clip: float = _opt(1.0, "clip the gradient norm to this (0: no clipping)", low=0.0)
    seed: int = _opt(42, "seed of the data order (and of everything random)")
    save_every: Optional[int] = _opt(None, "also write a checkpoint every N epochs (default: only at the end)", low=1)
    save_state_every: Optional[int] = _opt(None, "also write the DeepSpeed resume state (not a Hugging Face "
                                                 "checkpoint) every N optimizer steps, so --resume can continue "
                                                 "mid-epoch; the newest 2 states are kept", low=1)
    eval_every: int = _opt(1, "evaluate on eval.arrow every N epochs and after the last (0: never)", low=0)
    sequence_parallel: int = _opt(1, "ranks that share each pack (DeepSpeed Ulysses sequence parallelism): each holds "
                                     "1/N of its tokens and attention splits the heads over them, so packs and "
                                     "conversations reach N x --batch-max-len tokens; N divides the ranks and the "
                                     "attention heads", low=1)
    expert_parallel: int = _opt(1, "mixture-of-experts models: ranks that split each expert layer's experts (each "
                                   "holds 1/N of them, the tokens routed to them exchanged by all-to-all; attention "
                                   "and the other weights stay data parallel over all ranks); N divides the experts "
                                   "and the ranks; ZeRO-2", low=1)
    tiled_mlp: int = _opt(1, "run each decoder layer's MLP over N slices of the tokens (DeepSpeed's TiledMLP): less "
                             "activation memory for long packs, one more MLP forward per layer; 1: off", low=1)
    offload_activations: bool = _opt(False, "keep the inputs of checkpointed layers in CPU memory (DeepSpeed's "
                                            "cpu_checkpointing); needs --gradient-checkpointing and a GPU")
    gradient_checkpointing: float | str = _opt(0.0, "recompute activations in the backward: the bare flag, every "
                                                    "decoder layer; a fraction (e.g. 0.5), that share of the layers, "
                                                    "evenly spread (less recompute, more memory); selective: every "
                                                    "layer keeps its GEMM outputs and attention and recomputes only "
                                                    "the norms, RoPE and GLU; selective-attention: attention "
                                                    "recomputed too; auto: the least recompute that fits the GPU "
                                                    "(per layer none, selective or full), chosen after the second step",
                                               low=0.0, high=1.0, const=1.0, parse=_fraction_or_word)
    fp8: Optional[str] = _opt(None, "train the decoder layers' linear layers in float8 (torchao; H100/H200): "
                                    "tensorwise or rowwise scaling; the lm_head and the loss stay bf16",
                              choices=FP8_RECIPES)
    compile: bool = _opt(False, "compile each decoder layer with torch.compile: norms, RoPE, SwiGLU, residual adds and "
                                "float8 casts fused by the compiler (the first step also compiles); "
                                "ZeRO-2 or lower, without --sequence-parallel, --tiled-mlp or --offload-activations")
    lora_rank: int = _opt(0, "train LoRA adapters of this rank on the decoder layers' linear layers (peft), the "
                             "base model frozen; adapters created in float32, their master weights and optimizer "
                             "state float32 (bf16 runs compute them in bf16); each checkpoint folder gets them in "
                             "PEFT's format in adapter/; 0: off (full fine-tuning)", low=0)
    lora_alpha: Optional[float] = _opt(None, "LoRA scale numerator: adapters add (alpha / rank) B A (default: 2 x "
                                             "--lora-rank)", low=0.0, low_open=True)
    lora_dropout: float = _opt(0.0, "dropout on the LoRA adapters' input", low=0.0, high=1.0)
    lora_targets: str = _opt("all", "linear layers that get LoRA adapters, in every decoder layer (never lm_head or "
                                    "the embeddings): attention (q/k/v/o projections, Phi-3's qkv_proj), mlp (gate/up/"
                                    "down, Phi-3's gate_up_proj), all: both", choices=tuple(LORA_TARGETS))
    lora_trainable_tokens: Optional[str] = _opt(None, "with --lora-rank: also train the embedding and lm_head rows "
                                                      "of these tokens (e.g. an end-of-turn token added by "
                                                      "ochat.training.add_tokens), comma-separated token ids or "
                                                      "strings of the training tokenizer (a token with a comma or "
                                                      "spaces around it: its id); peft's trainable tokens, saved "
                                                      "in adapter/ and merged by --merge-lora; one set of rows when "
                                                      "the embedding and lm_head are tied")
    qlora: bool = _opt(False, "with --lora-rank: hold the frozen linear layers of the decoder layers (and an expert "
                              "model's stacked experts) in 4-bit NF4 (torchao; QLoRA), dequantised in each forward: "
                              "0.52 bytes per base weight instead of 2; embeddings, norms, routers and lm_head stay "
                              "bf16; the adapter is trained against the quantised base; ZeRO stage 2 or lower, "
                              "without --merge-lora")
    merge_lora: bool = _opt(False, "with --lora-rank: checkpoint folders also hold the full model with the adapters "
                                   "merged into its weights (default: only adapter/, tokenizer and config)")
    router_aux_loss_coef: Optional[float] = _opt(None, "mixture-of-experts models: weight of the router's "
                                                       "load-balancing loss, added to the weighted cross-entropy "
                                                       "(default: config.json's router_aux_loss_coef; 0: off)",
                                                 low=0.0)
    attn_impl: str = _opt("auto", "attention backend (auto: the fastest available on the device)",
                          choices=("auto",) + ATTENTION_BACKENDS)
    dtype: str = _opt("auto", "auto: bf16 on GPUs, float32 on CPUs (exact tests and resume)", choices=DTYPE_CHOICES)
    deepspeed_config: str = _opt("zero2", "zero2, zero3, zero3_offload, or a DeepSpeed JSON file")
    master_dtype: str = _opt("float32", "dtype of the optimizer's weights, gradients and AdamW moments in bf16 runs: "
                                        "float32 (16 bytes per parameter with the bf16 weights and gradients) or "
                                        "bf16 (10 bytes, a faster update; updates smaller than bf16's resolution "
                                        "of a weight are lost); ZeRO 1-3 without optimizer offload",
                             choices=MASTER_DTYPES)
    resume: bool = _opt(False, "continue from save-path/ds_state exactly where the last run stopped")
    overwrite: bool = _opt(False, "replace the previous run in --save-path (its checkpoints, resume states and metrics)")
    wandb_project: Optional[str] = _opt(None, "log to this Weights & Biases project (files under save-path/wandb)")
    wandb_entity: Optional[str] = _opt(None, "Weights & Biases entity (team or user)")
    wandb_mode: Optional[str] = _opt(None, "online or offline logs to --wandb-project (default project: ochat); "
                                           "default: online when --wandb-project is given, else no logging",
                                     choices=WANDB_MODES)
    max_skipped_steps: int = _opt(0, "optimizer updates skipped for a non-finite gradient that are tolerated in a "
                                     "row before the run stops as diverged; above 0, bf16 ZeRO 1-2 scan every "
                                     "gradient for inf/nan before each update (about 10%% slower)", low=0)
    spike_factor: float = _opt(10.0, "stop as diverged when a step's loss exceeds this many times (its gradient norm "
                                     "this squared) the median of the last 20 steps; 0: off", low=0.0)
    log_every: int = _opt(10, "steps between plain log lines when stdout is not a terminal", low=1)
    max_steps: Optional[int] = _opt(None, "stop after this many optimizer steps", low=1)
    skip_self_check: bool = _opt(False, "skip the packed-vs-per-conversation logits check before the first step")
    no_save: bool = _opt(False, "write no checkpoint at all (benchmarks)")
    local_rank: int = _opt(-1, argparse.SUPPRESS)  # set by the deepspeed launcher

    def to_json(self) -> str:
        """The resolved configuration; `--config` reads it back."""
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k != "local_rank"}, indent=2,
                          sort_keys=True)

    def pack_tokens(self, context_length: int) -> int:
        """--batch-max-len, or its default for a chat format of this context length."""
        return self.batch_max_len or (self.batch_size_per_gpu or CONVERSATIONS_PER_PACK) * context_length

    @property
    def transforms(self) -> ModelTransforms:
        """The model transforms these flags ask for (ochat.model.transforms)."""
        return ModelTransforms(fp8=self.fp8, recompute=self.gradient_checkpointing, tiled_mlp=self.tiled_mlp,
                               offload_activations=self.offload_activations, compile=self.compile,
                               sequence_parallel=self.sequence_parallel, lora_rank=self.lora_rank,
                               lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                               lora_targets=self.lora_targets,
                               lora_trainable_tokens=_token_list(self.lora_trainable_tokens), qlora=self.qlora,
                               seed=self.seed,
                               router_aux_loss_coef=self.router_aux_loss_coef, expert_parallel=self.expert_parallel)

    @property
    def wandb_enabled(self) -> bool:
        return self.wandb_mode != "disabled" and (self.wandb_project is not None or self.wandb_mode is not None)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`(default: X)` after each flag's help, unless the help already says what the default is."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line (not argparse's usage block on every rank), no traceback
        raise ConfigError(message)


def _field_types() -> dict[str, type]:
    """Each field's value type (int, float, str or bool), Optional unwrapped."""
    out = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[name] = args[0] if args else hint
    return out


def _flags(name: str) -> list[str]:
    return ["--" + name.replace("_", "-")] + (["--" + name] if "_" in name else [])


def build_parser() -> argparse.ArgumentParser:
    """The trainer's command line: one flag per TrainConfig field, plus --config."""
    p = _Parser(prog=f"deepspeed --module {PROG}", allow_abbrev=False, formatter_class=_HelpFormatter,
                description="Packed supervised fine-tuning with DeepSpeed.")
    p.add_argument("--config", metavar="FILE", help="a YAML or JSON run file: any flag as a key; flags given on the "
                                                    "command line override it")
    types = _field_types()
    for f in dataclasses.fields(TrainConfig):
        meta, typ = f.metadata, types[f.name]
        kw = dict(dest=f.name, help=meta["help"], default=None if f.default is dataclasses.MISSING else f.default)
        if typ is bool:
            p.add_argument(*_flags(f.name), action="store_true", **kw)
            continue
        if meta.get("const") is not None:
            kw.update(nargs="?", const=meta["const"])
        p.add_argument(*_flags(f.name), type=meta.get("parse") or typ, choices=meta.get("choices"), **kw)
    return p


def _read_run_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """The run file's keys as parser defaults, each value converted like its flag (YAML reads 2e-5 as a string)."""
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions}
    types = _field_types()
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in types or name == "local_rank":
            raise ConfigError(f"--config {path}: unknown key {key!r}")
        if value is None or types[name] is bool:
            out[name] = value
            continue
        try:
            out[name] = (actions[name].type or types[name])(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--config {path}: {key}: {value!r} is not a {types[name].__name__}") from None
        choices = actions[name].choices
        if choices and out[name] not in choices:
            raise ConfigError(f"--config {path}: {key}: {value!r} is not one of {', '.join(choices)}")
    return out


def check(cfg: TrainConfig) -> TrainConfig:
    """Range and consistency checks; raises ConfigError naming the flag, its value and what it accepts."""
    for f in dataclasses.fields(TrainConfig):
        value, meta = getattr(cfg, f.name), f.metadata
        if f.default is dataclasses.MISSING and value is None:
            raise ConfigError(f"the following arguments are required: {_flags(f.name)[0]}")
        if value is None or isinstance(value, (bool, str)):  # choices are argparse's to check; "auto" is a choice
            continue
        low, high = meta.get("low"), meta.get("high")
        bad = not math.isfinite(value) if isinstance(value, float) else False
        if low is not None:
            bad |= value <= low if meta.get("low_open") else value < low
        if high is not None:
            bad |= value > high
        if bad:
            want = " and ".join(x for x in (
                (f"> {low}" if meta.get("low_open") else f">= {low}") if low is not None else "",
                f"<= {high}" if high is not None else "") if x)
            raise ConfigError(f"{_flags(f.name)[0]} must be a finite number {want} (got {value})")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("give --resume (continue the run in --save-path) or --overwrite (replace it), not both")
    if cfg.merge_lora and not cfg.lora_rank:
        raise ConfigError("--merge-lora merges LoRA adapters into the checkpoints: add --lora-rank")
    if cfg.merge_lora and cfg.qlora:
        raise ConfigError("--merge-lora with --qlora is refused: the trainer holds only the NF4 copy of the base; merge "
                          "adapter/ into the original weights with peft's merge_and_unload (docs/training.md)")
    problems = refusals(cfg.transforms)
    if problems:
        raise ConfigError(problems[0])
    if cfg.batch_max_len is not None and cfg.batch_size_per_gpu is not None:
        raise ConfigError("give --batch-max-len or --batch-size-per-gpu, not both")
    if cfg.deepspeed_config not in DEEPSPEED_CONFIGS and not os.path.isfile(cfg.deepspeed_config):
        raise ConfigError(f"--deepspeed-config {cfg.deepspeed_config!r} is neither one of "
                          f"{', '.join(DEEPSPEED_CONFIGS)} nor a file")
    return cfg


def parse_args(argv=None) -> TrainConfig:
    """Command line (and --config run file) -> a checked TrainConfig; bad input exits 2 with one line."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**_read_run_file(first.config, parser))
    args = vars(parser.parse_args(argv))
    args.pop("config")
    return check(TrainConfig(**args))
