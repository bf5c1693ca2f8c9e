"""Pre-flight checks: the self-check refuses packs whose conversations can see each other; the long-context flags
are refused where they cannot work."""
import json

import numpy as np
import pytest
import torch

from ochat.config.train_config import TrainConfig
from ochat.kernels.attention import varlen_attention_sdpa
from ochat.model import decoder as model_mod
from ochat.model.config import ModelConfig
from ochat.model.decoder import PackedCausalLM
from ochat.training import preflight
from ochat.training.runtime import TrainError
from tests.helpers.models import leaky_attention


def tiny_model():
    """Weights large enough that attention is sharp: positions and context visibly change the logits."""
    torch.manual_seed(0)
    model = PackedCausalLM(ModelConfig.debug(), attn_impl="sdpa")
    model.reset_parameters(std=0.3)
    return model


def test_isolated_model_passes(capsys):
    preflight.self_check(tiny_model(), 128, torch.device("cpu"), bf16=False)
    assert "self-check passed" in capsys.readouterr().out


def test_leaky_attention_is_refused(monkeypatch):
    monkeypatch.setattr(model_mod, "varlen_attention", leaky_attention)
    for bf16 in (False, True):  # the isolation comparison does not depend on the dtype's noise
        with pytest.raises(TrainError, match="changed the logits of the others"):
            preflight.self_check(tiny_model(), 128, torch.device("cpu"), bf16=bf16)


def test_a_packing_dependent_error_without_a_leak_is_refused(monkeypatch):
    """A backend that gets later conversations of a pack wrong without reading earlier ones: only the
    packed-vs-alone comparison sees it. (Positions that do not restart would not be an error: RoPE attention
    depends only on position differences within a conversation.)"""

    def wrong_after_first(q, k, v, cu_seqlens, max_seqlen, window=None, backend=None):
        out = varlen_attention_sdpa(q, k, v, cu_seqlens, window=window)
        out[int(cu_seqlens[1]):] *= 0.5
        return out

    monkeypatch.setattr(model_mod, "varlen_attention", wrong_after_first)
    with pytest.raises(TrainError, match="packed logits differ from per-conversation logits"):
        preflight.self_check(tiny_model(), 128, torch.device("cpu"), bf16=False)


def config(tmp_path, **kw):
    from ochat.config.train_config import TrainConfig
    return TrainConfig(model_path="m", data_path="d", save_path=str(tmp_path / "run"), **kw)


def _with_model_config(tmp_path, **flags) -> TrainConfig:
    heads = ModelConfig.debug(hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    (tmp_path / "config.json").write_text(json.dumps(heads.to_hf_config()))
    return TrainConfig(model_path=str(tmp_path), data_path="d", save_path="s", **flags)


@pytest.mark.parametrize("flags, world, message", [
    (dict(sequence_parallel=4), 8, "--sequence-parallel 4 must divide the model's 6 attention heads"),
    (dict(sequence_parallel=3), 4, "--sequence-parallel 3 must divide the number of ranks (4)"),
    (dict(offload_activations=True, gradient_checkpointing=1.0), 1, "--offload-activations moves activations from GPU "
                                                                    "to CPU memory: it needs a GPU"),
])
def test_transforms_that_cannot_work_here_are_refused(tmp_path, flags, world, message):
    with pytest.raises(TrainError) as e:
        preflight.check_transforms(_with_model_config(tmp_path, **flags), world, torch.device("cpu"))
    assert message in str(e.value)


def test_sequence_parallel_dividing_heads_and_ranks_passes(tmp_path):
    for size, world in ((2, 4), (3, 6)):  # 6 query heads; 3 KV heads are repeated for 2 ranks
        preflight.check_transforms(_with_model_config(tmp_path, sequence_parallel=size), world, torch.device("cpu"))


def test_trainable_tokens_resolve_through_the_training_tokenizer(tmp_path):
    from ochat.assets import LLAMA2_TOKENIZER
    from ochat.data import load_tokenizer
    from ochat.data.chat_formats import get_chat_format

    tokenizer = load_tokenizer(LLAMA2_TOKENIZER, get_chat_format("openchat_v3.2"))  # <|end_of_turn|> added: 32000
    cfg = config(tmp_path, lora_rank=4, lora_trainable_tokens="<|end_of_turn|>, 7,</s>")
    assert preflight.resolve_trainable_tokens(cfg, tokenizer).transforms.lora_trainable_tokens == (32000, 7, 2)
    assert preflight.resolve_trainable_tokens(config(tmp_path), tokenizer) == config(tmp_path)
    with pytest.raises(TrainError) as e:
        preflight.resolve_trainable_tokens(config(tmp_path, lora_rank=4, lora_trainable_tokens="7,<|im_end|>"),
                                           tokenizer)
    assert str(e.value).startswith("--lora-trainable-tokens: the tokenizer has no token '<|im_end|>'")


class _Lengths:
    def __init__(self, *lengths):
        self.lengths = np.array(lengths)

    def __len__(self):
        return len(self.lengths)


def test_a_conversation_must_fit_the_pack_of_a_group():
    preflight.check_lengths(64, 2, train=_Lengths(100, 128), eval=None)
    with pytest.raises(TrainError, match="129 tokens, longer than --batch-max-len 64 x --sequence-parallel 2"):
        preflight.check_lengths(64, 2, train=_Lengths(129), eval=None)


def test_an_attention_backend_that_is_not_installed_is_one_line():
    with pytest.raises(TrainError, match="--attn-impl flash_attn: attention backend 'flash_attn' is not available"):
        preflight.check_attention("flash_attn", torch.device("cpu"))
