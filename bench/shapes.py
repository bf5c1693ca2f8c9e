"""The model shapes the benchmarks measure (random weights; vocabulary of Llama 2 + OpenChat's two tokens unless
the family has its own)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ochat.model.config import ModelConfig  # noqa: E402


def tinyllama_1b(vocab_size: int = 32002) -> ModelConfig:
    """The 1.1B LLaMA shape (TinyLlama: 22 layers, hidden 2048, intermediate 5632, GQA 32/4)."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5)


def llama2_7b(vocab_size: int = 32002) -> ModelConfig:
    """The Llama 2 7B shape (32 layers, hidden 4096, intermediate 11008, 32 heads, no GQA)."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)


def llama3_8b() -> ModelConfig:
    """The Llama 3 8B shape (32 layers, hidden 4096, intermediate 14336, GQA 32/8, vocabulary 128256, rope_theta
    500000)."""
    return ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)


TINY = ModelConfig.debug(vocab_size=512, intermediate_size=128, max_position_embeddings=4096)  # CPU smoke runs
SHAPES = {"1b": tinyllama_1b(), "7b": llama2_7b(), "8b": llama3_8b(), "tiny": TINY}
