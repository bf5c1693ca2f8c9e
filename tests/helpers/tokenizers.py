"""Tokenizer folders for tests, built offline: a Qwen-style byte-level BPE trained on the bundled sample, and Meta's
Llama 3 tokenizer (from the `llama-models` package) as a Hugging Face folder."""
import json
import shutil
from pathlib import Path

from tests.helpers.data import sample_records


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
