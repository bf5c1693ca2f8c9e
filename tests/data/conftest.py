import pytest
import sentencepiece as spm

from ochat.assets import LLAMA2_TOKENIZER


@pytest.fixture(scope="session")
def sp():
    return spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))


@pytest.fixture(scope="session")
def tok():
    from ochat.data import load_tokenizer

    return load_tokenizer(LLAMA2_TOKENIZER, "openchat_v3.2")
