"""The padding-free model: `PackedCausalLM` (decoder.py), its `ModelConfig` (config.py), Hugging Face weights in
and out (hf_weights.py), and the transforms training applies to it in one fixed order (transforms.py)."""
from ochat.model.config import ModelConfig
from ochat.model.decoder import PackedCausalLM
from ochat.model.transforms import ModelTransforms, apply_transforms

__all__ = ["ModelConfig", "ModelTransforms", "PackedCausalLM", "apply_transforms"]
