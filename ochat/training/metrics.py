"""What a training step reports: tokens/s per GPU, MFU against the GPU's peak, the log line, the progress bar,
the run folder's metrics.jsonl (one JSON line per step and per eval, full precision) and Weights & Biases.

MFU = the model's training FLOPs (ModelConfig.flops_per_token: 6 x matmul parameters + causal attention) /
seconds / the GPU's dense bf16 peak. The peak is the one table below (benchmarks use it too).
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch

from ochat.config.train_config import TrainConfig
from ochat.model.config import ModelConfig
from ochat.training.runtime import TrainError
from ochat.training.step import StepStats
from ochat.utils.log import log
from ochat.utils.ranks import is_main

# Dense bf16 FLOP/s by GPU name. H100/H200/H800: 790 TFLOP/s, the measured ceiling of a bf16 8192^3 matmul on
# these GPUs (the 989 datasheet figure is not reached in practice). A100/A800: 312, the datasheet figure.
PEAK_FLOPS = {"H100": 790e12, "H200": 790e12, "H800": 790e12, "A100": 312e12, "A800": 312e12}


def peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device from PEAK_FLOPS, or None (CPU, unknown GPU: MFU not reported)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def step_flops(config: ModelConfig, tokens: float, sum_len_sq: float) -> float:
    """Training FLOPs of packs holding `tokens` tokens whose conversation lengths square-sum to `sum_len_sq`."""
    return config.flops_per_token(sum_len_sq / max(tokens, 1)) * tokens


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.1%}"


class ProgressLog:
    """Per-step reporting on rank 0: a tqdm bar on a terminal, else a line every `log_every` steps (and the
    first); wandb when enabled, with its files under the save path."""

    def __init__(self, cfg: TrainConfig, config: ModelConfig, *, metrics_path: str, world_size: int,
                 device: torch.device, total_steps: int, resumed_at: int = 0):
        self.cfg, self.config, self.world_size, self.total_steps = cfg, config, world_size, total_steps
        self.peak = peak_flops(device)
        self.is_main = is_main()
        self.bar = None
        self.metrics = self._open_metrics(metrics_path, resumed_at) if self.is_main else None
        self.wandb = self._init_wandb(os.path.dirname(metrics_path)) if self.is_main and cfg.wandb_enabled else None

    @staticmethod
    def _open_metrics(path: str, resumed_at: int):
        """The metrics file, keeping only the lines of steps up to `resumed_at` (a resumed run redoes the rest)."""
        kept = []
        if resumed_at and os.path.exists(path):
            with open(path) as fh:
                kept = [line for line in fh if json.loads(line)["step"] <= resumed_at]
        fh = open(path, "w")
        fh.writelines(kept)
        return fh

    def _record(self, **values) -> None:
        self.metrics.write(json.dumps(values) + "\n")
        self.metrics.flush()

    def _init_wandb(self, folder: str):
        """Weights & Biases, its files under `folder`/wandb."""
        import wandb

        project = self.cfg.wandb_project or "ochat"
        try:
            wandb.init(project=project, entity=self.cfg.wandb_entity, mode=self.cfg.wandb_mode or "online",
                       dir=folder, config=json.loads(self.cfg.to_json()))
        except (wandb.errors.Error, OSError) as e:
            raise TrainError(f"Weights & Biases: {str(e).strip().splitlines()[0]} Log in with `wandb login`, or log "
                             f"locally with --wandb-mode offline") from None
        log(f"wandb: project {project}, mode {self.cfg.wandb_mode or 'online'}, files under {folder}/wandb")
        return wandb

    def start_epoch(self, epoch: int, first_step: int, steps: int) -> None:
        if self.is_main and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=steps, initial=first_step, desc=f"epoch {epoch}", dynamic_ncols=True)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def step(self, epoch: int, global_step: int, stats: StepStats, eta_seconds: float, packing_efficiency: float):
        if not self.is_main:
            return
        tps = stats.tokens / self.world_size / max(stats.seconds, 1e-9)
        # expert models: the load-balancing loss trained on and the busiest expert's load over the mean
        experts = dict(aux_loss=stats.aux_loss, expert_load=stats.expert_load) if stats.expert_load else {}
        mfu = (step_flops(self.config, stats.tokens, stats.sum_len_sq) / self.world_size / stats.seconds / self.peak
               if self.peak else float("nan"))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}", tok_s_gpu=f"{tps:.0f}", mfu=_pct(mfu),
                                 eta=f"{eta_seconds / 60:.1f}m")
            self.bar.update(1)
        elif global_step % self.cfg.log_every == 0 or global_step == 1:
            log(f"epoch {epoch} step {global_step}/{self.total_steps} loss {stats.loss:.4f} lr {stats.lr:.3e} "
                f"grad_norm {stats.grad_norm:.3f} tokens/s/gpu {tps:.0f} mfu {_pct(mfu)} eta {eta_seconds / 60:.1f}m"
                + "".join(f" {k} {v:.4f}" for k, v in experts.items()))
        self._record(step=global_step, epoch=epoch, loss=stats.loss, lr=stats.lr, grad_norm=stats.grad_norm,
                     token_accuracy=stats.token_accuracy, tokens=stats.tokens, seconds=stats.seconds,
                     tokens_per_s_per_gpu=tps, mfu=mfu if math.isfinite(mfu) else None, **experts)
        if self.wandb is not None:
            self.wandb.log({"train/loss": stats.loss, "train/token_accuracy": stats.token_accuracy, "train/lr": stats.lr,
                            "train/grad_norm": stats.grad_norm, "train/tokens_per_s_per_gpu": tps, "train/mfu": mfu,
                            "train/packing_efficiency": packing_efficiency, "epoch": epoch,
                            **{f"train/{k}": v for k, v in experts.items()}}, step=global_step)

    def eval(self, epoch: int, global_step: int, loss: float) -> None:
        if not self.is_main:
            return
        log(f"epoch {epoch} eval/loss {loss:.4f}")
        self._record(step=global_step, epoch=epoch, eval_loss=loss)
        if self.wandb is not None:
            self.wandb.log({"eval/loss": loss}, step=global_step)

    def close(self) -> None:
        self.end_epoch()
        if self.metrics is not None:
            self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()
