"""Pre-flight checks: the self-check refuses packs whose conversations can see each other; the long-context flags
are refused where they cannot work."""
import json
import os

import numpy as np
import pytest
import torch

from ochat.config.train_config import TrainConfig
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


def config(tmp_path, **kw):
    from ochat.config.train_config import TrainConfig
    return TrainConfig(model_path="m", data_path="d", save_path=str(tmp_path / "run"), **kw)


def test_previous_run_outputs_are_ochats_names_only(tmp_path):
    run = tmp_path / "run"
    for name in ("ep_0", "ep_12", "final", "ds_state", "src", "ep_x", "final2"):
        (run / name).mkdir(parents=True)
    for name in ("metrics.jsonl", "notes.txt"):
        (run / name).write_text("")
    assert preflight.previous_run_outputs(str(run)) == ["ds_state", "ep_0", "ep_12", "final", "metrics.jsonl"]


def test_overwrite_deletes_only_the_previous_runs_outputs(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match="holds a previous run"):
        preflight.prepare_save_path(config(tmp_path), is_main=True)
    preflight.prepare_save_path(config(tmp_path, overwrite=True), is_main=True)
    assert sorted(os.listdir(run)) == [".ochat.lock", "notes.txt"]


def test_two_runs_cannot_write_one_save_path(tmp_path):
    held = preflight.prepare_save_path(config(tmp_path), is_main=True)
    with pytest.raises(TrainError, match="is being written by another run"):
        preflight.prepare_save_path(config(tmp_path), is_main=True)
    held.close()
    preflight.prepare_save_path(config(tmp_path), is_main=True).close()


def test_disk_space_for_a_checkpoint_and_a_state(tmp_path):
    preflight.check_disk_space(str(tmp_path), 1_000_000, bf16=True)
    with pytest.raises(TrainError, match=r"need about .* GiB: free space, choose another folder, or pass --no-save"):
        preflight.check_disk_space(str(tmp_path), 10**15, bf16=True)


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
def test_long_context_flags_that_cannot_work_are_refused(tmp_path, flags, world, message):
    with pytest.raises(TrainError) as e:
        preflight.check_long_context(_with_model_config(tmp_path, **flags), world, torch.device("cpu"))
    assert message in str(e.value)


def test_sequence_parallel_dividing_heads_and_ranks_passes(tmp_path):
    for size, world in ((2, 4), (3, 6)):  # 6 query heads; 3 KV heads are repeated for 2 ranks
        preflight.check_long_context(_with_model_config(tmp_path, sequence_parallel=size), world, torch.device("cpu"))


class _Lengths:
    def __init__(self, *lengths):
        self.lengths = np.array(lengths)

    def __len__(self):
        return len(self.lengths)


def test_a_conversation_must_fit_the_pack_of_a_group():
    preflight.check_lengths(64, 2, train=_Lengths(100, 128), eval=None)
    with pytest.raises(TrainError, match="129 tokens, longer than --batch-max-len 64 x --sequence-parallel 2"):
        preflight.check_lengths(64, 2, train=_Lengths(129), eval=None)
