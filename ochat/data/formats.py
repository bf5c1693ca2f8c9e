"""Records -> conversations: validation and normalisation of ShareGPT, OpenAI-style and Alpaca records.

Records: ShareGPT (`conversations` or `items`: [{"from", "value"}]), OpenAI-style (`messages`:
[{"role", "content", "tool_calls"?, "tool_call_id"?, "name"?}]) or Alpaca (`instruction`, `input`?,
`output`: one user turn, the instruction followed by the input after a blank line ("\\n\\n") when the input is
not empty, and one assistant turn, the output), all with optional `model`, `condition`, `system` and `tools`;
mixed freely. A key whose value is null counts as absent (Parquet and Hugging Face
datasets store a missing field as null). A record that cannot be used gives a skip reason (a string)
that the CLI counts; see `normalize` for the rules.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system",
         "developer": "system", "tool": "tool", "function": "tool"}

# skip reasons (counted in the report)
NOT_AN_OBJECT = "not_an_object"
NO_CONVERSATION = "no_conversation"
BAD_MESSAGE = "bad_message"
UNKNOWN_ROLE = "unknown_role"
NON_STRING_CONTENT = "non_string_content"
NON_TEXT_CONTENT = "non_text_content"
BAD_TOOL_CALL = "bad_tool_call"
BAD_TOOLS = "bad_tools"
MISPLACED_TOOL = "misplaced_tool"
UNANSWERED_TOOL_CALL = "unanswered_tool_call"
UNKNOWN_CONDITION = "unknown_condition"
MISPLACED_SYSTEM = "misplaced_system"
INVALID_UNICODE = "invalid_unicode"  # a lone surrogate escape ("\ud800"): valid JSON, but no text a tokenizer encodes
NO_ASSISTANT = "no_assistant"
NO_TARGET_AFTER_TRUNCATION = "no_target_after_truncation"
TOO_LONG = "too_long"  # far longer than --max-length: see text_size

# changes normalisation made to a kept conversation (counted in the report)
DROPPED_LEADING = "dropped_leading_turns"
DROPPED_TRAILING = "dropped_trailing_turns"
MERGED = "merged_turns"


@dataclass
class Conversation:
    """A normalised conversation: starts with a user turn; user and assistant turns alternate, except that
    an assistant turn with `tool_calls` is followed by one or more tool messages (then by an assistant or
    user turn); ends with an assistant turn."""

    messages: list  # OpenAI-style dicts: {"role": "user"|"assistant"|"tool", "content": str, ...}, see normalize
    condition: str
    system: str | None
    tools: list | None = None  # function definitions offered to the model (OpenAI `tools`), for templates that render them
    changes: tuple = field(default=())  # DROPPED_LEADING / DROPPED_TRAILING / MERGED where they happened


class Skip(str):
    """A skip reason (a str) where normalize's helpers otherwise return a value."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(obj) -> bool:
    stack = [obj]  # not recursive: a record may nest as deep as the JSON parser allows
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if not x.isascii() and _SURROGATE.search(x) is not None:
                return True
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return False


def _get(obj: Mapping, *keys: str) -> Any:
    """The first of `keys` present with a non-null value."""
    for k in keys:
        if obj.get(k) is not None:
            return obj[k]
    return None


