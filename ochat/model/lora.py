"""LoRA adapters on the decoder layers' linear layers: peft's LoRA layers injected into PackedCausalLM in place.

`add_lora` wraps the chosen linear layers of every decoder layer (never lm_head nor the embeddings) with peft's
`lora.Linear` (`peft.inject_adapter_in_model`), so ochat's module tree and its packed forward (cu_seqlens) stay
as they are, and freezes everything else. The adapters are created in float32 (under ZeRO-3 in the partitioned
weights' dtype: `_adapter_dtype`); a bf16 run's DeepSpeed engine computes them in bf16 like the base, from float32
master weights and optimizer state, and they are saved in float32.

Each wrapped layer runs as one autograd node (ochat.kernels.lora_linear: the adapter's product accumulated into
the base's output by the matmul, no weight gradient for the frozen base) instead of peft's separate scale and add
passes, where nothing needs peft's: no dropout and one dtype (under ZeRO-3 too, below); otherwise peft's forward
runs.

Selective recompute (ochat.model.recompute) keeps a wrapped layer's base GEMM output and the adapter's rank-r product
x A^T, and reruns the GEMM of B on that product (as large as the output, r multiply-adds per value) and the add:
inside a selective checkpoint the one-node layer adds the adapter's product out of place (the kept output must stay
as the GEMM wrote it), and B's GEMM runs inside `recompute.rerun_gemms`, in the one-node layer, in peft's forward
(B's module) and for the experts' adapters (experts.py).

Mixture-of-experts models: where the preset takes the MLP, the stacked experts of each expert block
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) are targeted as peft's
`target_parameters` (nested `ParamWrapper`s around `mlp.experts`, peft's names and init, a rank-R adapter per expert);
their forward hands the factors to experts.Experts, which adds each expert's adapter product to its rows
(`_experts_forward`). The router is never targeted. gpt-oss, whose transformers model holds its experts fused
(`gate_up_proj` [E, H, 2I] used as x @ W, gate and up columns interleaved; `down_proj` [E, I, H]), gets the same
factors from peft (which reads that orientation from the experts' `is_transposed`): A [E r, in] and B [out, r E]
of the same shapes and meaning, but for the order of gate_up_proj's outputs. ochat trains them in its own order
(gate rows, then up rows) and interleaves B's rows when it saves them (`adapter_state_dict`); a merged gate_up_proj
is interleaved with the weight (experts.to_checkpoint). Under expert parallelism a rank's expert adapters are those
of the experts it holds (A's rows and B's columns of them, as the whole layer's would start: `_keep_held_experts`),
gathered into the whole layer's when saved (ochat.model.expert_parallel).

Trainable tokens (`trainable_tokens`): the embedding and lm_head rows of a few tokens (e.g. an added
end-of-turn token) train beside the adapters, as peft's trainable tokens (`LoraConfig(trainable_token_indices=...)`)
do: the rows' values themselves (not differences), starting from the base rows, in place of the frozen rows; one
set of rows when the embedding and lm_head are tied (peft ties lm_head's to the embedding's). peft's own
TrainableTokensWrapper does not fit ochat's model (its lm_head computes the fused loss, not logits, and the wrapper
would copy the whole embedding and lm_head and compute their whole gradients in every step), so `TokenRows` holds
them: the embedding
substitutes them at the trained tokens' positions, the loss reads lm_head's weight with them in place and computes
only their gradient (ochat.kernels.linear_cross_entropy). They are saved, merged and loaded under peft's names.

ZeRO-3 (a model built under `deepspeed.zero.Init`): DeepSpeed gathers a module's parameters when that module's
forward runs, and ochat reads three kinds outside their own modules' forward: the wrapped layers' base weight, bias
and adapters (in the wrapper's, `_one_node_forward`, which never calls base_layer, lora_A or lora_B), the token rows
(in the embedding's and lm_head's) and the experts' factors (in the outer ParamWrapper's, `_experts_forward`). Each
is registered with the module whose forward reads it (`deepspeed.zero.register_external_parameter`), so ZeRO-3
gathers it with that module's own parameters for its forward and backward (and a recomputed forward) and releases it
after them, as it would have after the owner's; the rows start from the gathered matrix's rows.

Names: a wrapped layer's weight becomes `<layer>.base_layer.weight` and its adapter `<layer>.lora_A.default.weight`
and `<layer>.lora_B.default.weight`. Because ochat's names are Hugging Face's, the PEFT file names of the
transformers model are these with the adapter name dropped and `base_model.model.` in front
(`adapter_state_dict`, which also orders gpt-oss's gate_up_proj B as transformers does), and `merged_state_dict`
gives the plain model's names with W + (alpha / r) B A. Trained token rows are
`model.embed_tokens.token_adapter.trainable_tokens_delta` and (not tied) `lm_head.token_adapter.
trainable_tokens_delta`, peft's file names without `base_model.model.`; merged, they replace their matrix's rows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Sequence

import torch
import torch.nn as nn

from ochat.kernels.linear_cross_entropy import Rows, replace_rows
from ochat.model import expert_parallel, recompute
from ochat.model.config import ModelConfig
from ochat.model.experts import Experts, interleave
from ochat.model.qlora import is_nf4

TARGETS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"),  # qkv_proj: Phi-3's fused projection
    "mlp": ("gate_proj", "up_proj", "down_proj", "gate_up_proj"),  # gate_up_proj: Phi-3's fused projection
}
TARGETS["all"] = TARGETS["attention"] + TARGETS["mlp"]
# a mixture-of-experts block's stacked experts (experts.Experts, [E, out, in]), targeted where the preset takes the MLP
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
ADAPTER = "default"  # peft's adapter name inside the module tree
PEFT_PREFIX = "base_model.model."  # what a PeftModel puts before the transformers model's names
ADAPTER_FOLDER = "adapter"  # where a checkpoint folder holds the adapter
TOKEN_ROWS = ".token_adapter.trainable_tokens_delta"  # the trained rows of a matrix, after its module's name (peft's)
TOKEN_MATRICES = ("embed_tokens", "lm_head")  # the modules whose rows train: trainable_token_indices' keys


def default_alpha(rank: int) -> float:
    """--lora-alpha when not given: 2 x rank (a scale alpha / rank of 2 whatever the rank)."""
    return 2.0 * rank


def lora_config(model: nn.Module, rank: int, alpha: float, dropout: float, targets: str):
    """peft's LoraConfig for `model`: the `targets` preset's linear layers that its decoder layers have and, where
    the preset takes the MLP, the stacked experts of its expert blocks (`target_parameters`; the router never)."""
    from peft import LoraConfig

    present = {name.rsplit(".", 1)[-1] for name, m in model.model.layers.named_modules()
               if isinstance(m, nn.Linear)}
    names = sorted(present & set(TARGETS[targets]))
    has_experts = any(isinstance(m, Experts) for m in model.model.layers.modules())
    parameters = list(EXPERT_PARAMETERS) if has_experts and "down_proj" in TARGETS[targets] else []
    remapped = peft_remapped_names(model, names)
    if remapped:
        from ochat.utils.log import log

        log(f"LoRA: {', '.join(sorted(remapped))} (dense MLP layers of a {model.config.model_type} model) left without "
            f"adapters: peft reads these names as the stacked experts' in this model type")
        names = [n for n in names if n not in remapped]
    if not names and not parameters:
        raise ValueError(f"--lora-targets {targets}: the decoder layers have none of {', '.join(TARGETS[targets])}")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                      target_parameters=parameters or None, bias="none", task_type="CAUSAL_LM")


def peft_remapped_names(model: nn.Module, names: list[str]) -> set[str]:
    """The target module names that peft, with transformers v5, reads as another model type's experts: for the
    types whose experts transformers v5 stacked (qwen3_moe, olmoe: `gate_proj`, `up_proj`, `down_proj`), peft turns
    those names in any LoraConfig into the stacked experts' `target_parameters` (gate_up_proj at twice the rank),
    so an adapter on a dense MLP of such a model (a layer of `mlp_only_layers`) could not be loaded as trained."""
    from peft import LoraConfig

    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # a peft without the conversion: nothing is remapped
        return set()
    probe = LoraConfig(r=1, target_modules=list(names) or None, target_parameters=list(EXPERT_PARAMETERS))
    convert_peft_config_for_transformers(probe, model, None)
    return set(names) - set(probe.target_modules or ())


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: str, seed: int = 0,
             trainable_tokens: Sequence[int] = ()) -> int:
    """Wrap `targets` ("attention", "mlp" or "all") of every decoder layer of `model` with float32 LoRA adapters
    of `rank` (scale alpha / rank; dropout on the adapters' input; peft's init, A from `seed`, B zero), train the
    embedding and lm_head rows of the token ids `trainable_tokens` (`add_token_rows`) and freeze every other
    parameter; of experts split by expert parallelism, the adapters of this rank's experts only. Returns the number
    of trainable parameters (this rank's)."""
    from peft import inject_adapter_in_model

    config = lora_config(model, rank, alpha, dropout, targets)
    # A's init from `seed` alone: the same adapters whatever drew random numbers before (ZeRO-3's zero.Init does);
    # under expert parallelism made for whole expert layers, then cut to this rank's experts: one rank's adapters
    with torch.random.fork_rng(devices=[]), expert_parallel.whole_experts(model):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    _keep_held_experts(model)
    if trainable_tokens:
        add_token_rows(model, trainable_tokens)
    trainable, dtype = 0, _adapter_dtype(model)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_weight(name))
        if p.requires_grad:
            p.data = p.data.to(dtype)
            trainable += p.numel()
    partitioned = _partitioned(model)
    for layer in wrapped_layers(model):
        b = layer.lora_B[ADAPTER]  # in peft's forward, B's GEMM on the rank-r product: rerun by a selective recompute
        b.forward = functools.partial(_rerun_in_selective_recompute, b)
        if not dropout:
            layer.forward = functools.partial(_one_node_forward, layer)
            if partitioned:  # _one_node_forward reads the base layer's and the adapters' weights
                _gather_in_forward(layer, _linear_weights(layer))
    for wrapper in _outer_expert_wrappers(model):
        wrapper.forward = functools.partial(_experts_forward, wrapper)
        if partitioned:  # _experts_forward reads every nested wrapper's factors
            _gather_in_forward(wrapper, [t for w in _nested_wrappers(wrapper) for t in _factor_weights(w)])
    return trainable


