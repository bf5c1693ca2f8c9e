"""The `chat_template` model type: a Hugging Face chat template (Jinja) as the conversation template.

Tokens are exactly those of `tokenizer.apply_chat_template(messages, tokenize=True)`: the conversation is
rendered once and tokenized as one string (special-token text in the rendered string, contents included,
becomes special tokens, as in `apply_chat_template`). Targets are found on that string:

- where an assistant message starts: the end of the rendered prompt for it (`apply_chat_template` of the
  messages before it with `add_generation_prompt=True`), which must be a prefix of the whole rendering;
  for templates whose prompt is not (Mistral's puts the system prompt in the last user turn, DeepSeek-R1's
  prompt opens a `<think>` that history lacks) the message's rendered content, found after the previous one;
- where it ends: the first end-of-turn token after that start. The end-of-turn token is what the template
  writes after an assistant message: the first special token after a probe message's content.

Every token overlapping [start, end] gets the conversation's condition weight (C-RLFT, whether or not the
template prints the condition); the rest 0. What the template renders is what is trained: Qwen3's empty
`<think>` block on the last turn, tool calls, and earlier turns stripped of their reasoning; a turn whose
content does not appear verbatim in its span counts in `Encoded.rewritten_turns`.

Tools: `tools` (OpenAI function definitions), assistant `tool_calls` and `tool` messages are passed to the
template (tool-call arguments given as a JSON string are passed as the object they encode, as Hugging Face
templates expect); a template that does not render what a conversation uses gives `tools_unsupported`.
"""
from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ochat.data.encoded import (TEMPLATE_ERROR, TEMPLATE_UNSPLITTABLE, TOOLS_UNSUPPORTED, Encoded,
                                  UnsupportedConversation, condition_weight)

PRESETS_DIR = Path(__file__).resolve().parent / "chat_templates"
TOOL_FEATURES = ("tools", "tool_calls", "tool_results")


