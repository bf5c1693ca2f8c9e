"""Bundled tokenizer and sample conversations (see README.md in this folder for licenses)."""
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
LLAMA2_TOKENIZER = ASSETS_DIR / "llama2-tokenizer.model"
SHAREGPT_SAMPLE = ASSETS_DIR / "sharegpt_sample.json"
