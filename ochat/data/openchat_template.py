"""OpenChat's conversation templates, token for token as OpenChat's `ConversationTemplate` makes them.

A conversation is a list of segments: special tokens (BOS, end-of-turn, Llama 3 headers) and text
pieces. Each text piece is tokenized on its own, never parsing special-token text (SentencePiece
puts its word-start marker at the start of each piece), so role prefixes, contents and the system
prompt are separate pieces:

    openchat_v3.2 / openchat_3.5:
        <s> [system <|end_of_turn|>] ("{C} User:" content <|end_of_turn|> | "{C} Assistant:" content <|end_of_turn|>)*
    openchat_v3.1_llama2:
        <s> "Assistant is {C}" <|end_of_turn|> [system <|end_of_turn|>] ("User:" ... | "Assistant:" ...)*
    openchat_3.6 (Llama 3):
        <|begin_of_text|> [<|start_header_id|> "System" <|end_header_id|> "\\n\\n" system <|eot_id|>]
        (<|start_header_id|> "{C} User" <|end_header_id|> "\\n\\n" content <|eot_id|> | ... "{C} Assistant" ...)*

Weights: assistant content and its end-of-turn get the condition's weight (C-RLFT); everything else 0.
`encode_prompt` ends with the assistant prefix. Tools are not part of these templates.

Special-token text typed in a content or system prompt (`<s>`, `<|end_of_turn|>`): `special_tokens_in_content`
"text" (OpenChat's rule, the default) tokenizes it as plain text; "tokens" makes it the special token, as a
serving tokenizer that reads the rendered conversation as one string does (transformers, vLLM, llama.cpp).
"""
from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ochat.data.encoded import TOOLS_UNSUPPORTED, Encoded, UnsupportedConversation, condition_weight, uses_tools

SPECIAL = "special"  # a token given by its text (looked up in the vocabulary, never tokenized)
TEXT = "text"        # a piece of text, tokenized on its own without parsing special-token text

LLAMA3_HEADER = ("<|start_header_id|>", "<|end_header_id|>")

# how a text piece is joined to what precedes it in a serving chat template: name -> the Jinja expression
JOINERS = {
    "none": "message['content']",
    "space": "' ' + message['content']",
    "lead": "('' if message['content'].startswith(' ') else ' ') + message['content']",
}


def join(joiner: str, text: str) -> str:
    """`text` joined as JOINERS[joiner] does it (in Python)."""
    return text if joiner == "none" or (joiner == "lead" and text.startswith(" ")) else " " + text
ROLE_NAMES = {"user": "User", "assistant": "Assistant"}
SPECIAL_TOKENS_IN_CONTENT = ("text", "tokens")


@dataclass(frozen=True)
class _Serving:
    """How the serving tokenizer and chat template of a tokenizer treat text around special tokens."""

    tokenizer: Any  # the Hugging Face tokenizer ochat writes for serving
    after_special: str  # JOINERS key
    after_text: str
    space_tokens: list  # the tokens of a space between two special tokens


_SERVING_OF = weakref.WeakKeyDictionary()  # tokenizer -> _Serving (building one takes a second)
_SPECIALS_OF = weakref.WeakKeyDictionary()  # tokenizer -> the pattern of its special tokens' texts (or None)


