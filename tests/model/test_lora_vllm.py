"""The adapters ochat saves (`final/adapter/`, ochat.model.lora.save_adapter) through vLLM's own LoRA loading, on CPU.

Skipped unless vLLM is installed (CI does not install it: several GB with a CUDA torch). vLLM's engine needs a GPU,
so this runs the part of vLLM that takes an adapter in: the tiny model of each type is built by vLLM
(`get_model`, dummy weights), wrapped by vLLM's LoRA model manager (`WorkerLoRAManager.create_lora_manager`: its
LoRA layers and the expected target modules), the adapter folder read by `WorkerLoRAManager._load_adapter`
(`PEFTHelper.from_local_dir`, `validate_legal`, `LoRAModel.from_local_checkpoint`), packed for the model
(`add_adapter`) and copied into the LoRA layers' buffers (`activate_adapter`). Then every adapted projection's
B A x scale in those buffers is compared with ochat's merged weights minus the base (`lora.merged_state_dict`), so
a name, a slice or an expert layout that vLLM reads differently from peft shows. Not served: no forward runs.

Shims stand in for the platform vLLM finds with no GPU (vLLM's CPU platform needs a triton-cpu build): its
attention backend, its LoRA kernel wrapper and its pinned-memory answer are the CPU platform's, and the MoE LoRA
kernel's device check passes (the kernel is chosen when the layer is built and never runs here).

The refusals (Qwen3-MoE's expert adapters without vLLM's mixed-format flag, trainable tokens) pin vLLM 0.34's
behaviour: when one of them fails, a newer vLLM changed it and docs/training.md's table needs the new answer.

Run: `python -m pytest -q tests/model/test_lora_vllm.py` in an environment with vLLM (and peft, ochat without deps).
"""
import contextlib
import socket

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from ochat.model import hf_weights, lora  # noqa: E402
from ochat.model.config import ModelConfig  # noqa: E402
from ochat.model.decoder import PackedCausalLM  # noqa: E402
from ochat.model.experts import deinterleave  # noqa: E402
from ochat.model.transforms import ModelTransforms, apply_transforms  # noqa: E402
from tests.helpers.models import VARIANTS, assert_close  # noqa: E402
from tests.model.test_moe import MOE  # noqa: E402

RANK = 8


@pytest.fixture(scope="module")
def vllm_runtime():
    """vLLM's platform shims and its one-rank process group (gloo), once for the module."""
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
    from vllm.platforms import current_platform
    from vllm.platforms.cpu import CpuPlatform

    platform = type(current_platform)
    saved = {name: getattr(platform, name) for name in
             ("get_attn_backend_cls", "get_punica_wrapper", "is_pin_memory_available")}
    for name in saved:
        setattr(platform, name, getattr(CpuPlatform, name))
    triton_device = TritonExperts.__dict__["_supports_current_device"]
    TritonExperts._supports_current_device = staticmethod(lambda: True)
    import vllm.utils.torch_utils
    vllm.utils.torch_utils.PIN_MEMORY = False  # read once at import
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with _vllm_config(None):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1, 1)
    yield
    for name, value in saved.items():
        setattr(platform, name, value)
    TritonExperts._supports_current_device = triton_device


@contextlib.contextmanager
def _vllm_config(vc):
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config

    with set_current_vllm_config(vc or VllmConfig(device_config=DeviceConfig("cpu"))):
        yield


def trained_adapter(name: str, folder, tokens=()) -> tuple[ModelConfig, dict[str, torch.Tensor], object]:
    """ochat's tiny model of `name` with rank-8 LoRA on `all` (B random, so every delta is non-zero), its adapter
    written to `folder` as the trainer writes final/adapter, and config.json for vLLM; returns the config, the
    full state dict and the LoraConfig."""
    torch.manual_seed(0)
    cfg = ModelConfig.debug(**{**VARIANTS, **MOE}[name])
    model = PackedCausalLM(cfg, attn_impl="sdpa")
    apply_transforms(model, ModelTransforms(lora_rank=RANK, lora_targets="all", lora_trainable_tokens=tokens))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n or lora.is_token_rows(n):
                p.normal_(std=0.1)
    adapter = lora.adapter_config(model)
    lora.save_adapter(str(folder / lora.ADAPTER_FOLDER), hf_weights.full_state_dict(model, only=lora.is_adapter_weight),
                      adapter, cfg, str(folder))
    hf_weights.save_config(str(folder), cfg, torch.float32)
    return cfg, hf_weights.full_state_dict(model), adapter


def vllm_load(folder, mixed_moe_format: bool):
    """vLLM's model of the config.json in `folder` (dummy weights) with LoRA enabled, and the adapter in
    `folder/adapter` loaded, packed and activated in its LoRA layers; returns vLLM's LoRA model manager.
    `mixed_moe_format`: vLLM's `--enable-mixed-moe-lora-format`, and the request's `is_3d_lora_weight`."""
    from vllm.config import DeviceConfig, LoadConfig, LoRAConfig, VllmConfig
    from vllm.config import ModelConfig as VllmModelConfig
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import WorkerLoRAManager
    from vllm.model_executor.model_loader import get_model

    vc = VllmConfig(model_config=VllmModelConfig(model=str(folder), skip_tokenizer_init=True, dtype="float32",
                                                 max_model_len=64),
                    lora_config=LoRAConfig(max_lora_rank=RANK, max_loras=1,
                                           enable_mixed_moe_lora_format=mixed_moe_format),
                    load_config=LoadConfig(load_format="dummy"), device_config=DeviceConfig("cpu"))
    with _vllm_config(vc):
        model = get_model(vllm_config=vc)
        workers = WorkerLoRAManager(vc, torch.device("cpu"), model.embedding_modules)
        workers.create_lora_manager(model, vc)
        adapter = workers._load_adapter(LoRARequest("ochat", 1, str(folder / lora.ADAPTER_FOLDER),
                                                    is_3d_lora_weight=mixed_moe_format))
        manager = workers._adapter_manager
        assert manager.add_adapter(adapter) and manager.activate_adapter(1)
    return manager