def _text(content) -> str:
    """Message content as text -> str, or a skip reason: a string is itself; a list of OpenAI content parts
    gives its text parts joined with "\\n"; any other part type is NON_TEXT_CONTENT."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return Skip(NON_STRING_CONTENT)
    texts = []
    for part in content:
        if not isinstance(part, dict):
            return Skip(NON_STRING_CONTENT)
        if part.get("type") != "text":
            return Skip(NON_TEXT_CONTENT)
        if not isinstance(part.get("text"), str):
            return Skip(NON_STRING_CONTENT)
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_calls(m: Mapping) -> list | None | Skip:
    """An assistant message's calls in OpenAI form, [{"id"?, "type": "function", "function": {"name",
    "arguments": str}}]; the legacy `function_call` becomes one such call; dict arguments become JSON text."""
    calls, legacy = m.get("tool_calls"), m.get("function_call")
    if calls is not None and legacy is not None:
        return Skip(BAD_TOOL_CALL)
    if legacy is not None:
        calls = [{"type": "function", "function": legacy}]
    if not isinstance(calls, list):
        return None if calls is None else Skip(BAD_TOOL_CALL)
    if not calls:
        return None
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function" or not isinstance(fn.get("name"), str):
            return Skip(BAD_TOOL_CALL)
        args = fn.get("arguments")
        if isinstance(args, (dict, list)):
            args = json.dumps(args, ensure_ascii=False)
        if not isinstance(args, str):
            return Skip(BAD_TOOL_CALL)
        norm = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if call.get("id") is not None:
            if not isinstance(call["id"], str):
                return Skip(BAD_TOOL_CALL)
            norm = {"id": call["id"], **norm}
        out.append(norm)
    return out


def _tools(rec: Mapping) -> list | None | Skip:
    """The record's `tools` (OpenAI form; a JSON string of the list is accepted) or legacy `functions`."""
    tools, functions = rec.get("tools"), rec.get("functions")
    if tools is not None and functions is not None:
        return Skip(BAD_TOOLS)
    if functions is not None:
        tools = [{"type": "function", "function": f} for f in functions] if isinstance(functions, list) else functions
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            return Skip(BAD_TOOLS)
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        return Skip(BAD_TOOLS)
    return tools


def condition_of(rec: Mapping, chat_format, weights: Mapping[str, float], default_condition: str,
                 file_condition: str | None = None) -> str | Skip:
    """The record's condition. Precedence: the record's `condition`; the file's (`--in-files F:COND`); from
    the record's `model` (a GPT-4 variant -> the model type's GPT-4 condition, anything else -> its other
    condition); `default_condition`. A condition without a weight -> UNKNOWN_CONDITION."""
    cond = rec.get("condition")
    if cond is None:
        cond = file_condition
    if cond is None and isinstance(rec.get("model"), str) and rec["model"]:
        key = re.sub(r"[^a-z0-9]", "", rec["model"].lower())
        cond = chat_format.gpt4_condition if "gpt4" in key else chat_format.other_condition
    if cond is None:
        cond = default_condition
    return cond if isinstance(cond, str) and cond in weights else Skip(UNKNOWN_CONDITION)


def _message(m, rkey: str, ckey: str) -> dict | Skip:
    """One input message -> {"role", "content", ...} with role user / assistant / tool / system."""
    if not isinstance(m, dict):
        return Skip(BAD_MESSAGE)
    # either key spelling inside a record
    role = _get(m, rkey, "role" if rkey == "from" else "from")
    if not isinstance(role, str) or role.lower() not in ROLES:
        return Skip(UNKNOWN_ROLE)
    legacy_function = role.lower() == "function"
    role = ROLES[role.lower()]
    content = _get(m, ckey, "content" if ckey == "value" else "value")
    calls = _tool_calls(m) if role == "assistant" else None
    if isinstance(calls, Skip):
        return calls
    if content is None and calls:
        content = ""  # an assistant turn that only calls tools
    content = _text(content)
    if isinstance(content, Skip):
        return content
    msg = {"role": role, "content": content}
    if calls:
        msg["tool_calls"] = calls
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    return Skip(BAD_MESSAGE)
                msg[key] = m[key]
        if legacy_function and "name" not in msg:
            return Skip(BAD_MESSAGE)
    return msg


def _alpaca(rec: Mapping) -> list | None | Skip:
    """An Alpaca record's two turns, OpenAI-style; None when it is not one (no `instruction` or `output`)."""
    instruction, output, extra = rec.get("instruction"), rec.get("output"), rec.get("input")
    if instruction is None or output is None:
        return None
    if not all(isinstance(x, str) for x in (instruction, output, extra or "")):
        return Skip(NON_STRING_CONTENT)
    return [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
            {"role": "assistant", "content": output}]


