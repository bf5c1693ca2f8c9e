"""Tokenizers for tests: a Qwen-style byte-level BPE trained on the bundled sample, Meta's Llama 3 tokenizer (from
the `llama-models` package) as a Hugging Face folder, and Mistral's v3 SentencePiece model (from `mistral-common`)."""
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from tests.helpers.data import sample_records
from tests.helpers.pypi import download_release

MISTRAL_COMMON = "1.13.1"  # its wheel ships Mistral's tokenizer files
MISTRAL_V3 = "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3"


def sample_texts() -> list[str]:
    """Every message text of the bundled ShareGPT sample."""
    return [m["value"] for r in sample_records() for m in r["conversations"] if isinstance(m.get("value"), str)]


def qwen_style_tokenizer(out: Path) -> Path:
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
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>").save_pretrained(str(out))
    return out


def llama3_tokenizer(out: Path) -> Path:
    """Meta's Llama 3 tokenizer (`llama-models` must be installed) as a Hugging Face folder, as Meta publishes it."""
    from llama_models.llama3.tokenizer import Tokenizer
    from transformers.integrations.tiktoken import convert_tiktoken_to_fast

    convert_tiktoken_to_fast(Tokenizer.get_instance().model, str(out))
    shutil.rmtree(Path(out) / "tiktoken")
    (Path(out) / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    return out


def mistral_v3_tokenizer(scratch: Path) -> bytes:
    """Mistral's v3 SentencePiece model: from an installed `mistral-common`, else from its pinned wheel on PyPI
    (read out of the zip, not installed: it pins numpy below what ochat runs with). Skips without either."""
    try:
        import mistral_common
        return (Path(mistral_common.__file__).parent.parent / MISTRAL_V3).read_bytes()
    except (ImportError, OSError):
        pass
    try:
        wheel = download_release("mistral-common", MISTRAL_COMMON, "bdist_wheel", scratch)
    except OSError as e:
        pytest.skip(f"Mistral's tokenizer cannot be had (install mistral-common): {e}")
    with zipfile.ZipFile(wheel) as z:
        data = z.read(MISTRAL_V3)
    wheel.unlink()
    return data
