"""Normalisation rules and file reading errors (ochat.data.formats)."""
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


def test_read_json_and_jsonl(tmp_path):
    recs = [sg(("human", "q"), ("gpt", "a")), {"messages": []}]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert F.read_records(tmp_path / "a.json") == recs == F.read_records(tmp_path / "a.jsonl")


def test_invalid_json_messages(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"messages": []}\n{"messages": [}\n')
    with pytest.raises(F.InputError, match=r"bad.jsonl: invalid JSON on line 2"):
        F.read_records(p)
    p = tmp_path / "bad.json"
    p.write_text('[{"messages": []},\n {"messages": ]')
    with pytest.raises(F.InputError, match=r"bad.json: invalid JSON at byte offset 33 \(line 2"):
        F.read_records(p)


def test_non_utf8(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"messages": []}\n{"x": "caf\xe9"}\n')
    with pytest.raises(F.InputError, match=r"latin.jsonl: not UTF-8 at byte offset 27 \(line 2\)"):
        F.read_records(p)


def test_missing_file(tmp_path):
    with pytest.raises(F.InputError, match="cannot read"):
        F.read_records(tmp_path / "nope.json")
