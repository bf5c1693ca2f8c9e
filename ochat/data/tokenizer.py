"""Tokenizers: a SentencePiece `.model` file or a Hugging Face tokenizer folder, fitted to a model type.

`load_tokenizer(path, chat_format)` opens the file or folder and lets the chat format's template fit it
(`template.prepare`): OpenChat types add their end-of-turn token where the vocabulary lacks it (Llama 2 +
`<|end_of_turn|>` -> id 32000, `vocab_size` 32001) and check the tokens they need (`openchat_3.6`: Llama 3's
headers and `<|eot_id|>`); `chat_template` reads the folder's chat template and its end-of-turn token.
Anything else is refused in one line (ValueError), e.g. Meta's raw tiktoken `tokenizer.model` of Llama 3.

`encode_batch` never adds BOS and never parses special-token text: `<s>` or `<|end_of_turn|>` typed in a
message stay plain text (a template's `special_tokens_in_content="tokens"` splits them out first, with
`special_tokens()`). `serving_tokenizer()` is a Hugging Face tokenizer that tokenizes like
`encode_batch` (plus special-token parsing), for the folders ochat writes (`ochat.data.serving`).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

# files transformers builds a tokenizer from (tokenizer.json; else a slow tokenizer's vocabulary, converted)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tekken.json")


def _sha256(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _is_tiktoken(path: Path) -> bool:
    """A tiktoken BPE file (Meta's Llama 3 `tokenizer.model`): lines of "base64-token rank"."""
    with open(path, "rb") as f:
        first = f.readline(512).strip()
    return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", first) is not None


def _refuse_tiktoken(path) -> ValueError:
    return ValueError(
        f"{path} is a tiktoken BPE file (like Meta's Llama 3 tokenizer.model), not a SentencePiece model: point "
        "--tokenizer at the model's Hugging Face folder (with tokenizer.json), or convert it: "
        "transformers.integrations.tiktoken.convert_tiktoken_to_fast(llama_models.llama3.tokenizer.Tokenizer(PATH).model, "
        "OUT_DIR) (pip install llama-models blobfile)")


class Tokenizer:
    """Common interface: vocab_size, bos_id, eos_id, eot_id, eot_token, sha256, encode_batch, token_id,
    add_special_token, special_tokens, decode, serving_tokenizer, original_files."""

    path: str
    eot_token: str | None = None
    eot_id: int | None = None
    chat_template: str | None = None  # the Jinja template conversations are rendered with (chat_template type)
    chat_format = None                # the ChatFormat this tokenizer was fitted to (load_tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def special_tokens(self) -> list[str]:
        """The texts a serving tokenizer turns into their token when they appear in a string: the control
        and added tokens (what `serving_tokenizer()` splits on)."""
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path):
        import sentencepiece as spm

        from ochat.data.sentencepiece_hf import check_servable

        self.path = str(path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        check_servable(self.path)
        self.added: dict[str, int] = {}
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.sha256 = _sha256([self.path])

    def token_id(self, text: str) -> int | None:
        if text in self.added:
            return self.added[text]
        i = self.sp.piece_to_id(text)
        return i if self.sp.id_to_piece(i) == text else None

    def add_special_token(self, text: str) -> int:
        self.added[text] = self.vocab_size
        self.vocab_size += 1
        return self.added[text]

    def special_tokens(self) -> list[str]:
        # user-defined pieces need no splitting: SentencePiece itself matches them in text
        sp = self.sp
        return [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)] \
            + list(self.added)

    def encode_batch(self, texts):
        # SentencePiece never parses control symbols (<s>, </s>) from text; the added tokens are ours alone.
        return self.sp.encode(list(texts))

    def decode(self, ids) -> str:
        names = {i: t for t, i in self.added.items()}
        out, run = [], []
        for i in ids:
            i = int(i)
            if i in names:
                out.append(self.sp.decode(run) + names[i])
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def serving_tokenizer(self):
        from transformers import PreTrainedTokenizerFast

        from ochat.data.sentencepiece_hf import sentencepiece_to_hf

        sp = self.sp
        return PreTrainedTokenizerFast(tokenizer_object=sentencepiece_to_hf(self.path, self.added),
                                       bos_token=sp.id_to_piece(sp.bos_id()), eos_token=sp.id_to_piece(sp.eos_id()),
                                       unk_token=sp.id_to_piece(sp.unk_id()))

    def original_files(self) -> list[Path]:
        return [Path(self.path)]


