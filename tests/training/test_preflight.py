"""Pre-flight checks: the self-check refuses packs whose conversations can see each other."""
import pytest
import torch

from ochat.kernels.attention import varlen_attention_sdpa
from ochat.training import model as model_mod
from ochat.training import preflight
from ochat.training.model import PackedCausalLM
from ochat.training.model_config import ModelConfig
from ochat.training.runtime import TrainError


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
    monkeypatch.setattr(model_mod, "varlen_attention",
                        lambda q, k, v, cu_seqlens, max_seqlen, window=None, backend=None:
                        varlen_attention_sdpa(q, k, v, cu_seqlens, window=window, leak=True))
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