def presets() -> list[str]:
    """Names of the bundled chat templates (`ochat/data/chat_templates/NAME.jinja`)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.jinja"))


def read_chat_template(spec: str) -> tuple[str, str]:
    """-> (Jinja source, name for messages) of a bundled preset NAME, a Jinja FILE, or Jinja text itself."""
    if "{{" in spec or "{%" in spec:
        return spec, "given as text"
    preset = PRESETS_DIR / f"{spec}.jinja"
    if preset.is_file():
        return preset.read_text(encoding="utf-8"), spec
    path = Path(spec)
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    raise ValueError(f"chat template {spec!r} is neither a preset ({', '.join(presets())}) nor a file")


def _hf_message(m: Mapping) -> dict:
    """A message as Hugging Face templates expect it: tool-call arguments as an object, not a JSON string."""
    if not m.get("tool_calls"):
        return dict(m)
    calls = []
    for call in m["tool_calls"]:
        fn = call.get("function") or {}
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                parsed = json.loads(args)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                call = {**call, "function": {**fn, "arguments": parsed}}
        calls.append(call)
    return {**m, "tool_calls": calls}


@dataclass
class _Bound:
    """What a chat template needs to know about one tokenizer: found once, in `ChatTemplate.prepare`."""

    source: str
    eot_id: int
    renders: dict  # tool feature -> whether the template renders it


# probes (private-use characters: no template or tokenizer treats them specially)
_MARK = "\ue000"
_PROBE_TOOL = {"type": "function", "function": {"name": "ochatProbeTool", "description": "ochatProbeDefinition",
                                                "parameters": {"type": "object", "properties": {}}}}
_PROBE_CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "id": "ochat0001", "function": {"name": "ochatProbeTool", "arguments": {"q": "ochatProbeArg"}}}]}
_PROBE_RESULT = {"role": "tool", "tool_call_id": "ochat0001", "name": "ochatProbeTool", "content": "ochatProbeResult"}


@dataclass(frozen=True)
class ChatTemplate:
    """A Hugging Face chat template; `source` None means the tokenizer's own."""

    condition_weights: Mapping[str, float]
    default_condition: str
    source: str | None = None
    name: str = "the tokenizer's chat template"
    kind = "chat_template"
    eot_token = None  # the template decides (see `prepare`)
    special_tokens_in_content = "tokens"  # the rendered conversation is tokenized as one string, as serving does
    _bound: Any = field(default_factory=weakref.WeakKeyDictionary, init=False, compare=False, repr=False)

    # ------------------------------------------------------------------ tokenizer

    def prepare(self, tokenizer) -> None:
        """Fit `tokenizer` (ochat's HF tokenizer) to this template: set its chat template, end-of-turn
        and bos ids. One-line ValueError when the template is missing or cannot be split per message."""
        hf = getattr(tokenizer, "hf", None)
        if hf is None:
            raise ValueError(f"{tokenizer.path}: the chat_template model type needs a Hugging Face tokenizer folder")
        source = self.source if self.source is not None else hf.chat_template
        if not isinstance(source, str):
            raise ValueError(f"{tokenizer.path} has no chat template (or several named ones): pass --chat-template "
                             f"FILE or a preset ({', '.join(presets())})")
        probe = [{"role": "user", "content": "ochat"}, {"role": "assistant", "content": _MARK}]
        try:
            prompt = self._render(hf, source, probe[:1], None, True)
            whole = self._render(hf, source, probe, None, False)
        except Exception as e:
            raise ValueError(f"chat template {self.name}: cannot render a user and an assistant message: "
                             f"{e}".splitlines()[0]) from None
        if not whole.startswith(prompt) or _MARK not in whole[len(prompt):]:
            raise ValueError(f"chat template {self.name} cannot be split into per-message spans: the generation "
                             f"prompt is not where the assistant message is rendered")
        enc = hf(whole, add_special_tokens=False, return_offsets_mapping=True)
        special = {i for i, t in hf.added_tokens_decoder.items() if t.special}
        mark_end = whole.index(_MARK, len(prompt)) + len(_MARK)
        eot = next((i for i, (a, _) in zip(enc["input_ids"], enc["offset_mapping"]) if a >= mark_end and i in special), None)
        if eot is None:
            raise ValueError(f"chat template {self.name} cannot be split into per-message spans: no special token "
                             "closes an assistant message, so a model could not learn to stop (are the template's "
                             "special tokens in this vocabulary? python -m ochat.training.add_tokens adds them)")
        bound = _Bound(source, eot, self._tool_features(hf, source))
        self._bound[tokenizer] = bound
        tokenizer.chat_template = source
        tokenizer.eot_id = eot
        tokenizer.eot_token = hf.convert_ids_to_tokens(eot)
        tokenizer.bos_id = hf.bos_token_id
        # a plain two-turn conversation must split, or the template is unusable
        two_turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
        result = self.encode_many([_Conversation(two_turns)], tokenizer)[0]
        if isinstance(result, UnsupportedConversation):
            raise ValueError(f"chat template {self.name} cannot be split into per-message spans: {result}")

    def _tool_features(self, hf, source) -> dict:
        """Which of tool definitions, tool calls and tool results the template renders."""
        msgs = [{"role": "user", "content": "ochat"}, _PROBE_CALL, _PROBE_RESULT, {"role": "assistant", "content": "ok"}]
        try:
            text = self._render(hf, source, msgs, [_PROBE_TOOL], False)
        except Exception:
            return dict.fromkeys(TOOL_FEATURES, False)
        return {"tools": "ochatProbeDefinition" in text,
                "tool_calls": "ochatProbeArg" in text, "tool_results": "ochatProbeResult" in text}

    def _bind(self, tokenizer) -> _Bound:
        bound = self._bound.get(tokenizer)
        if bound is None:
            self.prepare(tokenizer)
            bound = self._bound[tokenizer]
        return bound

    @staticmethod
    def _render(hf, source, messages, tools, generation_prompt) -> str:
        return hf.apply_chat_template([_hf_message(m) for m in messages], tools=tools, chat_template=source,
                                      tokenize=False, add_generation_prompt=generation_prompt)

    # ------------------------------------------------------------------ encoding

    @staticmethod
    def _messages(messages, system):
        messages = list(messages)
        if system is not None and messages and messages[0].get("role") == "system":
            messages = messages[1:]
        if system:
            messages = [{"role": "system", "content": system}] + messages
        return messages

    def _check_tools(self, bound, messages, tools):
        used = {"tools": bool(tools), "tool_calls": any(m.get("tool_calls") for m in messages),
                "tool_results": any(m.get("role") == "tool" for m in messages)}
        missing = [f for f in TOOL_FEATURES if used[f] and not bound.renders[f]]
        if missing:
            raise UnsupportedConversation(TOOLS_UNSUPPORTED,
                                          f"chat template {self.name} does not render {', '.join(missing)}")

    def _render_safely(self, hf, source, messages, tools, generation_prompt) -> str:
        try:
            return self._render(hf, source, messages, tools, generation_prompt)
        except Exception as e:  # the template's raise_exception() or a Jinja error on this conversation
            raise UnsupportedConversation(TEMPLATE_ERROR, f"chat template {self.name}: {e}".splitlines()[0]) from None

    def _plan(self, hf, bound, messages, tools):
        """-> (rendered conversation, [(assistant index, start char)]) for one conversation."""
        self._check_tools(bound, messages, tools)
        whole = self._render_safely(hf, bound.source, messages, tools, False)
        starts, after = [], 0
        for k, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            prompt = self._render_safely(hf, bound.source, messages[:k], tools, True) if k else ""
            if k and whole.startswith(prompt) and len(prompt) >= after:
                start = len(prompt)
            else:
                content = (m.get("content") or "").strip()
                start = whole.find(content, after) if content else -1
                if start < 0:
                    raise UnsupportedConversation(TEMPLATE_UNSPLITTABLE, f"chat template {self.name}: cannot find "
                                                  f"where assistant message {k} is rendered")
            starts.append((k, start))
            after = start + 1
        return whole, starts

    def _weigh(self, bound, messages, whole, starts, enc, weight) -> Encoded:
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        weights = [0.0] * len(ids)
        rewritten, i = 0, 0
        for n, (k, start) in enumerate(starts):
            while i < len(ids) and offsets[i][1] <= start:
                i += 1
            j = i
            while j < len(ids) and ids[j] != bound.eot_id:
                j += 1
            next_start = starts[n + 1][1] if n + 1 < len(starts) else None
            if j == len(ids) or (next_start is not None and offsets[j][1] > next_start):
                raise UnsupportedConversation(TEMPLATE_UNSPLITTABLE, f"chat template {self.name}: assistant "
                                              f"message {k} is not closed by an end-of-turn token")
            weights[i:j + 1] = [weight] * (j + 1 - i)
            rewritten += (messages[k].get("content") or "") not in whole[start:offsets[j][0]]
            i = j + 1
        return Encoded(list(ids), weights, rewritten)

    def encode_many(self, conversations: Sequence[Any], tokenizer) -> list[Encoded | UnsupportedConversation]:
        """Encode many conversations (objects with .messages, .condition, .system, .tools) with one batched
        tokenizer call; a conversation the template cannot render comes back as its UnsupportedConversation."""
        bound = self._bind(tokenizer)
        hf = tokenizer.hf
        plans = []
        for c in conversations:
            messages = self._messages(c.messages, c.system)
            try:
                weight = condition_weight(self.condition_weights, c.condition or self.default_condition)
                plans.append((messages, weight) + self._plan(hf, bound, messages, getattr(c, "tools", None)))
            except UnsupportedConversation as e:
                plans.append(e)
        texts = [p[2] for p in plans if not isinstance(p, UnsupportedConversation)]
        encodings = iter(_rows(hf, texts) if texts else [])
        out = []
        for p in plans:
            if isinstance(p, UnsupportedConversation):
                out.append(p)
                continue
            messages, weight, whole, starts = p
            try:
                out.append(self._weigh(bound, messages, whole, starts, next(encodings), weight))
            except UnsupportedConversation as e:
                out.append(e)
        return out

    def encode(self, messages, tokenizer, condition=None, system=None, tools=None):
        """-> (tokens, weights): the ids of `apply_chat_template(messages, tools=tools, tokenize=True)`, weights
        > 0 on each assistant message's rendered span and the end-of-turn token closing it."""
        result = self.encode_many([_Conversation(messages, condition, system, tools)], tokenizer)[0]
        if isinstance(result, UnsupportedConversation):
            raise result
        return result.tokens, result.weights

    def encode_prompt(self, messages, tokenizer, condition=None, system=None, tools=None):
        """-> the ids of `apply_chat_template(messages, tools=tools, add_generation_prompt=True)`."""
        bound = self._bind(tokenizer)
        messages = self._messages(messages, system)
        self._check_tools(bound, messages, tools)
        text = self._render_safely(tokenizer.hf, bound.source, messages, tools, True)
        return tokenizer.hf(text, add_special_tokens=False)["input_ids"]

    def serving_chat_template(self, tokenizer, serving=None) -> str:
        """The template a checkpoint is served with: the one it was trained with."""
        return self._bind(tokenizer).source


def _rows(hf, texts):
    """Per text: {"input_ids", "offset_mapping"} from one batched call."""
    enc = hf(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    return [{"input_ids": ids, "offset_mapping": off} for ids, off in zip(enc["input_ids"], enc["offset_mapping"])]


@dataclass
class _Conversation:
    """A conversation as `encode_many` takes it (messages, condition, system, tools)."""

    messages: list
    condition: str | None = None
    system: str | None = None
    tools: list | None = None
