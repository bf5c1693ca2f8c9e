"""Hugging Face checkpoint folders: what they hold, that transformers serves them with the trained logits, and
that writing one is atomic (an existing folder is replaced whole, nothing temporary is left)."""
import json
import os

import pytest
import torch
import transformers

from ochat.assets import LLAMA2_TOKENIZER
from ochat.config import get_model_type
from ochat.data import load_tokenizer
from ochat.model.config import ModelConfig
from ochat.model.decoder import PackedCausalLM
from ochat.training.checkpoint import save_hf_checkpoint


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(LLAMA2_TOKENIZER, "openchat_v3.2")


@pytest.mark.parametrize("tied", [False, True])
def test_folder_serves_the_trained_logits(tmp_path, tokenizer, tied):
    torch.manual_seed(0)
    model = PackedCausalLM(ModelConfig.debug(vocab_size=32001, tie_word_embeddings=tied), attn_impl="sdpa")
    path = str(tmp_path / "final")
    save_hf_checkpoint(model, path, tokenizer=tokenizer, chat_format=get_model_type("openchat_v3.2"),
                       train_config_json=json.dumps({"lr": 1e-5}))
    assert {"config.json", "generation_config.json", "model.safetensors", "train_config.json",
            "tokenizer_config.json"} <= set(os.listdir(path))
    assert json.loads(open(os.path.join(path, "train_config.json")).read()) == {"lr": 1e-5}
    config = json.loads(open(os.path.join(path, "config.json")).read())
    assert (config["eos_token_id"], config["bos_token_id"], config["tie_word_embeddings"]) == (32000, 1, tied)
    assert json.loads(open(os.path.join(path, "generation_config.json")).read())["eos_token_id"] == [32000, 2]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    ids = torch.randint(0, 32001, (1, 40))
    with torch.no_grad():
        ours = model(ids[0], torch.arange(40), torch.tensor([0, 40], dtype=torch.int32), 40)
        torch.testing.assert_close(hf(input_ids=ids).logits[0], ours, rtol=1e-5, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert (tok.eos_token, tok.eos_token_id) == ("<|end_of_turn|>", 32000)
    messages = [{"role": "user", "content": "Hi  there"}, {"role": "assistant", "content": "    indented\ncode"}]
    model_type = get_model_type("openchat_v3.2")
    assert tok.apply_chat_template(messages, tokenize=True, return_dict=False) == model_type.template.encode(messages, tokenizer)[0]


def test_an_existing_folder_is_replaced_whole(tmp_path, tokenizer):
    path = tmp_path / "ep_0"
    path.mkdir()
    (path / "stale.txt").write_text("from an earlier save")
    model = PackedCausalLM(ModelConfig.debug(vocab_size=32001))
    save_hf_checkpoint(model, str(path), tokenizer=tokenizer, chat_format=get_model_type("openchat_v3.2"),
                       train_config_json="{}")
    assert not (path / "stale.txt").exists() and (path / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["ep_0"]


@pytest.mark.parametrize("merge", [False, True])
def test_lora_folder_holds_the_adapter_for_peft_and_merged_weights_only_when_asked(tmp_path, tokenizer, merge):
    import peft

    from ochat.model.transforms import ModelTransforms, apply_transforms

    torch.manual_seed(0)
    model = PackedCausalLM(ModelConfig.debug(vocab_size=32001), attn_impl="sdpa")
    base = str(tmp_path / "base")
    model.save_pretrained(base)
    apply_transforms(model, ModelTransforms(lora_rank=4, lora_targets="attention"))
    with torch.no_grad():  # trained adapters: B no longer zero
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.1)
    path = str(tmp_path / "final")
    save_hf_checkpoint(model, path, tokenizer=tokenizer, chat_format=get_model_type("openchat_v3.2"),
                       train_config_json="{}", base_model=base, merge_lora=merge)
    assert sorted(os.listdir(os.path.join(path, "adapter"))) == ["adapter_config.json", "adapter_model.safetensors"]
    assert os.path.exists(os.path.join(path, "model.safetensors")) == merge
    assert json.loads(open(os.path.join(path, "config.json")).read())["eos_token_id"] == 32000
    ids = torch.randint(0, 32001, (1, 40))
    with torch.no_grad():
        ours = model(ids[0], torch.arange(40), torch.tensor([0, 40], dtype=torch.int32), 40)
        served = [peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                                 os.path.join(path, "adapter"))]
        if merge:
            served.append(transformers.AutoModelForCausalLM.from_pretrained(path))
        for hf in served:
            torch.testing.assert_close(hf.float().eval()(input_ids=ids).logits[0], ours, rtol=1e-5, atol=1e-5)
