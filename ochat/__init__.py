"""ochat: padding-free, packed supervised fine-tuning for LLaMA-family chat models."""

__version__ = "0.1.0"
