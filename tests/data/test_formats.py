"""Normalisation rules (ochat.data.formats): roles, content parts, tools, consecutive turns, conditions."""
import json

import pytest

from ochat.config import get_model_type
from ochat.data import formats as F

MT = get_model_type("openchat_v3.2")
W = dict(MT.condition_weights)


def norm(rec):
    return F.normalize(rec, MT, W, "GPT4")


def sg(*turns, **kw):
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **kw}


def test_sharegpt_and_openai_and_items():
    a = norm(sg(("human", "q"), ("gpt", "a")))
    b = norm({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    c = norm({"items": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]})
    for x in (a, b, c):
        assert x.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        assert x.condition == "GPT4" and x.system is None


def test_leading_assistant_dropped_and_merge_and_trailing_user():
    c = norm(sg(("gpt", "hello"), ("human", "a"), ("human", "b"), ("gpt", "c"), ("gpt", "d"), ("human", "e")))
    assert c.messages == [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c\n\nd"}]


def test_no_assistant_skipped():
    assert norm(sg(("human", "a"))) == F.NO_ASSISTANT
    assert norm(sg(("gpt", "only"))) == F.NO_ASSISTANT
    assert norm(sg()) == F.NO_ASSISTANT


def test_system_prompts():
    c = norm({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a"}]})
    assert c.system == "S"
    assert norm(sg(("human", "q"), ("system", "S"), ("gpt", "a"))) == F.MISPLACED_SYSTEM
    assert norm(sg(("human", "q"), ("gpt", "a"), system="T")).system == "T"


def test_conditions():
    assert norm(sg(("human", "q"), ("gpt", "a"), model="gpt-4-0613")).condition == "GPT4"
    assert norm(sg(("human", "q"), ("gpt", "a"), model="GPT 4")).condition == "GPT4"
    assert norm(sg(("human", "q"), ("gpt", "a"), model="gpt-3.5-turbo")).condition == "GPT3"
    assert norm(sg(("human", "q"), ("gpt", "a"), condition="GPT3", model="gpt-4")).condition == "GPT3"
    assert norm(sg(("human", "q"), ("gpt", "a"), condition="GPT5")) == F.UNKNOWN_CONDITION
    assert F.normalize(sg(("human", "q"), ("gpt", "a")), MT, W, "GPT3").condition == "GPT3"


def test_bad_records():
    assert norm([1, 2]) == F.NOT_AN_OBJECT
    assert norm({"text": "x"}) == F.NO_CONVERSATION
    assert norm({"conversations": "x"}) == F.NO_CONVERSATION
    assert norm(sg(("robot", "q"), ("gpt", "a"))) == F.UNKNOWN_ROLE
    assert norm({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}) == F.NON_STRING_CONTENT
    assert norm({"conversations": ["q", "a"]}) == F.BAD_MESSAGE


def msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def test_changes_are_recorded():
    c = norm(sg(("gpt", "hello"), ("human", "a"), ("human", "b"), ("gpt", "c"), ("human", "e")))
    assert c.changes == (F.DROPPED_LEADING, F.DROPPED_TRAILING, F.MERGED)
    assert norm(sg(("human", "q"), ("gpt", "a"))).changes == ()


def test_merge_skips_empty_contents():
    c = norm(sg(("human", ""), ("human", "b"), ("gpt", "a")))
    assert c.messages[0]["content"] == "b"


def test_content_parts():
    rec = {"messages": [{"role": "system", "content": [{"type": "text", "text": "S1"}, {"type": "text", "text": "S2"}]},
                        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "text", "text": "here"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]}
    c = norm(rec)
    assert c.system == "S1\nS2" and c.messages == [{"role": "user", "content": "look\nhere"},
                                                   {"role": "assistant", "content": "ok"}]
    image = {"type": "image_url", "image_url": {"url": "data:..."}}
    assert norm({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}, image]},
                              {"role": "assistant", "content": "a"}]}) == F.NON_TEXT_CONTENT
    assert norm({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]},
                              {"role": "assistant", "content": "a"}]}) == F.NON_STRING_CONTENT
    assert norm({"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]}) == F.NON_STRING_CONTENT


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_tool_calls_and_results_kept():
    rec = {"tools": TOOLS, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "windy"}]},
        {"role": "assistant", "content": "18C and windy"}]}
    c = norm(rec)
    assert c.tools == TOOLS and c.changes == ()
    assert c.messages == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "18C", "tool_call_id": "call_1", "name": "get_weather"},
        {"role": "tool", "content": "windy", "tool_call_id": "call_2"},
        {"role": "assistant", "content": "18C and windy"}]


def test_legacy_function_calling():
    rec = {"functions": [{"name": "f", "parameters": {}}], "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": {"x": "é"}}},
        {"role": "function", "name": "f", "content": "42"},
        {"role": "assistant", "content": "it is 42"}]}
    c = norm(rec)
    assert c.tools == [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert c.messages[1] == {"role": "assistant", "content": "",
                             "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"x": "é"}'}}]}
    assert c.messages[2] == {"role": "tool", "content": "42", "name": "f"}
    # a legacy function message names its function
    rec["messages"][2] = {"role": "function", "content": "42"}
    assert norm(rec) == F.BAD_MESSAGE


def test_tools_as_json_string_and_bad_tools():
    base = msgs(("user", "q"), ("assistant", "a"))
    assert norm({**base, "tools": json.dumps(TOOLS)}).tools == TOOLS
    assert norm({**base, "tools": []}).tools is None
    assert norm({**base, "tools": "not json"}) == F.BAD_TOOLS
    assert norm({**base, "tools": [{"name": "f"}]}) == F.BAD_TOOLS
    assert norm({**base, "tools": TOOLS, "functions": [{"name": "f"}]}) == F.BAD_TOOLS


@pytest.mark.parametrize("call", [
    {"type": "function", "function": {"name": "f"}},                         # no arguments
    {"type": "function", "function": {"name": 3, "arguments": "{}"}},
    {"type": "retrieval", "function": {"name": "f", "arguments": "{}"}},
    {"id": 5, "type": "function", "function": {"name": "f", "arguments": "{}"}},
    "f()",
])
def test_bad_tool_calls(call):
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]}
    assert norm(rec) == F.BAD_TOOL_CALL


