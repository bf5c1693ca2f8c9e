"""Tokenizer loading: a SentencePiece `.model` file or a Hugging Face tokenizer directory.

The model type's end-of-turn token is ensured: when the vocabulary lacks it, it is added as
the next id (32000 for Llama 2, so `vocab_size` is 32001). `encode_batch` never adds BOS and
never parses special-token text: `<s>` or `<|end_of_turn|>` typed in a message stay plain text.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def _sha256(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class Tokenizer:
    """Common interface: vocab_size, bos_id, eos_id, eot_id, sha256, encode_batch, decode, save_hf."""

    path: str
    eot_token: str

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path, eot_token: str):
        import sentencepiece as spm

        self.path, self.eot_token = str(path), eot_token
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        n = self.sp.get_piece_size()
        eot = self.sp.piece_to_id(eot_token)
        self.added = eot == self.sp.unk_id() and eot_token != self.sp.id_to_piece(eot)
        self.eot_id = n if self.added else eot
        self.vocab_size = n + 1 if self.added else n
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.sha256 = _sha256([self.path])

    def encode_batch(self, texts):
        # SentencePiece never parses control symbols (<s>, </s>) from text; Llama 2 has no
        # user-defined symbols, and the added end-of-turn token is ours alone.
        return self.sp.encode(list(texts))

    def decode(self, ids) -> str:
        out, run = [], []
        for i in ids:
            i = int(i)
            if i == self.eot_id and self.added:
                out.append(self.sp.decode(run) + self.eot_token)
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def save_hf(self, out_dir):
        """Write a Hugging Face tokenizer folder (tokenizer.model, tokenizer.json, config) with
        the end-of-turn token as an added special token at `eot_id`."""
        from transformers import AutoTokenizer

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(self.path, os.path.join(tmp, "tokenizer.model"))
            cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": self.sp.id_to_piece(self.bos_id),
                   "eos_token": self.sp.id_to_piece(self.eos_id), "unk_token": self.sp.id_to_piece(self.sp.unk_id()),
                   "add_bos_token": True, "add_eos_token": False, "legacy": True}
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
                json.dump(cfg, f)
            tok = AutoTokenizer.from_pretrained(tmp)
        tok.add_special_tokens({"additional_special_tokens": [self.eot_token]})
        got = tok.convert_tokens_to_ids(self.eot_token)
        if got != self.eot_id:
            raise RuntimeError(f"HF tokenizer put {self.eot_token} at {got}, expected {self.eot_id}")
        tok.save_pretrained(str(out_dir))
        shutil.copyfile(self.path, out_dir / "tokenizer.model")
        return out_dir


class HFTokenizer(Tokenizer):
    def __init__(self, path, eot_token: str):
        from transformers import AutoTokenizer

        self.path, self.eot_token = str(path), eot_token
        self.tok = AutoTokenizer.from_pretrained(self.path)
        vocab = self.tok.get_vocab()
        if eot_token not in vocab:
            self.tok.add_special_tokens({"additional_special_tokens": [eot_token]})
        self.eot_id = self.tok.convert_tokens_to_ids(eot_token)
        self.vocab_size = len(self.tok)
        self.bos_id, self.eos_id = self.tok.bos_token_id, self.tok.eos_token_id
        files = sorted(p for p in Path(self.path).iterdir() if p.is_file() and "token" in p.name)
        self.sha256 = _sha256(files)

    def encode_batch(self, texts):
        texts = list(texts)
        if not texts:
            return []
        return self.tok(texts, add_special_tokens=False, split_special_tokens=True,
                        return_attention_mask=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def save_hf(self, out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.tok.save_pretrained(str(out_dir))
        return Path(out_dir)


def load_tokenizer(path, model_type) -> Tokenizer:
    """A SentencePiece `.model` file or a Hugging Face tokenizer directory; `model_type` is a
    ModelType or its name."""
    from ochat.config import get_model_type

    if isinstance(model_type, str):
        model_type = get_model_type(model_type)
    p = Path(path)
    if p.is_dir():
        return HFTokenizer(p, model_type.eot_token)
    if p.is_file():
        return SentencePieceTokenizer(p, model_type.eot_token)
    raise FileNotFoundError(f"tokenizer not found: {path} (expected a SentencePiece .model file or a "
                            "Hugging Face tokenizer directory)")