def _partitioned(model: nn.Module) -> bool:
    """Whether ZeRO-3 partitions `model`'s parameters (built under `deepspeed.zero.Init`, as ochat loads a model
    for ZeRO-3)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _adapter_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the adapters (and token rows) are made in: float32, which DeepSpeed's engine casts to the run's
    dtype like the rest of the module, keeping float32 master weights; but the engine leaves a ZeRO-3 partitioned
    model's parameters in the dtype zero.Init made them in (the run's), so there the adapters take that dtype (in
    float32 beside a bf16 base they would compute in float32, and the layers in peft's forward)."""
    return next((p.dtype for p in model.parameters() if hasattr(p, "ds_id")), torch.float32)


def _gather_in_forward(module: nn.Module, params: Sequence[nn.Parameter]) -> None:
    """ZeRO-3: have DeepSpeed gather `params` for the forward and the backward of `module`, which reads them
    although they belong to other modules (DeepSpeed's hooks gather a module's own parameters when its forward
    runs; read elsewhere, a partitioned parameter is an empty tensor). `deepspeed.zero.register_external_parameter`:
    released again after `module`'s forward and backward like its own parameters."""
    import deepspeed

    for p in params:
        deepspeed.zero.register_external_parameter(module, p)


def _gathered(param: nn.Parameter):
    """A context in which a ZeRO-3 partitioned `param` is whole (collective: every rank enters it); nothing to do
    for a parameter that is not partitioned."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param])


def _keep_held_experts(model: nn.Module) -> None:
    """Under expert parallelism: each expert adapter of `model`, made for its whole layer, keeps the rows of A and
    the columns of B of the experts this rank holds (peft's layout: `expert_factors`), on their device, marked as
    expert parameters (ochat.model.expert_parallel)."""
    from peft.tuners.lora import ParamWrapper

    for wrapper in model.modules():
        experts = wrapper.get_base_layer() if isinstance(wrapper, ParamWrapper) else None
        if not isinstance(experts, expert_parallel.ShardedExperts):
            continue
        held, e, device = experts.held, wrapper.num_experts, wrapper.get_param().device
        a, b = wrapper.lora_A[ADAPTER], wrapper.lora_B[ADAPTER]
        a.weight = nn.Parameter(a.weight.detach().unflatten(0, (e, -1))[held.start:held.stop].flatten(0, 1)
                                .clone().to(device))
        b.weight = nn.Parameter(b.weight.detach().unflatten(1, (-1, e))[..., held.start:held.stop].flatten(1)
                                .clone().to(device))
        a.out_features = b.in_features = a.weight.shape[0]
        wrapper.num_experts = len(held)
        expert_parallel.mark(a.weight, experts.size, held)
        expert_parallel.mark(b.weight, experts.size, held, experts_last=True)


class TokenRows(nn.Module):
    """Trained rows of a frozen [V, H] matrix (the embedding or lm_head): the values of the rows `ids`, float32,
    starting from the matrix's rows (peft's trainable tokens, whose parameter name this keeps although it holds
    values, not deltas)."""

    def __init__(self, weight: nn.Parameter, ids: Sequence[int]):
        super().__init__()
        vocab = getattr(weight, "ds_shape", weight.shape)[0]  # a ZeRO-3 partition is flat: its full shape is ds_shape
        ids_t = torch.tensor(ids, dtype=torch.long, device=weight.device)
        slots = torch.full((vocab,), -1, dtype=torch.long, device=weight.device)
        slots[ids_t] = torch.arange(len(ids_t), device=weight.device)
        self.register_buffer("ids", ids_t, persistent=False)
        self.register_buffer("slots", slots, persistent=False)  # token id -> its row in the values; -1: not trained
        with _gathered(weight):
            self.trainable_tokens_delta = nn.Parameter(weight.detach()[ids_t].float())

    @property
    def rows(self) -> Rows:
        """(ids, values), as ochat.kernels.linear_cross_entropy takes the replaced rows of a weight."""
        return self.ids, self.trainable_tokens_delta

    def substitute(self, input_ids: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """`embedded` (the frozen embedding of `input_ids`) with the trained rows at the trained tokens' positions:
        what an embedding with those rows replaced gives, without copying the embedding or computing its gradient."""
        slot = self.slots[input_ids]
        trained = self.trainable_tokens_delta.to(embedded.dtype)[slot.clamp(min=0)]
        return torch.where((slot >= 0).unsqueeze(-1), trained, embedded)


def add_token_rows(model: nn.Module, ids: Sequence[int]) -> None:
    """Train the embedding and lm_head rows of the token `ids` of `model` (adapted by `add_lora`) in place of the
    frozen ones: a TokenRows on each, or one shared when lm_head is tied to the embedding (as peft ties them); the
    ids join the model's LoraConfig as peft's `trainable_token_indices` (set after peft injected the adapters: peft
    would wrap the embedding and lm_head itself)."""
    ids = list(dict.fromkeys(ids))  # a repeated id would make two rows for one token
    embedding, head = model.model.embed_tokens, model.lm_head
    embedding.token_adapter = TokenRows(embedding.weight, ids)
    head.token_adapter = embedding.token_adapter if head.weight is embedding.weight else TokenRows(head.weight, ids)
    if _partitioned(model):  # the embedding's and lm_head's forward read the rows (Embedding, LMHead)
        for module in (embedding, head):
            _gather_in_forward(module, [module.token_adapter.trainable_tokens_delta])
    model.peft_config[ADAPTER] = dataclasses.replace(
        adapter_config(model), trainable_token_indices={name: ids for name in TOKEN_MATRICES})


def wrapped_layers(model: nn.Module) -> list[nn.Module]:
    """peft's LoRA layers in `model`."""
    from peft.tuners.lora import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def _one_node_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer`'s output through ochat.kernels.lora_linear, or peft's forward where that does not apply (adapters
    merged or disabled, or dtypes that differ: peft casts)."""
    from ochat.kernels.lora_linear import lora_linear

    base, a, b = layer.base_layer, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    quantized = is_nf4(base.weight)  # dequantised to x's dtype in each matmul
    if layer.merged or layer.disable_adapters or not (x.dtype == a.dtype == b.dtype and
                                                      (quantized or base.weight.dtype == x.dtype)):
        return type(layer).forward(layer, x)
    # a selective checkpoint keeps the base GEMM's output: the adapter's product joins it out of place, its GEMM
    # (B on the rank-r product, the output's size) rerun rather than kept
    out_of_place = recompute.rerun_gemms() if recompute.in_selective_checkpoint() else None
    return lora_linear(x, base.weight, base.bias, a, b, layer.scaling[ADAPTER], out_of_place)


def _rerun_in_selective_recompute(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module`'s forward, its GEMMs rerun by a selective recompute rather than kept (recompute.rerun_gemms)."""
    with recompute.rerun_gemms():
        return type(module).forward(module, x)


