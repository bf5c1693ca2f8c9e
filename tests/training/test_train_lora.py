"""The real trainer with LoRA (--lora-rank) and the embedding and lm_head rows of the end-of-turn token
(--lora-trainable-tokens) on 2 CPU ranks (gloo, float32): the loss falls, only the adapters and rows train, final/
holds the adapter in PEFT's format that peft loads on the --model-path model; ZeRO-3 gathers the same adapter and
rows as ZeRO-2, --merge-lora's merged weights serve the logits of base + adapter, and a run killed and resumed from
its adapter-only resume states ends bit-for-bit equal; a tiny gpt-oss trains adapters on its experts too (saved in
transformers' fused, interleaved layout), and its rows, which its resume state holds and --merge-lora merges."""
import os

import pytest
import torch

from ochat.model.config import ModelConfig
from tests.helpers.train import metrics, model_like_tiny, run_trainer, run_trainer_until

pytestmark = pytest.mark.slow
LORA = ["--lora-rank", "4", "--lr", "1e-2", "--epochs", "1", "--max-steps", "4", "--lora-trainable-tokens",
        "<|end_of_turn|>"]
IDS = [[1, 450, 4996, 32000, 1701]]  # <|end_of_turn|> = 32000 among them


def train(setup, name, *extra):
    root, data, model = setup
    out = str(root / name)
    r = run_trainer(2, model, data, out, *LORA, *extra)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def adapter(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "final", "adapter", "adapter_model.safetensors"))


def with_adapter(base, out):
    import peft
    from transformers import AutoModelForCausalLM
    return peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), os.path.join(out, "final",
                                                                                                   "adapter"))


GPT_OSS = ModelConfig.debug(model_type="gpt_oss", vocab_size=32001, max_position_embeddings=4096, num_experts=4,
                            num_experts_per_tok=2, head_dim=16, sliding_window=128, router_aux_loss_coef=0.01,
                            layer_types=("sliding_attention", "full_attention"))


@pytest.fixture(scope="module")
def gpt_oss_model(setup):
    """The tiny Llama's folder (its tokenizer) with a tiny gpt-oss's weights: 4 experts, top-2, 2 expert layers."""
    root, _, tiny = setup
    return model_like_tiny(tiny, root / "tiny_gpt_oss", GPT_OSS)


@pytest.fixture(scope="module")
def zero2_run(setup):
    return train(setup, "zero2")


def test_lora_trains_only_the_adapter_and_peft_loads_it(setup, zero2_run):
    import peft
    from transformers import AutoModelForCausalLM

    _, _, base = setup
    ls = [m["loss"] for m in metrics(zero2_run)]
    assert len(ls) == 4 and ls[-1] < ls[0], ls
    final = os.path.join(zero2_run, "final")
    assert "model.safetensors" not in os.listdir(final) and "config.json" in os.listdir(final)
    model = with_adapter(base, zero2_run)
    saved = adapter(zero2_run)
    # 2 layers x 7 linears x A, B, and the embedding's and lm_head's rows
    assert set(saved) == set(peft.get_peft_model_state_dict(model)) and len(saved) == 2 * 2 * 7 + 2
    assert all(t.dtype == torch.float32 and t.abs().sum() > 0 for t in saved.values())
    assert model.peft_config["default"].base_model_name_or_path == base
    ids = torch.tensor(IDS)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, AutoModelForCausalLM.from_pretrained(base)(
            input_ids=ids).logits, atol=1e-4)


def test_zero3_saves_the_zero2_adapter_and_merge_lora_serves_base_plus_adapter(setup, zero2_run):
    from transformers import AutoModelForCausalLM

    _, _, base = setup
    out = train(setup, "zero3_merged", "--deepspeed-config", "zero3", "--gradient-checkpointing", "--merge-lora")
    a, b = adapter(zero2_run), adapter(out)
    assert a.keys() == b.keys() and sum(".token_adapter." in k for k in a) == 2
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"))
    ids = torch.tensor(IDS)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, with_adapter(base, out)(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_resume_after_a_hard_kill_is_bit_for_bit_from_adapter_only_states(setup, zero2_run):
    root, data, model = setup
    out = str(root / "killed")
    status, log = run_trainer_until("(global step 2)", 2, model, data, out, *LORA, "--save-state-every", "2")
    assert status != 0 and not os.path.exists(os.path.join(out, "final")), log[-3000:]
    state = os.path.join(out, "ds_state", "step2", "mp_rank_00_model_states.pt")
    assert os.path.getsize(state) < 200_000  # the adapters (~10 KB), not the 16 MB base
    r = run_trainer(2, model, data, out, *LORA, "--resume", "--save-state-every", "2")
    assert r.returncode == 0 and "resumed at epoch 0 step-in-epoch 2 (global step 2)" in r.stdout, r.stdout[-3000:]
    a, b = adapter(zero2_run), adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(zero2_run)]


def test_an_expert_model_trains_adapters_on_its_experts_and_token_rows_that_peft_loads(setup, gpt_oss_model):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ochat.model import lora
    from ochat.training.safe_states import load_state_file

    out = train((*setup[:2], gpt_oss_model), "gpt_oss", "--merge-lora", "--gradient-checkpointing")
    ls = [m["loss"] for m in metrics(out)]
    assert len(ls) == 4 and ls[-1] < ls[0], ls
    saved = adapter(out)
    experts = [k for k in saved if ".mlp.experts." in k]
    assert len(experts) == 2 * 2 * 2 and all(saved[k].abs().sum() > 0 for k in saved)  # 2 layers x 2 stacked x A, B
    assert not any(".mlp.gate." in k for k in saved)
    rows = {k.split(".token_adapter.")[0].removeprefix("base_model.model."): t for k, t in saved.items()
            if ".token_adapter." in k}
    base = load_file(os.path.join(gpt_oss_model, "model.safetensors"))
    final = load_file(os.path.join(out, "final", "model.safetensors"))
    assert rows.keys() == {"model.embed_tokens", "lm_head"}
    for matrix, values in rows.items():  # <|end_of_turn|> = 32000: trained, and merged as the matrix's row
        assert values.shape == (1, 64) and not torch.equal(values[0], base[f"{matrix}.weight"][32000])
        assert torch.equal(final[f"{matrix}.weight"][32000], values[0])
        assert torch.equal(final[f"{matrix}.weight"][:32000], base[f"{matrix}.weight"][:32000])
    state = load_state_file(os.path.join(out, "ds_state", "step4", "mp_rank_00_model_states.pt"))["module"]  # final's
    held = lora.adapter_state_dict({n: t for n, t in state.items() if lora.is_adapter_weight(n)}, GPT_OSS)
    assert held.keys() == saved.keys() and all(torch.equal(held[k], saved[k]) for k in saved)  # adapters and rows
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"))
    ids = torch.tensor(IDS)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, with_adapter(gpt_oss_model, out)(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
