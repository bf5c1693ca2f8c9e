"""The model's public path for code written against it: `ochat.training.model.PackedCausalLM` is
`ochat.model.PackedCausalLM` (the model now lives in `ochat.model`)."""
from ochat.model.decoder import PackedCausalLM

__all__ = ["PackedCausalLM"]