class HFTokenizer(Tokenizer):
    def __init__(self, path):
        from transformers import AutoTokenizer

        self.path = str(path)
        try:
            self.hf = AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as e:  # transformers' messages span several lines
            raise ValueError(f"{path}: transformers cannot load its tokenizer: {' '.join(str(e).split())}") from None
        if not self.hf.is_fast:
            raise ValueError(f"{path}: transformers gave a tokenizer without a `tokenizers` backend")
        self._vocab = self.hf.get_vocab()
        self.vocab_size = len(self.hf)
        self.bos_id, self.eos_id = self.hf.bos_token_id, self.hf.eos_token_id
        files = sorted(p for p in Path(self.path).iterdir() if p.is_file() and "token" in p.name)
        self.sha256 = _sha256(files)

    def token_id(self, text: str) -> int | None:
        return self._vocab.get(text)

    def add_special_token(self, text: str) -> int:
        from transformers import AddedToken

        self.hf.add_tokens([AddedToken(text, special=True, normalized=False)], special_tokens=True)
        self._vocab = self.hf.get_vocab()
        self.vocab_size = len(self.hf)
        return self._vocab[text]

    def special_tokens(self) -> list[str]:
        return list(self.hf.added_tokens_encoder)

    def encode_batch(self, texts):
        texts = list(texts)
        if not texts:
            return []
        return self.hf(texts, add_special_tokens=False, split_special_tokens=True,
                       return_attention_mask=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids])

    def serving_tokenizer(self):
        from tokenizers import Tokenizer as Backend
        from transformers import PreTrainedTokenizerFast

        hf = self.hf
        return PreTrainedTokenizerFast(tokenizer_object=Backend.from_str(hf.backend_tokenizer.to_str()),
                                       bos_token=hf.bos_token, eos_token=hf.eos_token, unk_token=hf.unk_token,
                                       pad_token=hf.pad_token)

    def original_files(self) -> list[Path]:
        """The folder's SentencePiece model (llama.cpp's converter reads the scores from it), if any."""
        model = Path(self.path) / "tokenizer.model"
        return [model] if model.is_file() and not _is_tiktoken(model) else []


def load_tokenizer(path, chat_format) -> Tokenizer:
    """A SentencePiece `.model` file or a Hugging Face tokenizer folder, fitted to `chat_format` (a ChatFormat
    or its name). FileNotFoundError when nothing is there (or a folder holds none of TOKENIZER_FILES); a
    one-line ValueError for a tokenizer that cannot be loaded or cannot serve the model type."""
    from ochat.data.chat_formats import get_chat_format

    if isinstance(chat_format, str):
        chat_format = get_chat_format(chat_format)
    p = Path(path)
    if p.is_dir():
        if not any((p / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(f"no tokenizer in the folder {path}: expected one of {', '.join(TOKENIZER_FILES)} "
                                    "(a Hugging Face tokenizer folder, as save_pretrained writes it)")
        if not (p / "tokenizer.json").is_file() and (p / "tokenizer.model").is_file() and _is_tiktoken(p / "tokenizer.model"):
            raise _refuse_tiktoken(p / "tokenizer.model")
        tok = HFTokenizer(p)
    elif p.is_file():
        if _is_tiktoken(p):
            raise _refuse_tiktoken(p)
        tok = SentencePieceTokenizer(p)
    else:
        raise FileNotFoundError(f"tokenizer not found: {path} (expected a SentencePiece .model file or a "
                                "Hugging Face tokenizer directory)")
    chat_format.template.prepare(tok)
    tok.chat_format = chat_format
    return tok
