"""ochat.data: input formats, templates applied, the pre-tokenization CLI, the reader and serving tokenizers.

    python -m ochat.data.generate_dataset --out-dir data/sample   # bundled tokenizer + sample
    ds = ochat.data.open_dataset("data/sample"); tokens, weights = ds[0]
    ochat.data.write_dataset("data/synthetic", train=[(tokens, weights), ...], meta={...})
    save_serving_tokenizer(load_tokenizer(path, chat_format), chat_format, out_dir)  # a folder that serves as trained
"""
from ochat.data.reader import TokenizedDataset, open_dataset
from ochat.data.schema import DatasetFormatError, write_dataset
from ochat.data.serving import save_serving_tokenizer
from ochat.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["DatasetFormatError", "TokenizedDataset", "Tokenizer", "load_tokenizer", "open_dataset",
           "save_serving_tokenizer", "write_dataset"]
