"""The user-facing configuration: the trainer's flags (`train_config`), the DeepSpeed configs, and the public
`get_model_type(name)`: the chat format a `--model-type` name stands for (`ochat.data.chat_formats`)."""
from ochat.data.chat_formats import CHAT_FORMATS as MODEL_TYPES
from ochat.data.chat_formats import ChatFormat, Template
from ochat.data.chat_formats import get_chat_format as get_model_type

__all__ = ["MODEL_TYPES", "ChatFormat", "Template", "get_model_type"]
