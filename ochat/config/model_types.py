"""OpenChat model types and their conversation templates.

A model type bundles the template, the end-of-turn token, the context length and the
condition weights. Templates (DESIGN.md, "Semantics"), shown as segments; each text segment
is tokenized on its own, so SentencePiece puts its word-start marker at the start of each
(this is what OpenChat's `ConversationTemplate` does: it tokenizes role prefixes and contents
in separate batched calls, content as-is with no added space):

    openchat_v3.2 / openchat_3.5:
        <s> [system <|end_of_turn|>] ("{C} User:" content <|end_of_turn|> | "{C} Assistant:" content <|end_of_turn|>)*
    openchat_v3.1_llama2:
        <s> "Assistant is {C}" <|end_of_turn|> [system <|end_of_turn|>] ("User:" ... | "Assistant:" ...)*

Weights: assistant content and its end-of-turn get the condition's weight; everything else 0.

    >>> mt = get_model_type("openchat_v3.2")
    >>> tokens, weights = mt.template.encode([{"role": "user", "content": "Hi"},
    ...                                       {"role": "assistant", "content": "Hello"}], tokenizer)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

BOS = "bos"
EOT = "eot"
TEXT = "text"


@dataclass
class Encoded:
    """One conversation rendered for training: token ids and the weight of each token as a target."""

    tokens: list[int]
    weights: list[float]
    rewritten_turns: int = 0  # assistant turns the template rendered differently from the input (counted in the report)


class UnsupportedConversation(ValueError):
    """A conversation this template cannot render; `reason` is the skip reason the data CLI counts."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


@dataclass(frozen=True)
class Template:
    """A conversation template; `kind` is "v3.2" (condition in each role prefix) or "v3.1"
    (condition in a leading "Assistant is {C}" turn)."""

    kind: str
    condition_weights: Mapping[str, float]
    default_condition: str

    def weight_of(self, condition: str) -> float:
        if condition not in self.condition_weights:
            known = ", ".join(sorted(self.condition_weights))
            raise ValueError(f"unknown condition {condition!r} (known: {known})")
        return float(self.condition_weights[condition])

    def role_prefix(self, role: str, condition: str) -> str:
        name = {"user": "User", "assistant": "Assistant"}[role]
        return f"{condition} {name}:" if self.kind == "v3.2" else f"{name}:"

    def segments(self, messages: Sequence[Mapping], condition: str | None = None,
                 system: str | None = None, prompt: bool = False):
        """The template as a list of (kind, text, weight) with kind BOS, EOT or TEXT.

        `messages`: OpenAI-style dicts with role "user"/"assistant" (a leading "system" message
        is taken as the system prompt when `system` is None). With `prompt=True` the assistant
        prefix is appended (for generation)."""
        condition = self.default_condition if condition is None else condition
        w = self.weight_of(condition)
        messages = list(messages)
        if messages and messages[0].get("role") == "system":
            if system is None:
                system = messages[0]["content"]
            messages = messages[1:]
        segs = [(BOS, None, 0.0)]
        if self.kind == "v3.1":
            segs += [(TEXT, f"Assistant is {condition}", 0.0), (EOT, None, 0.0)]
        if system:
            segs += [(TEXT, system, 0.0), (EOT, None, 0.0)]
        for m in messages:
            role = m["role"]
            if role not in ("user", "assistant"):
                raise ValueError(f"unknown role {role!r} (expected user or assistant)")
            mw = w if role == "assistant" else 0.0
            segs += [(TEXT, self.role_prefix(role, condition), 0.0), (TEXT, m["content"], mw), (EOT, None, mw)]
        if prompt:
            segs.append((TEXT, self.role_prefix("assistant", condition), 0.0))
        return segs

    @staticmethod
    def assemble(segs, text_ids, tokenizer):
        """Join segments with the token ids of their TEXT parts (in order) -> (tokens, weights)."""
        tokens: list[int] = []
        weights: list[float] = []
        it = iter(text_ids)
        for kind, _, w in segs:
            ids = [tokenizer.bos_id] if kind == BOS else [tokenizer.eot_id] if kind == EOT else next(it)
            tokens.extend(ids)
            weights.extend([w] * len(ids))
        return tokens, weights

    def encode(self, messages, tokenizer, condition=None, system=None):
        """-> (tokens, weights) for training; weight of token i as a target."""
        segs = self.segments(messages, condition, system)
        ids = tokenizer.encode_batch([t for k, t, _ in segs if k == TEXT])
        return self.assemble(segs, ids, tokenizer)

    def encode_many(self, conversations: Sequence[Any], tokenizer) -> list["Encoded | UnsupportedConversation"]:
        """Encode many conversations (objects with .messages, .condition, .system, as `ochat.data.formats`
        makes them) in one batched tokenizer call; a conversation that cannot be rendered comes back as
        its UnsupportedConversation instead of raising."""
        segs_all = [self.segments(c.messages, c.condition, c.system) for c in conversations]
        ids = tokenizer.encode_batch([t for segs in segs_all for k, t, _ in segs if k == TEXT])
        out, pos = [], 0
        for segs in segs_all:
            n = sum(1 for k, _, _ in segs if k == TEXT)
            out.append(Encoded(*self.assemble(segs, ids[pos:pos + n], tokenizer)))
            pos += n
        return out

    def encode_prompt(self, messages, tokenizer, condition=None, system=None):
        """-> tokens for generation, ending with the assistant prefix."""
        segs = self.segments(messages, condition, system, prompt=True)
        ids = tokenizer.encode_batch([t for k, t, _ in segs if k == TEXT])
        return self.assemble(segs, ids, tokenizer)[0]