def _linear_weights(layer: nn.Module) -> list[nn.Parameter]:
    """The parameters `_one_node_forward` reads from a wrapped layer's submodules: the base layer's weight (and
    bias) and the adapter's A and B."""
    base = layer.base_layer
    return [p for p in (base.weight, base.bias, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)
            if p is not None]


def _outer_expert_wrappers(model: nn.Module) -> list[nn.Module]:
    """peft's ParamWrappers around each expert block's experts (one per targeted parameter, nested): the outer ones."""
    from peft.tuners.lora import ParamWrapper

    inner = {id(m.base_layer) for m in model.modules() if isinstance(m, ParamWrapper)}
    return [m for m in model.modules() if isinstance(m, ParamWrapper) and id(m) not in inner]


def _experts_forward(wrapper: nn.Module, x, weights, experts, counts):
    """The experts under `wrapper` (nested ParamWrappers), each adapter's product added to its projection's output
    by experts.Experts itself: W_e x + s B_e (A_e x) on the rows routed to expert e. peft's ParamWrapper instead
    adds s B_e A_e to every expert's weight in each forward, which is the same sum but writes a second copy of the
    stacked weights and computes their full weight gradient in the backward."""
    nested = _nested_wrappers(wrapper)
    adapters = {w.parameter_name: expert_factors(w) for w in nested if not (w.merged or w.disable_adapters)}
    return nested[-1].base_layer(x, weights, experts, counts, adapters=adapters)


