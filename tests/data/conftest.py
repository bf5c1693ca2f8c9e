import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from ochat.assets import LLAMA2_TOKENIZER, SHAREGPT_SAMPLE

CHAT_TEMPLATES = Path(__file__).resolve().parent / "chat_templates"


@pytest.fixture(scope="session")
def sp():
    return spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))


@pytest.fixture(scope="session")
def tok():
    from ochat.data import load_tokenizer

    return load_tokenizer(LLAMA2_TOKENIZER, "openchat_v3.2")


def sample_texts() -> list[str]:
    """Every message text of the bundled ShareGPT sample."""
    records = json.loads(Path(SHAREGPT_SAMPLE).read_text(encoding="utf-8"))
    return [m["value"] for r in records for m in r["conversations"] if isinstance(m.get("value"), str)]


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """A Qwen-style tokenizer folder: byte-level BPE with Qwen2's pre-tokenizer, trained here on the bundled
    sample, with Qwen's special tokens and its non-special added tokens (<think>, <tool_call>...)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    qwen2_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                   r"\s*[\r\n]+|\s+(?!\S)|\s+")
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(qwen2_split), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(sample_texts(), trainers.BpeTrainer(
        vocab_size=3000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in
                    ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")])
    out = tmp_path_factory.mktemp("qwen")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>").save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory):
    """Meta's Llama 3 tokenizer (from `llama-models`) as a Hugging Face folder, as Meta publishes it."""
    pytest.importorskip("blobfile")
    tokenizer_module = pytest.importorskip("llama_models.llama3.tokenizer")
    from transformers.integrations.tiktoken import convert_tiktoken_to_fast

    out = tmp_path_factory.mktemp("llama3")
    convert_tiktoken_to_fast(tokenizer_module.Tokenizer.get_instance().model, str(out))
    shutil.rmtree(out / "tiktoken")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    return out


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
