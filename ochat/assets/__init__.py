"""Bundled tokenizer and sample conversations: the one place that knows their paths (licenses: README.md here).

    from ochat.assets import LLAMA2_TOKENIZER, SHAREGPT_SAMPLE
"""
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
LLAMA2_TOKENIZER = ASSETS_DIR / "llama2-tokenizer.model"  # Llama 2 SentencePiece, 32,000 pieces
SHAREGPT_SAMPLE = ASSETS_DIR / "sharegpt_sample.json"  # 500 ShareGPT conversations

__all__ = ["ASSETS_DIR", "LLAMA2_TOKENIZER", "SHAREGPT_SAMPLE"]
