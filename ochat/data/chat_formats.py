"""Chat formats: a conversation template with its condition weights, end-of-turn token and context length.

A chat format is what the `--model-type` flag names (the name users know from OpenChat); the model's
architecture (config.json's `model_type`: llama, qwen3, ...) is another thing, `ochat.model.ModelConfig`'s.

    openchat_v3.2, openchat_v3.1_llama2, openchat_3.5, openchat_3.6   OpenChat's templates (openchat_template.py)
    chat_template                                                     a Hugging Face chat template (chat_template.py)

    >>> fmt = get_chat_format("openchat_v3.2")
    >>> tok = ochat.data.load_tokenizer("llama2/tokenizer.model", fmt)
    >>> tokens, weights = fmt.template.encode([{"role": "user", "content": "Hi"},
    ...                                        {"role": "assistant", "content": "Hello"}], tok)

Every template has `encode(messages, tokenizer, condition=None, system=None) -> (tokens, weights)`,
`encode_prompt(...) -> tokens` (ending with the assistant prefix), `encode_many(conversations, tokenizer)
-> [Encoded | UnsupportedConversation]`, `prepare(tokenizer)` (what `load_tokenizer` calls to fit a
tokenizer to it) and `serving_chat_template`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Union

from ochat.data.chat_template import ChatTemplate, read_chat_template
from ochat.data.encoded import Encoded, UnsupportedConversation
from ochat.data.openchat_template import OpenChatTemplate

Template = Union[OpenChatTemplate, ChatTemplate]

__all__ = ["CHAT_FORMATS", "Encoded", "ChatFormat", "Template", "UnsupportedConversation", "get_chat_format",
           "with_condition_weights", "with_special_tokens_in_content"]


@dataclass(frozen=True)
class ChatFormat:
    name: str
    template: Template
    context_length: int = 4096
    gpt4_condition: str = "GPT4"   # condition for records whose `model` field is a GPT-4 variant
    other_condition: str = "GPT3"  # condition for records with any other `model`

    @property
    def condition_weights(self) -> Mapping[str, float]:
        return self.template.condition_weights

    @property
    def default_condition(self) -> str:
        return self.template.default_condition

    @property
    def eot_token(self) -> str | None:
        """The end-of-turn token; None for `chat_template`, where the template decides (`tokenizer.eot_token`)."""
        return self.template.eot_token


GPT4_GPT3 = {"GPT4": 1.0, "GPT3": 0.1}
CORRECT_GPT3 = {"GPT4 Correct": 1.0, "GPT3": 0.1}

CHAT_FORMATS = {
    "openchat_v3.2": ChatFormat("openchat_v3.2", OpenChatTemplate("v3.2", GPT4_GPT3, "GPT4")),
    "openchat_v3.1_llama2": ChatFormat("openchat_v3.1_llama2", OpenChatTemplate("v3.1", GPT4_GPT3, "GPT4")),
    "openchat_3.5": ChatFormat("openchat_3.5", OpenChatTemplate("v3.2", CORRECT_GPT3, "GPT4 Correct"),
                              context_length=8192, gpt4_condition="GPT4 Correct"),
    "openchat_3.6": ChatFormat("openchat_3.6", OpenChatTemplate("v3.6", CORRECT_GPT3, "GPT4 Correct",
                                                               bos_token="<|begin_of_text|>", eot_token="<|eot_id|>"),
                              context_length=8192, gpt4_condition="GPT4 Correct"),
    "chat_template": ChatFormat("chat_template", ChatTemplate(GPT4_GPT3, "GPT4")),
}


def get_chat_format(name: str, chat_template: str | None = None) -> ChatFormat:
    """The chat format called `name` (a `--model-type` value). `chat_template` (for `chat_template` only): a bundled preset name,
    a Jinja file or Jinja text to use instead of the tokenizer's own chat template."""
    try:
        mt = CHAT_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown model type {name!r} (known: {', '.join(CHAT_FORMATS)})") from None
    if chat_template is None:
        return mt
    if not isinstance(mt.template, ChatTemplate):
        raise ValueError(f"--chat-template is for the chat_template model type, not {name}")
    source, label = read_chat_template(chat_template)
    return dataclasses.replace(mt, template=dataclasses.replace(mt.template, source=source, name=label))


def with_condition_weights(mt: ChatFormat, weights: Mapping[str, float], default_condition: str) -> ChatFormat:
    """A copy of `mt` with other condition weights / default condition (for the CLI flags)."""
    if default_condition not in weights:
        raise ValueError(f"default condition {default_condition!r} has no weight (known: {', '.join(weights)})")
    template = dataclasses.replace(mt.template, condition_weights=dict(weights), default_condition=default_condition)
    return dataclasses.replace(mt, template=template)


def with_special_tokens_in_content(mt: ChatFormat, mode: str | None) -> ChatFormat:
    """A copy of `mt` whose contents' special-token text trains as plain text (`mode` "text") or as the special
    token ("tokens"); None keeps the format's rule (OpenChat types: text; chat_template: tokens, as serving does).
    ValueError for "text" with chat_template, which tokenizes the rendered conversation as one string."""
    if mode is None:
        return mt
    if isinstance(mt.template, ChatTemplate):
        if mode != "tokens":
            raise ValueError(f"--special-tokens-in-content {mode}: the chat_template type tokenizes the rendered "
                             "conversation as one string, as serving does, so special-token text in a content always "
                             "becomes the token; `text` is for the OpenChat model types")
        return mt
    return dataclasses.replace(mt, template=dataclasses.replace(mt.template, special_tokens_in_content=mode))