def test_consecutive_turn_rules_with_tools():
    call = {"role": "assistant", "content": "", "tool_calls": [CALL]}
    result = {"role": "tool", "content": "r"}
    user, answer = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    # tool results never merge into user turns, nor into each other
    c = norm({"messages": [user, call, result, result, answer]})
    assert [m["role"] for m in c.messages] == ["user", "assistant", "tool", "tool", "assistant"]
    # a tool result must answer a tool call
    assert norm({"messages": [user, result, answer]}) == F.MISPLACED_TOOL
    assert norm({"messages": [user, answer, result, answer]}) == F.MISPLACED_TOOL
    # a tool call must be answered before the conversation goes on
    assert norm({"messages": [user, call, answer]}) == F.UNANSWERED_TOOL_CALL
    assert norm({"messages": [user, call, user, answer]}) == F.UNANSWERED_TOOL_CALL
    # text then a call, as two assistant messages: merged (the call stays last)
    c = norm({"messages": [user, {"role": "assistant", "content": "let me look"}, call, result, answer]})
    assert c.messages[1] == {"role": "assistant", "content": "let me look", "tool_calls": [CALL]}
    assert c.changes == (F.MERGED,)
    # a conversation may end with a call (the call is the target); results after it carry no target
    c = norm({"messages": [user, call, result]})
    assert c.messages == [user, call] and c.changes == (F.DROPPED_TRAILING,)
    # turns before the first user turn are dropped, tool results included
    c = norm({"messages": [call, result, user, answer]})
    assert c.messages == [user, answer] and c.changes == (F.DROPPED_LEADING,)


def test_null_fields_count_as_absent():
    # Parquet / Hugging Face datasets store a missing struct field as null
    rec = {"messages": [{"role": "user", "content": "q", "tool_calls": None, "name": None, "from": None, "value": None},
                        {"role": "assistant", "content": "a", "tool_calls": None, "function_call": None}],
           "conversations": None, "condition": None, "model": None, "system": None, "tools": None}
    c = norm(rec)
    assert c.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert c.condition == "GPT4" and c.system is None and c.tools is None


def test_condition_precedence():
    rec = sg(("human", "q"), ("gpt", "a"))
    file_cond = lambda r, fc: F.normalize(r, MT, W, "GPT4", fc).condition
    assert file_cond(dict(rec, condition="GPT4", model="gpt-3.5"), "GPT3") == "GPT4"   # record condition first
    assert file_cond(dict(rec, model="gpt-4"), "GPT3") == "GPT3"                      # then the file's
    assert file_cond(dict(rec, model="gpt-4"), None) == "GPT4"                        # then the model field
    assert F.normalize(rec, MT, W, "GPT3", None).condition == "GPT3"                  # then the default
    assert F.normalize(rec, MT, W, "GPT4", "GPT9") == F.UNKNOWN_CONDITION


def test_developer_role_is_system():
    c = norm(msgs(("developer", "D"), ("user", "q"), ("assistant", "a")))
    assert c.system == "D"


def test_lone_surrogates_are_skipped():
    # valid JSON ("\ud800" escape) but no text: tokenizers cannot encode it
    rec = json.loads('{"conversations": [{"from": "human", "value": "a\\ud800b"}, {"from": "gpt", "value": "ok"}]}')
    assert norm(rec) == F.INVALID_UNICODE
    assert norm({**msgs(("user", "q"), ("assistant", "a")), "system": "\udfff"}) == F.INVALID_UNICODE
    assert norm(msgs(("user", "😀 é"), ("assistant", "a"))).messages[0]["content"] == "😀 é"


def test_deeply_nested_record_is_no_recursion_error():
    params = leaf = {}
    for _ in range(5000):  # deeper than Python recurses; built without recursion
        leaf["a"] = {}
        leaf = leaf["a"]
    tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    c = norm({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": tools})
    assert c.tools == tools
    leaf["s"] = "\ud800"
    assert norm({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                 "tools": tools}) == F.INVALID_UNICODE


def test_alpaca_records():
    c = norm({"instruction": "Translate", "input": "chat", "output": "cat", "system": "S"})
    assert c.messages == [{"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"}]
    assert c.system == "S" and c.condition == "GPT4"
    for empty in ({"input": ""}, {"input": None}, {}):
        c = norm({"instruction": "Say hi", "output": "hi", **empty})
        assert c.messages == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
        assert c.system is None
    assert norm({"instruction": "Say hi", "output": "hi", "condition": "GPT3"}).condition == "GPT3"
    assert norm({"instruction": "Say hi", "output": 3}) == F.NON_STRING_CONTENT
    assert norm({"instruction": "Say hi", "input": ["x"], "output": "hi"}) == F.NON_STRING_CONTENT
    assert norm({"instruction": "Say hi"}) == F.NO_CONVERSATION