def _nested_wrappers(wrapper: nn.Module) -> list[nn.Module]:
    """The ParamWrappers nested under (and including) an outer one, outermost first; the last one's base_layer is
    the experts.Experts they adapt."""
    from peft.tuners.lora import ParamWrapper

    out = [wrapper]
    while isinstance(out[-1].base_layer, ParamWrapper):
        out.append(out[-1].base_layer)
    return out


def _factor_weights(wrapper: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    """A ParamWrapper's adapter weights as peft holds them: lora_A [E r, in], lora_B [out, r E]."""
    return wrapper.lora_A[ADAPTER].weight, wrapper.lora_B[ADAPTER].weight


def expert_factors(wrapper: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A ParamWrapper's adapter of a stacked [E, out, in] parameter as experts.Adapters holds it: A [E, r, in],
    B [E, out, r] and the scale. peft's layout: lora_A.weight [E r, in] expert-major, lora_B.weight [out, r E] with
    the expert index fastest (`ParamWrapper.get_delta_weight`)."""
    assert wrapper._did_swap_in_out_features, "expected stacked experts laid out [E, out, in]"
    a, b = _factor_weights(wrapper)
    e = wrapper.num_experts
    return (a.view(e, -1, a.shape[-1]), b.view(b.shape[0], -1, e).permute(2, 0, 1).contiguous(),
            wrapper.scaling[ADAPTER])


def adapter_config(model: nn.Module):
    """The LoraConfig `add_lora` gave `model`, or None when it has no adapters."""
    return getattr(model, "peft_config", {}).get(ADAPTER)


def is_adapter_weight(name: str) -> bool:
    """Whether a parameter name (ochat's) is a LoRA adapter's or trained token rows'."""
    return f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name or is_token_rows(name)


def is_token_rows(name: str) -> bool:
    """Whether a parameter name (ochat's) is trained token rows' (`TokenRows`)."""
    return name.endswith(TOKEN_ROWS)


def adapter_state_dict(state_dict: dict[str, torch.Tensor], model_config: ModelConfig) -> dict[str, torch.Tensor]:
    """The adapters of a full or adapter-only state dict of a model of `model_config`, in float32, under the names
    and in the layout `peft.get_peft_model_state_dict` gives for the transformers model wrapped by peft
    (`_as_in_transformers`)."""
    return {PEFT_PREFIX + name.replace(f".{ADAPTER}.", "."): _as_in_transformers(name, t, state_dict, model_config)
            for name, t in state_dict.items() if is_adapter_weight(name)}


def _as_in_transformers(name: str, t: torch.Tensor, state_dict: dict[str, torch.Tensor],
                        c: ModelConfig) -> torch.Tensor:
    """An adapter tensor of `state_dict` as peft holds it on the transformers model: float32, contiguous, and where
    transformers holds the experts fused (gpt-oss) the B of gate_up_proj's adapter with its rows interleaved.

    transformers' fused gate_up_proj [E, H, 2I] (y = x W_e, gate and up output columns interleaved) is ochat's
    [E, 2I, H] (gate rows, then up rows) transposed and with the output dimension permuted; peft reads a stacked
    parameter's orientation (`is_transposed` on transformers' experts) and gives both the same factors A [E r, in] and
    B [out, r E], so the permutation falls on B's rows alone. down_proj's factors need nothing: its [E, I, H] is
    ochat's [E, H, I] transposed, which peft's orientation absorbs. gate_up_proj's adapter is the one whose A [E r, H]
    and B [2I, r E] fit its shape (down_proj's A [E r, I] and B [H, r E] never do)."""
    t = t.float().contiguous()
    layout = c.arch.experts
    if layout is None or not layout.fused or f".lora_B.{ADAPTER}." not in name or ".mlp.experts." not in name:
        return t
    a = state_dict[name.replace(f".lora_B.{ADAPTER}.", f".lora_A.{ADAPTER}.")]
    if (t.shape[0], a.shape[1]) != (2 * c.expert_intermediate_size, c.hidden_size):  # down_proj's
        return t
    return interleave(t, 0)


def merged_state_dict(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The plain model's state dict (Hugging Face names, no adapters): each wrapped weight W becomes
    W + (alpha / r) B A, computed in float32 and cast back to W's dtype; each adapted stacked expert parameter
    W [E, out, in] the same per expert; the embedding's and lm_head's trained token rows replace their rows."""
    scale = config.lora_alpha / config.r
    rows = _token_rows(state_dict, config)
    out = {}
    for name, t in state_dict.items():
        if is_adapter_weight(name):
            continue
        if ".base_layer." not in name:
            out[name] = replace_rows(t, rows[name]) if name in rows else t
            continue
        layer, param = name.split(".base_layer.", 1)
        if param == "weight":
            a, b = (state_dict[f"{layer}.lora_{x}.{ADAPTER}.weight"].float() for x in "AB")
            t = (t.float() + scale * (b @ a)).to(t.dtype)
        elif t.dim() == 3:  # stacked experts: param is e.g. "base_layer.gate_up_proj", nested once per adapter
            t = (t.float() + scale * _expert_delta(state_dict, layer, t.shape)).to(t.dtype)
        out[f"{layer}.{param.rsplit('.', 1)[-1]}"] = t
    return out


def _token_rows(state_dict: dict[str, torch.Tensor], config) -> dict[str, Rows]:
    """The trained token rows of `state_dict` by the name of the matrix they replace rows of (e.g.
    `model.embed_tokens.weight`), with their ids from the LoraConfig."""
    out = {}
    for name, values in state_dict.items():
        if is_token_rows(name):
            matrix = name.removesuffix(TOKEN_ROWS)
            ids = config.trainable_token_indices[matrix.rsplit(".", 1)[-1]]
            out[f"{matrix}.weight"] = (torch.tensor(ids, device=values.device), values)
    return out


def _expert_delta(state_dict: dict[str, torch.Tensor], layer: str, shape: torch.Size) -> torch.Tensor:
    """B_e A_e [E, out, in] for the stacked parameter of `shape` under `layer` (e.g. model.layers.0.mlp.experts):
    its adapter is the one of the nested ParamWrappers whose A [E r, in] and B [out, r E] fit the shape (gate_up_proj
    [E, 2I, H] and down_proj [E, H, I] never share one)."""
    e, n_out, n_in = shape
    prefix = layer
    while f"{prefix}.lora_A.{ADAPTER}.weight" in state_dict:
        a, b = (state_dict[f"{prefix}.lora_{x}.{ADAPTER}.weight"].float() for x in "AB")
        if a.shape[1] == n_in and b.shape[0] == n_out:
            return torch.einsum("ore,eri->eoi", b.view(n_out, -1, e), a.view(e, -1, n_in))
        prefix += ".base_layer"
    raise KeyError(f"no LoRA adapter of shape {tuple(shape)} under {layer}")


def save_adapter(path: str, state_dict: dict[str, torch.Tensor], config, model_config: ModelConfig,
                 base_model: str) -> None:
    """Write the adapters of `state_dict` (a model of `model_config`, with the LoraConfig `config`) in PEFT's format to
    the folder `path` (adapter_config.json + adapter_model.safetensors), loadable with
    `peft.PeftModel.from_pretrained(<transformers model>, path)`."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file(adapter_state_dict(state_dict, model_config), os.path.join(path, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    dataclasses.replace(config, base_model_name_or_path=base_model, inference_mode=True).save_pretrained(path)
