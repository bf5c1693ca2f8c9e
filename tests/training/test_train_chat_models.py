"""Today's chat models end to end on the CPU, as the README shows them: pre-tokenize the bundled sample with the
model's template, train a tiny random model of that architecture for a few steps (one process), and check that the
saved folder loads in transformers and that its tokenizer and chat template give the training ids.

- Llama 3 with OpenChat 3.6's template (Meta's tokenizer from `llama-models`; skipped without it),
- Qwen3 with the tokenizer's own chat template (Qwen3's published one, on a Qwen-style tokenizer trained here),
- Gemma 2 with the bundled `gemma` preset (the Llama 2 tokenizer with Gemma's turn tokens).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from ochat.config import get_model_type
from ochat.data import load_tokenizer, open_dataset
from tests.helpers.data import sample_conversations
from tests.helpers.tokenizers import llama3_tokenizer, qwen_style_tokenizer
from tests.helpers.train import REPO, RUN_TIMEOUT, metrics

pytestmark = pytest.mark.slow
TEMPLATES = Path(REPO) / "tests" / "data" / "chat_templates"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_model(folder: Path, config: transformers.PretrainedConfig) -> None:
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def llama3(folder: Path):
    pytest.importorskip("blobfile")
    pytest.importorskip("llama_models.llama3.tokenizer")
    llama3_tokenizer(folder)
    tiny_model(folder, transformers.LlamaConfig(vocab_size=128256, bos_token_id=128000, eos_token_id=128009, **TINY))
    return "openchat_3.6", []


def qwen3(folder: Path):
    qwen_style_tokenizer(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.chat_template = (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text()
    tok.save_pretrained(folder)
    tiny_model(folder, transformers.Qwen3Config(vocab_size=len(tok), head_dim=32, tie_word_embeddings=True, **TINY))
    return "chat_template", []


def gemma2(folder: Path):
    from ochat.assets import LLAMA2_TOKENIZER

    src = folder / "src"
    src.mkdir(parents=True)
    shutil.copyfile(LLAMA2_TOKENIZER, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer", "legacy": false}')
    tok = transformers.AutoTokenizer.from_pretrained(src)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.save_pretrained(folder)
    shutil.rmtree(src)
    tiny_model(folder, transformers.Gemma2Config(vocab_size=len(tok), head_dim=16, query_pre_attn_scalar=16,
                                                 sliding_window=32, **TINY))
    return "chat_template", ["--chat-template", "gemma"]


@pytest.mark.parametrize("make", [llama3, qwen3, gemma2], ids=["llama3_openchat_3.6", "qwen3_own_template", "gemma2"])
def test_pre_tokenize_train_and_serve(tmp_path, make):
    model = tmp_path / "model"
    model.mkdir()
    model_type, template_flags = make(model)
    env = dict(os.environ, PYTHONPATH=REPO)
    data, out = tmp_path / "data", tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "ochat.data.generate_dataset", "--model-type", model_type, *template_flags,
                        "--tokenizer", str(model), "--out-dir", str(data), "--quiet", "--workers", "1"],
                       env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "ochat.training.train", "--model-path", str(model), "--data-path",
                        str(data), "--save-path", str(out), "--max-steps", "4", "--batch-max-len", "1024",
                        "--lr", "3e-3", "--lr-warmup-steps", "1", "--eval-every", "0"],
                       env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = [m["loss"] for m in metrics(str(out))]
    assert len(losses) == 4 and losses[-1] < losses[0]

    final = out / "final"
    served = transformers.AutoTokenizer.from_pretrained(final)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final)
    assert hf.config.model_type == transformers.AutoConfig.from_pretrained(model).model_type
    meta = open_dataset(data).meta
    mt = get_model_type(model_type, meta.get("chat_template") if model_type == "chat_template" else None)
    tokenizer = load_tokenizer(model, mt)
    for conversation in sample_conversations(mt, 5):
        want = mt.template.encode(conversation.messages, tokenizer)[0]
        got = served.apply_chat_template(conversation.messages, tokenize=True, return_dict=False)
        assert list(got) == list(want)
