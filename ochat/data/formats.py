"""Input formats: reading JSON / JSONL files and normalising records into conversations.

Records: ShareGPT (`conversations` or `items`: [{"from", "value"}], optional `model`,
`condition`, `system`) or OpenAI-style (`messages`: [{"role", "content"}], optional `condition`,
`model`, `system`). Both may be mixed in one file.

File-level problems raise `InputError` (one line, with file and line or byte offset). Record-
level problems return a skip reason (a string) that the CLI counts; see `normalize`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}

# skip reasons (counted in the report)
NOT_AN_OBJECT = "not_an_object"
NO_CONVERSATION = "no_conversation"
BAD_MESSAGE = "bad_message"
UNKNOWN_ROLE = "unknown_role"
NON_STRING_CONTENT = "non_string_content"
UNKNOWN_CONDITION = "unknown_condition"
MISPLACED_SYSTEM = "misplaced_system"
NO_ASSISTANT = "no_assistant"
NO_TARGET_AFTER_TRUNCATION = "no_target_after_truncation"


class InputError(Exception):
    """A problem with the input that stops the run (printed as one line, no traceback)."""


@dataclass
class Conversation:
    messages: list  # [{"role": "user"|"assistant", "content": str}], alternating, starts with user
    condition: str
    system: str | None
    tools: list | None = None  # function definitions offered to the model (OpenAI `tools`), for templates that render them


def read_records(path) -> list:
    """Read a JSON array (or one object) or a JSONL file -> list of records (any JSON values)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}: not UTF-8 at byte offset {e.start} (line {line})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    stripped = text.lstrip()
    if not stripped:
        return []
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            off = len(text[:e.pos].encode("utf-8"))
            raise InputError(f"{path}: invalid JSON at byte offset {off} (line {e.lineno}, column {e.colno}): {e.msg}") from None
        return data
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            # a pretty-printed single JSON object is not JSONL: try the whole file once
            if lineno == 1 and stripped[0] == "{":
                try:
                    return [json.loads(text)]
                except json.JSONDecodeError:
                    pass
            raise InputError(f"{path}: invalid JSON on line {lineno} (column {e.colno}): {e.msg}") from None
    return records


def _condition(rec: dict, model_type, weights) -> str | None:
    cond = rec.get("condition")
    if cond is not None:
        return cond if isinstance(cond, str) and cond in weights else None
    model = rec.get("model")
    if isinstance(model, str) and model:
        key = re.sub(r"[^a-z0-9]", "", model.lower())
        return model_type.gpt4_condition if "gpt4" in key else model_type.other_condition
    return ""  # use the default condition


def normalize(rec, model_type, weights, default_condition):
    """-> Conversation, or a skip-reason string.

    Rules: roles mapped through ROLES (unknown -> skip); system messages only before the first
    user/assistant turn (joined with a blank line; a record-level `system` string comes first);
    leading assistant turns dropped; consecutive turns of one role merged (contents joined with
    "\\n\\n"); trailing user turns dropped (they have no target); no assistant turn -> skip."""
    if not isinstance(rec, dict):
        return NOT_AN_OBJECT
    if "messages" in rec:
        msgs, rkey, ckey = rec["messages"], "role", "content"
    elif "conversations" in rec:
        msgs, rkey, ckey = rec["conversations"], "from", "value"
    elif "items" in rec:
        msgs, rkey, ckey = rec["items"], "from", "value"
    else:
        return NO_CONVERSATION
    if not isinstance(msgs, list):
        return NO_CONVERSATION
    cond = _condition(rec, model_type, weights)
    if cond is None:
        return UNKNOWN_CONDITION
    cond = cond or default_condition
    if cond not in weights:
        return UNKNOWN_CONDITION
    systems = []
    if isinstance(rec.get("system"), str) and rec["system"]:
        systems.append(rec["system"])
    turns: list[list] = []  # [role, [contents]]
    for m in msgs:
        if not isinstance(m, dict):
            return BAD_MESSAGE
        # tolerate either key spelling inside a record
        role = m.get(rkey, m.get("role" if rkey == "from" else "from"))
        content = m.get(ckey, m.get("content" if ckey == "value" else "value"))
        if not isinstance(role, str) or role.lower() not in ROLES:
            return UNKNOWN_ROLE
        if not isinstance(content, str):
            return NON_STRING_CONTENT
        role = ROLES[role.lower()]
        if role == "system":
            if turns:
                return MISPLACED_SYSTEM
            if content:
                systems.append(content)
            continue
        if not turns and role == "assistant":
            continue  # leading assistant turn dropped
        if turns and turns[-1][0] == role:
            turns[-1][1].append(content)
        else:
            turns.append([role, [content]])
    while turns and turns[-1][0] == "user":
        turns.pop()
    if not turns:
        return NO_ASSISTANT
    messages = [{"role": r, "content": "\n\n".join(c)} for r, c in turns]
    return Conversation(messages, cond, "\n\n".join(systems) if systems else None)