def text_size(conv: Conversation) -> int:
    """Characters of text a template renders from `conv`: contents, system prompt, tool-call arguments and
    tool definitions (as JSON)."""
    size = len(conv.system or "") + (len(json.dumps(conv.tools, ensure_ascii=False)) if conv.tools else 0)
    for m in conv.messages:
        size += len(m["content"]) + sum(len(c["function"]["arguments"]) for c in m.get("tool_calls", ()))
    return size


def normalize(rec, chat_format, weights, default_condition, file_condition=None):
    """-> Conversation, or a skip-reason string.

    Messages: role through ROLES (`function` is the legacy spelling of `tool`, `developer` of `system`;
    unknown -> skip); content a string or OpenAI content parts (text parts joined with "\\n"; an image,
    audio or other part -> NON_TEXT_CONTENT); an assistant may carry `tool_calls` (or legacy
    `function_call`), then its content may be null; a tool message keeps `tool_call_id` and `name`.

    Rules: system messages only before the first user turn (joined with a blank line, after a
    record-level `system`); turns before the first user turn dropped; consecutive user turns merged, and
    consecutive assistant turns merged when the earlier one calls no tool (non-empty contents joined with
    "\\n\\n", the later one's tool calls kept); tool messages are never merged: each must follow an assistant
    turn with tool calls or another tool message (else MISPLACED_TOOL), and an assistant turn with tool calls
    must be followed by a tool message (else UNANSWERED_TOOL_CALL) unless it ends the conversation; trailing
    user and tool turns dropped (they carry no target); no assistant turn left -> NO_ASSISTANT."""
    if not isinstance(rec, dict):
        return NOT_AN_OBJECT
    for key, rkey, ckey in (("messages", "role", "content"), ("conversations", "from", "value"),
                            ("items", "from", "value")):
        if rec.get(key) is not None:
            msgs = rec[key]
            break
    else:
        msgs, rkey, ckey = _alpaca(rec), "role", "content"
        if isinstance(msgs, Skip):
            return str(msgs)
    if not isinstance(msgs, list):
        return NO_CONVERSATION
    cond = condition_of(rec, chat_format, weights, default_condition, file_condition)
    if isinstance(cond, Skip):
        return str(cond)
    tools = _tools(rec)
    if isinstance(tools, Skip):
        return str(tools)
    systems = [rec["system"]] if isinstance(rec.get("system"), str) and rec["system"] else []
    turns: list[dict] = []
    changes = set()
    for raw in msgs:
        m = _message(raw, rkey, ckey)
        if isinstance(m, Skip):
            return str(m)
        role, prev = m["role"], (turns[-1] if turns else None)
        if role == "system":
            if turns:
                return MISPLACED_SYSTEM
            if m["content"]:
                systems.append(m["content"])
        elif not turns:
            if role == "user":
                turns.append(m)
            else:
                changes.add(DROPPED_LEADING)
        elif role == "tool":
            if prev["role"] not in ("tool", "assistant") or (prev["role"] == "assistant" and "tool_calls" not in prev):
                return MISPLACED_TOOL
            turns.append(m)
        elif prev["role"] == "assistant" and "tool_calls" in prev:
            return UNANSWERED_TOOL_CALL
        elif prev["role"] == role:
            prev["content"] = "\n\n".join(c for c in (prev["content"], m["content"]) if c)
            if "tool_calls" in m:
                prev["tool_calls"] = m["tool_calls"]
            changes.add(MERGED)
        else:
            turns.append(m)
    while turns and turns[-1]["role"] != "assistant":
        turns.pop()
        changes.add(DROPPED_TRAILING)
    if not turns:
        return NO_ASSISTANT
    if _has_surrogate([turns, systems, tools]):
        return INVALID_UNICODE
    return Conversation(turns, cond, "\n\n".join(systems) if systems else None, tools, tuple(sorted(changes)))