@dataclass(frozen=True)
class OpenChatTemplate:
    """`kind`: "v3.2" (condition in each role prefix), "v3.1" (condition in a leading "Assistant is {C}"
    turn) or "v3.6" (v3.2's roles inside Llama 3 headers, the system prompt as a "System" turn)."""

    kind: str
    condition_weights: Mapping[str, float]
    default_condition: str
    bos_token: str = "<s>"
    eot_token: str = "<|end_of_turn|>"
    special_tokens_in_content: str = "text"  # or "tokens" (see the module's docstring)

    @property
    def add_eot(self) -> bool:
        """Whether the end-of-turn token is added to a vocabulary that lacks it (Llama 2 + OpenChat)."""
        return self.kind != "v3.6"

    @property
    def required_tokens(self) -> tuple[str, ...]:
        """Tokens the vocabulary must already have."""
        if self.kind == "v3.6":
            return (self.bos_token, self.eot_token) + LLAMA3_HEADER
        return (self.bos_token,)

    def prepare(self, tokenizer) -> None:
        """Fit `tokenizer` to this template: add the end-of-turn token where allowed and missing, set
        its bos/eot ids; a one-line ValueError when the vocabulary lacks a token the template needs."""
        missing = [t for t in self.required_tokens if tokenizer.token_id(t) is None]
        if missing:
            raise ValueError(f"{tokenizer.path}: the vocabulary lacks {', '.join(missing)}, which the "
                             f"OpenChat {self.kind} template needs")
        if tokenizer.token_id(self.eot_token) is None:
            if not self.add_eot:
                raise ValueError(f"{tokenizer.path}: the vocabulary lacks the end-of-turn token {self.eot_token}")
            tokenizer.add_special_token(self.eot_token)
        tokenizer.eot_token = self.eot_token
        tokenizer.eot_id = tokenizer.token_id(self.eot_token)
        tokenizer.bos_id = tokenizer.token_id(self.bos_token)

    # ------------------------------------------------------------------ segments

    def role_prefix(self, role: str, condition: str) -> list[tuple[str, str]]:
        name = ROLE_NAMES[role]
        if self.kind == "v3.6":
            return [(SPECIAL, LLAMA3_HEADER[0]), (TEXT, f"{condition} {name}"), (SPECIAL, LLAMA3_HEADER[1]), (TEXT, "\n\n")]
        return [(TEXT, f"{condition} {name}:" if self.kind == "v3.2" else f"{name}:")]

    def system_prefix(self) -> list[tuple[str, str]]:
        if self.kind == "v3.6":
            return [(SPECIAL, LLAMA3_HEADER[0]), (TEXT, "System"), (SPECIAL, LLAMA3_HEADER[1]), (TEXT, "\n\n")]
        return []

    def preamble(self, condition: str) -> list[tuple[str, str]]:
        if self.kind == "v3.1":
            return [(TEXT, f"Assistant is {condition}"), (SPECIAL, self.eot_token)]
        return []

    def segments(self, messages: Sequence[Mapping], condition: str | None = None, system: str | None = None,
                 prompt: bool = False, tools=None) -> list[tuple[str, str, float]]:
        """The conversation as (SPECIAL | TEXT, text, weight) segments.

        `messages`: OpenAI-style dicts with role "user"/"assistant" (a leading "system" message is the
        system prompt when `system` is None). With `prompt=True` the assistant prefix is appended."""
        condition = self.default_condition if condition is None else condition
        w = condition_weight(self.condition_weights, condition)
        messages = list(messages)
        if messages and messages[0].get("role") == "system":
            if system is None:
                system = messages[0]["content"]
            messages = messages[1:]
        if uses_tools(messages, tools):
            raise UnsupportedConversation(TOOLS_UNSUPPORTED, f"the OpenChat {self.kind} template has no tools")

        def zero(segs):
            return [(kind, text, 0.0) for kind, text in segs]

        segs = zero([(SPECIAL, self.bos_token)] + self.preamble(condition))
        if system:
            segs += zero(self.system_prefix() + [(TEXT, system), (SPECIAL, self.eot_token)])
        for m in messages:
            role = m["role"]
            if role not in ROLE_NAMES:
                raise ValueError(f"unknown role {role!r} (expected user or assistant)")
            mw = w if role == "assistant" else 0.0
            segs += zero(self.role_prefix(role, condition)) + [(TEXT, m["content"], mw), (SPECIAL, self.eot_token, mw)]
        if prompt:
            segs += zero(self.role_prefix("assistant", condition))
        return segs

    @staticmethod
    def assemble(segs, text_ids, tokenizer) -> tuple[list[int], list[float]]:
        """Join segments with the token ids of their TEXT parts (in order) -> (tokens, weights)."""
        tokens: list[int] = []
        weights: list[float] = []
        it = iter(text_ids)
        for kind, text, w in segs:
            ids = [tokenizer.token_id(text)] if kind == SPECIAL else next(it)
            tokens.extend(ids)
            weights.extend([w] * len(ids))
        return tokens, weights

    def split_special_tokens(self, segs, tokenizer) -> list[tuple[str, str, float]]:
        """`segs` as a serving tokenizer reading the rendered conversation as one string tokenizes them, in
        "tokens" mode (unchanged in "text" mode): special-token text inside a TEXT piece becomes its token
        (same weight), the text after it the tokens serving gives it there (SPECIAL segments too: tokens given
        by their text), and a piece that starts with one ends the segment before it with the joining space
        serving's chat template puts there (JOINERS)."""
        if self.special_tokens_in_content == "text":
            return segs
        if tokenizer not in _SPECIALS_OF:
            specials = sorted(tokenizer.special_tokens(), key=len, reverse=True)
            _SPECIALS_OF[tokenizer] = re.compile("|".join(map(re.escape, specials))) if specials else None
        pattern = _SPECIALS_OF[tokenizer]
        if pattern is None:
            return segs
        out = []
        for kind, text, w in segs:
            pos, after = 0, None
            for m in pattern.finditer(text) if kind == TEXT else ():
                if m.start() > pos:
                    out += self._text(text[pos:m.start()], after, w, tokenizer)
                elif m.start() == 0 and out:
                    out += self._joining_space(out.pop(), tokenizer)
                out.append((SPECIAL, m.group(), w))
                pos, after = m.end(), m.group()
            if pos == 0 or pos < len(text):
                out += self._text(text[pos:], after, w, tokenizer) if after else [(kind, text[pos:], w)]
        return out

    def _serving(self, tokenizer) -> _Serving:
        if tokenizer not in _SERVING_OF:
            serving = tokenizer.serving_tokenizer()
            between = serving(self.eot_token + " " + self.eot_token, add_special_tokens=False)["input_ids"][1:-1]
            _SERVING_OF[tokenizer] = _Serving(serving, *self._joiners(tokenizer, serving),
                                              serving.convert_ids_to_tokens(between))
        return _SERVING_OF[tokenizer]

    def _text(self, text: str, after: str | None, w: float, tokenizer) -> list[tuple[str, str, float]]:
        """A piece of a content: tokenized alone (TEXT), or after a typed special token `after` as serving does."""
        if after is None:
            return [(TEXT, text, w)]
        s = self._serving(tokenizer).tokenizer
        ids = s(after + text, add_special_tokens=False)["input_ids"][1:]
        return [(SPECIAL, t, w) for t in s.convert_ids_to_tokens(ids)]

    def _joining_space(self, before: tuple[str, str, float], tokenizer) -> list[tuple[str, str, float]]:
        """`before` with the space serving's template joins the next piece with: added to a TEXT `before`;
        after a SPECIAL one, the tokens serving gives a space between two special tokens."""
        s = self._serving(tokenizer)
        kind, text, w = before
        if kind == TEXT:
            return [(TEXT, text + " ", w)] if s.after_text != "none" else [before]
        return [before] + ([(SPECIAL, t, 0.0) for t in s.space_tokens] if s.after_special != "none" else [])

    def _encode(self, segs, tokenizer):
        segs = self.split_special_tokens(segs, tokenizer)
        ids = tokenizer.encode_batch([t for k, t, _ in segs if k == TEXT])
        return self.assemble(segs, ids, tokenizer)

    def encode(self, messages, tokenizer, condition=None, system=None, tools=None):
        """-> (tokens, weights) for training; weight of token i as a target."""
        return self._encode(self.segments(messages, condition, system, tools=tools), tokenizer)

    def encode_prompt(self, messages, tokenizer, condition=None, system=None, tools=None):
        """-> tokens for generation, ending with the assistant prefix."""
        return self._encode(self.segments(messages, condition, system, prompt=True, tools=tools), tokenizer)[0]

    def encode_many(self, conversations: Sequence[Any], tokenizer) -> list[Encoded | UnsupportedConversation]:
        """Encode many conversations (objects with .messages, .condition, .system, .tools, as
        `ochat.data.formats` makes them) in one batched tokenizer call; a conversation that cannot be
        rendered comes back as its UnsupportedConversation instead of raising."""
        segs_all = []
        for c in conversations:
            try:
                segs_all.append(self.split_special_tokens(
                    self.segments(c.messages, c.condition, c.system, tools=getattr(c, "tools", None)), tokenizer))
            except UnsupportedConversation as e:
                segs_all.append(e)
        ids = tokenizer.encode_batch([t for segs in segs_all if isinstance(segs, list) for k, t, _ in segs if k == TEXT])
        out, pos = [], 0
        for segs in segs_all:
            if isinstance(segs, UnsupportedConversation):
                out.append(segs)
                continue
            n = sum(1 for k, _, _ in segs if k == TEXT)
            out.append(Encoded(*self.assemble(segs, ids[pos:pos + n], tokenizer)))
            pos += n
        return out

    # ------------------------------------------------------------------ serving

    def serving_chat_template(self, tokenizer, serving) -> str:
        """A Hugging Face chat template (Jinja) whose rendering, tokenized as one string by `serving` (the
        tokenizer written for serving), gives the ids of `encode` / `encode_prompt` with the default condition."""
        after_special, after_text = self._joiners(tokenizer, serving)
        return self._jinja(after_special, after_text)

    def _joiners(self, tokenizer, serving) -> tuple[str, str]:
        """How a text piece that follows a special token / another text piece must be joined (JOINERS) so that
        the serving tokenizer, which sees one string, tokenizes it as `tokenizer` does alone: "none" for
        byte-level BPE; "space" between pieces for SentencePiece-style tokenizers (each piece has its own
        word-start marker), and after a special token "none" or "space" depending on whether the tokenizer
        puts a marker there itself; "lead" for `Metaspace` tokenizers, which add no marker to a piece that
        starts with a space."""
        pieces = ["Hello", "GPT4 Correct User", "a  b", " x"]
        # the text pieces that content follows (role prefixes ending in text: "GPT4 User:", "\n\n")
        lefts = {p[-1][1] for p in (self.role_prefix(r, self.default_condition) for r in ROLE_NAMES)
                 if p[-1][0] == TEXT} or {"User:"}

        def alone(text):
            return tokenizer.encode_batch([text])[0]

        def served(text):
            return serving(text, add_special_tokens=False)["input_ids"]

        after_special = [j for j in JOINERS if all(
            served(self.eot_token + join(j, p)) == [tokenizer.eot_id] + alone(p) for p in pieces)]
        after_text = [j for j in JOINERS if all(
            served(left + join(j, p)) == alone(left) + alone(p) for left in lefts for p in pieces)]
        if not after_special or not after_text:
            raise ValueError(f"{tokenizer.path}: no chat template can reproduce the OpenChat {self.kind} ids with "
                             "this tokenizer (it tokenizes text after special tokens or between pieces differently)")
        return after_special[0], after_text[0]

    def _jinja(self, after_special: str, after_text: str) -> str:
        condition = self.default_condition

        def literal(segs, prev=SPECIAL):
            """-> (the segments as one string, kind of the last non-empty segment)"""
            out = ""
            for kind, text in segs:
                if kind == SPECIAL:
                    out += text
                elif text:
                    out += join(after_text if prev == TEXT else after_special, text)
                prev = kind if kind == SPECIAL or text else prev
            return out, prev

        def emit(text):
            return f"{{{{- {json.dumps(text)} }}}}" if text else ""

        def turn(prefix):
            """prefix, the message's content (when not empty) joined to it, end-of-turn"""
            head, last = literal(prefix)
            content = JOINERS[after_text if last == TEXT else after_special]
            return (emit(head) + f"{{%- if message['content'] %}}{{{{- {content} }}}}{{%- endif %}}"
                    + emit(self.eot_token))

        start, _ = literal([(SPECIAL, self.bos_token)] + self.preamble(condition))
        user = turn(self.role_prefix("user", condition))
        assistant = turn(self.role_prefix("assistant", condition))
        system = turn(self.system_prefix())
        generation, _ = literal(self.role_prefix("assistant", condition))
        return (
            emit(start) +
            "{%- for message in messages %}"
            "{%- if message['role'] == 'system' %}"
            "{%- if not loop.first %}{{- raise_exception('a system message must come first') }}{%- endif %}"
            f"{{%- if message['content'] %}}{system}{{%- endif %}}"
            f"{{%- elif message['role'] == 'user' %}}{user}"
            f"{{%- elif message['role'] == 'assistant' %}}{assistant}"
            "{%- else %}{{- raise_exception('only system, user and assistant messages are supported') }}"
            "{%- endif %}"
            "{%- endfor %}"
            f"{{%- if add_generation_prompt %}}{emit(generation)}{{%- endif %}}"
        )