def ochat_deltas(state: dict[str, torch.Tensor], adapter) -> dict[str, torch.Tensor]:
    """(alpha / r) B A of every adapted weight, by its Hugging Face name without `.weight` (e.g.
    `model.layers.0.self_attn.q_proj`, `model.layers.0.mlp.experts.gate_up_proj` [E, 2I, H] in ochat's order: gate
    rows, then up rows): ochat's merged weights minus the base."""
    merged = lora.merged_state_dict(state, adapter)
    return {name.replace(".base_layer", "").removesuffix(".weight"):
            merged[name.replace(".base_layer", "")] - t for name, t in state.items()
            if ".base_layer." in name and not lora.is_adapter_weight(name) and not name.endswith("bias")}


# vLLM's fused projections and the Hugging Face projections whose adapters they stack, in vLLM's slice order
SLICES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def vllm_deltas(manager, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The B A (scale folded into B by vLLM) that vLLM's LoRA layers hold for adapter slot 0, by the Hugging Face
    name of what they adapt (as `ochat_deltas` names it); the stacked experts as [E, 2I, H] gate rows then up rows
    and [E, H, I]. vLLM's embedding and logits LoRA layers (which ochat never adapts) give their buffers, flat."""
    from vllm.lora.layers import FusedMoE3DWithLoRA, FusedMoEWithLoRA
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    out = {}
    for name, layer in manager.modules.items():
        hf = name.replace(".attn.", ".self_attn.")  # gpt-oss: vLLM's `attn` is transformers' `self_attn`
        if isinstance(layer, FusedMoEWithLoRA):
            a13, b13 = ([t[0] for t in s] for s in (layer.w13_lora_a_stacked, layer.w13_lora_b_stacked))
            if isinstance(layer, FusedMoE3DWithLoRA):  # one w13 in the model's row order (gpt-oss: interleaved)
                gate_up = b13[0] @ a13[0]
                if cfg.arch.experts is not None and cfg.arch.experts.fused:
                    gate_up = deinterleave(gate_up, 1)
            else:  # w1 (gate) and w3 (up)
                gate_up = torch.cat([b13[0] @ a13[0], b13[1] @ a13[1]], dim=1)
            out[f"{hf}.gate_up_proj"] = gate_up
            out[f"{hf}.down_proj"] = layer.w2_lora_b_stacked[0][0] @ layer.w2_lora_a_stacked[0][0]
        elif isinstance(layer, BaseLinearLayerWithLoRA):
            prefix, leaf = hf.rsplit(".", 1)
            slices = zip(SLICES.get(leaf, (leaf,)), layer.lora_a_stacked, layer.lora_b_stacked, strict=True)
            for part, a, b in slices:
                out[f"{prefix}.{part}"] = b[0, 0] @ a[0, 0]
        else:
            out[hf] = torch.cat([t.flatten() for t in (layer.lora_a_stacked, layer.lora_b_stacked)])
    return out


MODELS = [("llama2", False), ("qwen3_qk_norm", False), ("mistral_window", False), ("qwen3_moe", True),
          ("gpt_oss", False), ("gpt_oss", True)]


@pytest.mark.parametrize("name,mixed_moe_format", MODELS)
def test_vllm_loads_the_adapter_with_ochat_weights_in_its_lora_layers(vllm_runtime, name, mixed_moe_format, tmp_path):
    """vLLM accepts the adapter and holds, in its LoRA layers, exactly ochat's (alpha / r) B A of every adapted
    projection and expert (float32, within 1e-5 relative); every other LoRA layer of vLLM's (routers) stays zero.
    Qwen3-MoE (whose vLLM experts are per-expert, 2D) takes the stacked expert adapters only with
    `--enable-mixed-moe-lora-format` and `is_3d_lora_weight` on the request; gpt-oss (3D in vLLM) either way."""
    cfg, state, adapter = trained_adapter(name, tmp_path)
    manager = vllm_load(tmp_path, mixed_moe_format)
    expected, held = ochat_deltas(state, adapter), vllm_deltas(manager, cfg)
    assert set(expected) <= set(held), sorted(set(expected) - set(held))
    for key, delta in held.items():
        if key in expected:
            assert_close(delta, expected[key], what=f"{name} {key}")
        else:
            assert not delta.any(), f"{name} {key}: vLLM holds an adapter ochat did not train"


def test_vllm_asks_for_the_mixed_format_for_qwen3_moe_expert_adapters(vllm_runtime, tmp_path):
    """Without `--enable-mixed-moe-lora-format` vLLM refuses peft's stacked expert adapters on a model whose vLLM
    experts are per-expert (Qwen3-MoE), naming the flag."""
    trained_adapter("qwen3_moe", tmp_path)
    with pytest.raises(ValueError, match="enable-mixed-moe-lora-format"):
        vllm_load(tmp_path, False)


def test_vllm_refuses_trainable_tokens(vllm_runtime, tmp_path):
    """peft's trainable tokens (--lora-trainable-tokens) have no counterpart in vLLM's LoRA loader: it refuses the
    adapter, naming the rows' tensor."""
    trained_adapter("llama2", tmp_path, tokens=(3, 5))
    with pytest.raises(ValueError, match="trainable_tokens_delta is unsupported LoRA weight"):
        vllm_load(tmp_path, False)
