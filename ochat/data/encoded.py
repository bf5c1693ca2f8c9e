"""What a template makes of a conversation: `Encoded` or `UnsupportedConversation`, and the C-RLFT
weight of a condition (shared by every template)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

# skip reasons that templates give (the data CLI counts them)
TOOLS_UNSUPPORTED = "tools_unsupported"
TEMPLATE_ERROR = "template_error"
TEMPLATE_UNSPLITTABLE = "template_unsplittable"


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


def condition_weight(condition_weights: Mapping[str, float], condition: str) -> float:
    """The loss weight of a conversation's targets under `condition` (C-RLFT, e.g. GPT4 1.0, GPT3 0.1)."""
    if condition not in condition_weights:
        known = ", ".join(sorted(condition_weights))
        raise ValueError(f"unknown condition {condition!r} (known: {known})")
    return float(condition_weights[condition])


def uses_tools(messages, tools) -> bool:
    """Whether a conversation offers tools, calls one or carries a tool result."""
    return bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
