import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from ochat.assets import LLAMA2_TOKENIZER
from tests.helpers.tokenizers import llama3_tokenizer, qwen_style_tokenizer

CHAT_TEMPLATES = Path(__file__).resolve().parent / "chat_templates"


@pytest.fixture(scope="session")
def sp():
    return spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))


@pytest.fixture(scope="session")
def tok():
    from ochat.data import load_tokenizer

    return load_tokenizer(LLAMA2_TOKENIZER, "openchat_v3.2")


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    return qwen_style_tokenizer(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory):
    pytest.importorskip("blobfile")
    pytest.importorskip("llama_models.llama3.tokenizer")
    return llama3_tokenizer(tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="session")
def llama2_folder(tmp_path_factory):
    """make(special_tokens) -> a Hugging Face folder of the bundled Llama 2 tokenizer (transformers' conversion)
    with `special_tokens` added (as Phi-3 and others extend the Llama 2 vocabulary)."""
    made = {}

    def make(special_tokens=()):
        key = tuple(special_tokens)
        if key not in made:
            made[key] = _llama2_folder(tmp_path_factory.mktemp("llama2"), special_tokens)
        return made[key]

    return make


def _llama2_folder(out: Path, special_tokens) -> Path:
    from transformers import AutoTokenizer

    src = out / "src"
    src.mkdir(parents=True)
    shutil.copyfile(LLAMA2_TOKENIZER, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False}))
    hf = AutoTokenizer.from_pretrained(str(src))
    if special_tokens:
        hf.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    hf.save_pretrained(str(out))
    shutil.copyfile(LLAMA2_TOKENIZER, out / "tokenizer.model")
    shutil.rmtree(src)
    return out
