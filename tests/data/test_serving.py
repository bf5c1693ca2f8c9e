"""Tokenizer folders written by save_serving_tokenizer serve exactly as trained: loaded by transformers'
AutoTokenizer, `apply_chat_template` gives the training ids of every bundled sample conversation, and
llama.cpp's converter keeps the SentencePiece scores and the end-of-turn token."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ochat.assets import LLAMA2_TOKENIZER
from ochat.config import get_model_type
from ochat.data import load_tokenizer
from ochat.data.chat_formats import with_special_tokens_in_content
from ochat.data.serving import save_serving_tokenizer
from tests.helpers.data import sample_conversations
from tests.helpers.llama_cpp import fetch_converter


def assert_serves_as_trained(tok, mt, out_dir, convs):
    served = AutoTokenizer.from_pretrained(str(out_dir))
    for c in convs:
        messages = ([{"role": "system", "content": c.system}] if c.system else []) + c.messages
        assert served.apply_chat_template(messages, tokenize=True, return_dict=False) == \
            mt.template.encode(c.messages, tok, system=c.system)[0]
        assert served.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False) \
            == mt.template.encode_prompt(c.messages[:-1], tok, system=c.system)
    return served


@pytest.mark.parametrize("name", ["openchat_v3.2", "openchat_v3.1_llama2", "openchat_3.5"])
def test_bundled_tokenizer_serves_as_trained(name, tmp_path, sp):
    mt = get_model_type(name)
    tok = load_tokenizer(LLAMA2_TOKENIZER, mt)
    generation = save_serving_tokenizer(tok, mt, tmp_path)
    assert generation == {"bos_token_id": 1, "eos_token_id": [32000, 2], "pad_token_id": 32000}
    convs = sample_conversations(mt)
    assert len(convs) == 500
    served = assert_serves_as_trained(tok, mt, tmp_path, convs)
    # what a plain tokenizer call gives too: OpenChat's ids after <|end_of_turn|>, SentencePiece's on indentation
    assert served("<|end_of_turn|>GPT4 Assistant:", add_special_tokens=False).input_ids == [32000] + sp.encode("GPT4 Assistant:")
    assert served("def f():\n        return 1", add_special_tokens=False).input_ids == sp.encode("def f():\n        return 1")
    assert (tmp_path / "tokenizer.model").read_bytes() == Path(LLAMA2_TOKENIZER).read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"]["32000"]["content"] == "<|end_of_turn|>"
    assert config["added_tokens_decoder"]["32000"]["special"] is True
    assert (config["eos_token"], config["tokenizer_class"]) == ("<|end_of_turn|>", "PreTrainedTokenizerFast")


def test_hf_folder_serves_as_trained(llama2_folder, tmp_path):
    """A Hugging Face Llama 2 folder (transformers' conversion, which tokenizes unlike SentencePiece): the
    written folder reproduces what training made of it, not what SentencePiece would."""
    mt = get_model_type("openchat_3.5")
    tok = load_tokenizer(llama2_folder(), mt)
    save_serving_tokenizer(tok, mt, tmp_path)
    assert_serves_as_trained(tok, mt, tmp_path, sample_conversations(mt)[:200])


def test_llama3_openchat_36_serves_as_trained(llama3_dir, tmp_path):
    mt = get_model_type("openchat_3.6")
    tok = load_tokenizer(llama3_dir, mt)
    assert save_serving_tokenizer(tok, mt, tmp_path)["eos_token_id"][0] == 128009
    assert_serves_as_trained(tok, mt, tmp_path, sample_conversations(mt))
    assert not (tmp_path / "tokenizer.model").exists()


TYPED = ["<s>", "</s>", "<unk>", "<|end_of_turn|>", "<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>"]


def _typed_special_tokens(rng) -> list:
    """Conversations whose contents and system prompt type special-token text among words and spaces (none starts
    with a newline: the Llama 3 caveat of docs/templates.md, whatever the flag)."""
    def content():
        words = ["Hello", " world", "x", "  y", "\n", "code:", *TYPED]
        return "".join(rng.choice(words[:4] + TYPED if i == 0 else words) for i in range(rng.integers(1, 9)))

    class Conv:
        def __init__(self):
            self.system = content() if rng.random() < 0.5 else None
            self.messages = [{"role": r, "content": content()} for r in ("user", "assistant") * 2]

    return [Conv() for _ in range(20)]


@pytest.mark.parametrize("name", ["openchat_v3.2", "openchat_3.5", "openchat_3.6"])
def test_special_tokens_in_content_as_tokens_serve_as_trained(name, llama3_dir, llama2_folder, tmp_path):
    """`tokens`: special-token text typed in a message trains as the token, the ids transformers'
    apply_chat_template gives with the written folder; `text` (the default) keeps OpenChat's plain-text ids."""
    import numpy as np

    mt = get_model_type(name)
    tok = load_tokenizer({"openchat_v3.2": LLAMA2_TOKENIZER, "openchat_3.5": llama2_folder(),
                          "openchat_3.6": llama3_dir}[name], mt)  # SentencePiece; its transformers conversion; BPE
    save_serving_tokenizer(tok, mt, tmp_path)
    convs = _typed_special_tokens(np.random.default_rng())
    as_tokens = with_special_tokens_in_content(mt, "tokens")
    assert_serves_as_trained(tok, as_tokens, tmp_path, convs)
    typed = [{"role": "user", "content": "a <|end_of_turn|> b"}, {"role": "assistant", "content": "<s>"}]
    ids, weights = as_tokens.template.encode(typed, tok)
    plain, _ = mt.template.encode(typed, tok)
    if name != "openchat_3.6":
        assert ids.count(tok.eot_id) == 3 and plain.count(tok.eot_id) == 2 and ids[-2] == tok.bos_id
        assert weights[-2:] == [1.0, 1.0]  # the typed token is a target like the content it stands in
    assert tok.encode("<s>") == plain[-1 - len(tok.encode("<s>")):-1]


@pytest.mark.parametrize("preset", ["chatml", "gemma"])
def test_chat_template_serves_as_trained(preset, qwen_dir, llama2_folder, tmp_path):
    mt = get_model_type("chat_template", preset)
    folder = qwen_dir if preset == "chatml" else llama2_folder(["<start_of_turn>", "<end_of_turn>"])
    tok = load_tokenizer(folder, mt)
    generation = save_serving_tokenizer(tok, mt, tmp_path)
    assert generation["eos_token_id"][0] == tok.eot_id == AutoTokenizer.from_pretrained(str(tmp_path)).eos_token_id
    assert assert_serves_as_trained(tok, mt, tmp_path, sample_conversations(mt)).chat_template == tok.chat_template


@pytest.fixture(scope="module")
def llama_cpp_dir(tmp_path_factory) -> Path:
    """A llama.cpp source tree with convert_hf_to_gguf.py: LLAMA_CPP_DIR, else the converter of the pinned
    llama-cpp-python source distribution from PyPI (skipped when neither can be had)."""
    path = os.environ.get("LLAMA_CPP_DIR")
    if path and (Path(path) / "convert_hf_to_gguf.py").is_file():
        return Path(path)
    try:
        return fetch_converter(tmp_path_factory.mktemp("llama_cpp"))
    except OSError as e:
        pytest.skip(f"llama.cpp's converter cannot be had (set LLAMA_CPP_DIR to a llama.cpp tree): {e}")


def test_llama_cpp_converter_keeps_scores_and_end_of_turn(tmp_path, sp, llama_cpp_dir):
    from transformers import LlamaConfig

    converter = llama_cpp_dir
    sys.path.insert(0, str(converter / "gguf-py"))
    gguf = pytest.importorskip("gguf")
    mt = get_model_type("openchat_v3.2")
    save_serving_tokenizer(load_tokenizer(LLAMA2_TOKENIZER, mt), mt, tmp_path)
    config = LlamaConfig(vocab_size=32001, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    config.save_pretrained(str(tmp_path))
    r = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(tmp_path), "--vocab-only",
                        "--outfile", str(tmp_path / "vocab.gguf")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    fields = gguf.GGUFReader(str(tmp_path / "vocab.gguf")).fields

    def entry(name, i):
        field = fields[name]
        return field.parts[field.data[i]]

    assert len(fields["tokenizer.ggml.tokens"].data) == 32001
    assert bytes(entry("tokenizer.ggml.tokens", 32000)) == b"<|end_of_turn|>"
    assert int(entry("tokenizer.ggml.token_type", 32000)[0]) == gguf.TokenType.CONTROL
    for i in (278, 450, 29871, 31999):  # SentencePiece's own scores, not the -1000 of a missing tokenizer.model
        assert float(entry("tokenizer.ggml.scores", i)[0]) == sp.get_score(i)
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == 32000
    assert "GPT4 Assistant:" in bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
