"""Resume states read without running code: DeepSpeed's files loaded with `torch.load(weights_only=True)`.

DeepSpeed reads its own checkpoint files with `torch.load(weights_only=False)`, which runs any code a pickle
names: a file planted in a run folder would run on every rank at --resume. `SafeCheckpointEngine` is DeepSpeed's
torch checkpoint engine with a load that accepts tensors, plain Python values and the few DeepSpeed types its
states hold (`DEEPSPEED_STATE_TYPES`, seen in ZeRO-2 and ZeRO-3 states of DeepSpeed 0.19), and refuses
anything else in one line naming the file.
"""
from __future__ import annotations

import pickle

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

DEEPSPEED_STATE_TYPES = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class UnsafeState(Exception):
    """A resume-state file that holds more than tensors, plain values and DeepSpeed's state types."""


def load_state_file(path: str, map_location=None):
    """One file of a resume state, loaded without running code (UnsafeState when it would need to)."""
    with torch.serialization.safe_globals(DEEPSPEED_STATE_TYPES):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            reason = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "not a plain state")
            raise UnsafeState(f"{path} would run code to load ({reason.split(' was not')[0]}): refused") from None


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading through `load_state_file`."""

    def load(self, path: str, map_location=None):
        return load_state_file(path, map_location)
