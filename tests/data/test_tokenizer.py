"""load_tokenizer on the tokenizers users point at, and the SentencePiece-exact Hugging Face tokenizer."""
import base64
import os
import random
import shutil

import pytest
import sentencepiece as spm

from ochat.assets import LLAMA2_TOKENIZER
from ochat.config import get_model_type
from ochat.data import load_tokenizer
from ochat.data.generate_dataset import main as generate_dataset
from ochat.data.sentencepiece_hf import sentencepiece_to_hf
from tests.helpers.data import sample_records


def texts_with_whitespace_runs(n, seed=0):
    """Random strings of words, code indentation, runs of spaces, tabs, newlines, non-Latin text and emoji."""
    rng = random.Random(seed)
    parts = ["a", "foo", "the", "ing", "x1", "12345", "def", "(", "):", " ", "  ", "   ", "    ", " " * 17, " " * 40,
             "\n", "\n    ", "\t", "\r\n", "é", "中文", "😀", "\u00a0", "\u2581", "<s>", "<|end_of_turn|>"]
    return ["".join(rng.choice(parts) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def test_sentencepiece_to_hf_equals_sentencepiece(sp):
    hf = sentencepiece_to_hf(LLAMA2_TOKENIZER, {"<|end_of_turn|>": 32000})
    texts = [m["value"] for r in sample_records() for m in r["conversations"]] + texts_with_whitespace_runs(5000)
    got = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    bad = [t for t, g, w in zip(texts, got, sp.encode(texts)) if g != w and "<" not in t]
    assert not bad, f"{len(bad)} texts tokenize differently, e.g. {bad[0]!r}"
    # the regressions transformers' own conversion has: indentation, and the marker after a special token
    assert hf.encode("    return x", add_special_tokens=False).ids == sp.encode("    return x") == [268, 736, 921]
    assert hf.encode("<|end_of_turn|>GPT4", add_special_tokens=False).ids == [32000, 402, 7982, 29946]
    assert hf.encode("hi").ids[0] == 1  # BOS first, as Llama tokenizers do


def test_load_sentencepiece_and_hf_folders(llama2_folder, llama3_dir, qwen_dir):
    t = load_tokenizer(LLAMA2_TOKENIZER, "openchat_v3.2")
    assert (t.vocab_size, t.eot_id, t.eot_token, t.bos_id, t.eos_id) == (32001, 32000, "<|end_of_turn|>", 1, 2)
    h = load_tokenizer(llama2_folder(), "openchat_3.5")  # the end-of-turn token is added where missing
    assert (h.vocab_size, h.eot_id, h.bos_id) == (32001, 32000, 1)
    assert h.encode_batch(["a <|end_of_turn|> <s>"])[0] == t.encode("a <|end_of_turn|> <s>")  # never parsed
    l3 = load_tokenizer(llama3_dir, "openchat_3.6")  # nothing added: Llama 3 has <|eot_id|>
    assert (l3.vocab_size, l3.eot_id, l3.bos_id) == (128256, 128009, 128000)
    q = load_tokenizer(qwen_dir, get_model_type("chat_template", "chatml"))  # the template's end-of-turn, nothing added
    assert (q.vocab_size, q.eot_token, q.bos_id) == (len(q.hf.get_vocab()), "<|im_end|>", None)
    assert q.eot_id == q.hf.convert_tokens_to_ids("<|im_end|>") and "<|end_of_turn|>" not in q.hf.get_vocab()


def test_tiktoken_model_refused_in_one_line(tmp_path, capsys):
    # the format of Meta's Llama 3 tokenizer.model: one "base64(token) rank" line per token
    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    for path in (tmp_path / "tokenizer.model", tmp_path):
        with pytest.raises(ValueError, match="tiktoken BPE file.*convert_tiktoken_to_fast") as e:
            load_tokenizer(path, "openchat_3.6")
        assert "\n" not in str(e.value)
    assert generate_dataset(["--model-type", "openchat_3.6", "--tokenizer", str(tmp_path), "--out-dir",
                             str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tiktoken BPE file" in err and "Traceback" not in err


def test_unservable_sentencepiece_refused(tmp_path):
    text = "\n".join(m["value"] for r in sample_records()[:200] for m in r["conversations"])
    (tmp_path / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "uni"),
                                   model_type="unigram", vocab_size=100, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="cannot reproduce.*Unigram"):
        load_tokenizer(tmp_path / "uni.model", "openchat_v3.2")


def test_meta_llama3_tokenizer_model_refused(tmp_path):
    tokenizer_module = pytest.importorskip("llama_models.llama3.tokenizer")
    meta = os.path.join(os.path.dirname(tokenizer_module.__file__), "tokenizer.model")
    shutil.copyfile(meta, tmp_path / "tokenizer.model")
    with pytest.raises(ValueError, match="tiktoken BPE file"):
        load_tokenizer(tmp_path, "openchat_3.6")


def test_folder_without_tokenizer_files_is_one_full_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")  # a model folder whose tokenizer files were not copied
    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(tmp_path, "openchat_v3.2")
    msg = (f"no tokenizer in the folder {tmp_path}: expected one of tokenizer.json, tokenizer.model, vocab.json, "
           "vocab.txt, spiece.model, sentencepiece.bpe.model, tekken.json (a Hugging Face tokenizer folder, as "
           "save_pretrained writes it)")
    assert str(e.value) == msg
    assert generate_dataset(["--tokenizer", str(tmp_path), "--out-dir", str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err == f"generate_dataset: error: {msg}\n"