DEFAULT_WEIGHTS = {"GPT4": 1.0, "GPT3": 0.1}


@dataclass(frozen=True)
class ModelType:
    name: str
    template: Template
    context_length: int = 4096
    eot_token: str = "<|end_of_turn|>"
    bos_token: str = "<s>"
    condition_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    default_condition: str = "GPT4"
    gpt4_condition: str = "GPT4"   # condition for records whose `model` field is a GPT-4 variant
    other_condition: str = "GPT3"  # condition for records with any other `model`


def _make(name, kind, weights, default, gpt4, other):
    return ModelType(name=name, template=Template(kind, dict(weights), default),
                     condition_weights=dict(weights), default_condition=default,
                     gpt4_condition=gpt4, other_condition=other)


MODEL_TYPES = {
    "openchat_v3.2": _make("openchat_v3.2", "v3.2", DEFAULT_WEIGHTS, "GPT4", "GPT4", "GPT3"),
    "openchat_v3.1_llama2": _make("openchat_v3.1_llama2", "v3.1", DEFAULT_WEIGHTS, "GPT4", "GPT4", "GPT3"),
    "openchat_3.5": _make("openchat_3.5", "v3.2", {"GPT4 Correct": 1.0, "GPT3": 0.1},
                          "GPT4 Correct", "GPT4 Correct", "GPT3"),
}


def get_model_type(name: str) -> ModelType:
    try:
        return MODEL_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown model type {name!r} (known: {', '.join(MODEL_TYPES)})") from None


def with_condition_weights(mt: ModelType, weights: Mapping[str, float], default_condition: str) -> ModelType:
    """A copy of `mt` with other condition weights / default condition (for the CLI flags)."""
    if default_condition not in weights:
        raise ValueError(f"default condition {default_condition!r} has no weight (known: {', '.join(weights)})")
    t = Template(mt.template.kind, dict(weights), default_condition)
    return ModelType(mt.name, t, mt.context_length, mt.eot_token, mt.bos_token, dict(weights),
                     default_condition, mt.gpt4_condition, mt.other_condition)
