"""Training configuration: one frozen dataclass, its command line, and its defaults.

Every flag has a dash spelling (`--model-path`) and OpenChat's underscore spelling (`--model_path`).
Unknown flags are an error (OpenChat's trainer silently ignored them).
"""
import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

DEEPSPEED_CONFIGS = {
    name: os.path.join(os.path.dirname(__file__), "deepspeed", name + ".json")
    for name in ("zero2", "zero3", "zero3_offload")
}


@dataclass(frozen=True)
class TrainConfig:
    model_path: str
    data_path: str
    save_path: str
    model_type: Optional[str] = None  # default: meta.json's model_type
    epochs: int = 5
    lr: float = 2e-5
    lr_min_ratio: float = 0.1
    lr_warmup_steps: Optional[int] = None
    lr_warmup_ratio: float = 0.05  # used when --lr-warmup-steps is not given
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    batch_max_len: Optional[int] = None  # tokens per GPU per micro-step; default 8 x context length
    batch_size_per_gpu: Optional[int] = None  # OpenChat's spelling: batch_max_len = this x context length
    grad_accum: int = 1
    grad_clip: float = 1.0
    seed: int = 42
    save_every: Optional[int] = None  # epochs; None = only at the end
    save_state_every: Optional[int] = None  # optimizer steps between mid-epoch DeepSpeed states; None = with save_every
    eval_every: Optional[int] = 1  # epochs; 0/None = never
    gradient_checkpointing: float = 0.0  # fraction of decoder layers recomputed; the bare flag means 1.0 (all)
    attn_impl: str = "auto"
    dtype: str = "auto"  # auto = bf16 on GPU, float32 on CPU
    deepspeed_config: str = "zero2"  # zero2 | zero3 | zero3_offload | a JSON file
    resume: bool = False
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    wandb_mode: str = "online"  # online | offline | disabled (wandb is used only with --wandb-project)
    log_every: int = 10  # steps between plain log lines when stdout is not a terminal
    max_steps: Optional[int] = None  # stop after this many optimizer steps (benchmarks, tests)
    skip_self_check: bool = False
    no_save: bool = False  # benchmarks: write no checkpoint at all
    local_rank: int = -1  # set by the deepspeed launcher

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


_HELP = {
    "model_path": "Hugging Face checkpoint folder to start from",
    "data_path": "folder written by `python -m ochat.data.generate_dataset` (train.arrow, eval.arrow, meta.json)",
    "save_path": "output folder: ep_N/ Hugging Face checkpoints, final/, ds_state/ for --resume",
    "batch_max_len": "tokens per GPU per micro-step (default 8 x context length)",
    "batch_size_per_gpu": "OpenChat's spelling: batch-max-len = this x context length",
    "deepspeed_config": "zero2 (default), zero3, zero3_offload, or a DeepSpeed JSON file",
    "resume": "continue from save-path/ds_state exactly where the last run stopped",
    "save_state_every": "also write the DeepSpeed resume state (not a Hugging Face checkpoint) every N optimizer "
                        "steps, so --resume can continue mid-epoch; the newest 2 states are kept",
    "max_steps": "stop after this many optimizer steps",
    "no_save": "write no checkpoint (benchmarks)",
    "skip_self_check": "skip the packed-vs-per-conversation logits check before the first step",
    "dtype": "auto (bf16 on GPU, float32 on CPU), bf16 or float32",
    "attn_impl": "attention backend: auto, flash, varlen, sdpa, ... (see ochat.kernels.attention)",
    "log_every": "steps between plain log lines when stdout is not a terminal",
    "gradient_checkpointing": "recompute activations in the backward: alone, every decoder layer; with a fraction "
                              "(e.g. 0.5), that share of the layers, evenly spread (less recompute, more memory)",
}
# argparse settings that differ from the field's type: `--gradient-checkpointing` alone means 1.0
_ARG_OVERRIDES = {"gradient_checkpointing": dict(type=float, nargs="?", const=1.0)}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, exit 2, no traceback
        self.print_usage()
        raise SystemExit(f"ochat.training.train: error: {message}")


def build_parser():
    p = _Parser(prog="deepspeed --module ochat.training.train", allow_abbrev=False,
                description="Packed supervised fine-tuning with DeepSpeed.")
    for f in dataclasses.fields(TrainConfig):
        names = ["--" + f.name.replace("_", "-")]
        if "_" in f.name:
            names.append("--" + f.name)
        required = f.default is dataclasses.MISSING
        if f.name in _ARG_OVERRIDES:
            p.add_argument(*names, dest=f.name, default=f.default, help=_HELP.get(f.name), **_ARG_OVERRIDES[f.name])
            continue
        if f.type in (bool, "bool"):
            p.add_argument(*names, dest=f.name, action="store_true", help=_HELP.get(f.name))
            continue
        if f.type in ("Optional[int]", Optional[int], "int", int):
            typ = int
        elif f.type in ("float", float):
            typ = float
        else:
            typ = str
        p.add_argument(*names, dest=f.name, type=typ, required=required, default=None if required else f.default,
                       help=_HELP.get(f.name))
    return p


def parse_args(argv=None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    if cfg.batch_max_len is not None and cfg.batch_size_per_gpu is not None:
        raise SystemExit("ochat.training.train: error: give --batch-max-len or --batch-size-per-gpu, not both")
    if cfg.grad_accum < 1 or cfg.epochs < 1:
        raise SystemExit("ochat.training.train: error: --grad-accum and --epochs must be >= 1")
    if cfg.save_state_every is not None and cfg.save_state_every < 1:
        raise SystemExit("ochat.training.train: error: --save-state-every must be >= 1")
    if not 0.0 <= cfg.gradient_checkpointing <= 1.0:
        raise SystemExit("ochat.training.train: error: --gradient-checkpointing takes a fraction of the layers in [0, 1]")
    if cfg.wandb_mode not in ("online", "offline", "disabled"):
        raise SystemExit("ochat.training.train: error: --wandb-mode must be online, offline or disabled")
    return cfg


def load_deepspeed_config(name_or_path, *, grad_accum, grad_clip, bf16):
    """Read a shipped config by name (zero2, zero3, zero3_offload) or a JSON file; fill its "auto" values."""
    path = DEEPSPEED_CONFIGS.get(name_or_path, name_or_path)
    if not os.path.isfile(path):
        raise SystemExit(f"ochat.training.train: error: --deepspeed-config {name_or_path!r} is neither "
                         f"{', '.join(DEEPSPEED_CONFIGS)} nor a file")
    with open(path) as fh:
        ds = json.load(fh)
    fill = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": grad_clip}
    for k, v in fill.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = bf16
    ds.pop("train_batch_size", None)
    return ds
