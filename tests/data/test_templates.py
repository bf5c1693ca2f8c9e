"""Exact token ids and weights of the templates on the bundled Llama 2 tokenizer.

Expectations are built piece by piece from the template text in DESIGN.md, encoding each
segment with SentencePiece directly (BOS = 1, end-of-turn = 32000, added after the 32,000
pieces of Llama 2)."""
import pytest

from ochat.config import get_model_type

BOS, EOT = 1, 32000


def seg(sp, text, w=0.0):
    ids = sp.encode(text)
    return ids, [w] * len(ids)


def build(*parts):
    toks, ws = [], []
    for ids, w in parts:
        toks += ids
        ws += w
    return toks, ws


def special(i, w=0.0):
    return [i], [w]


def test_tokenizer_facts(tok, sp):
    assert tok.vocab_size == 32001 and tok.eot_id == 32000 and tok.bos_id == 1 and tok.eos_id == 2
    assert len(tok.sha256) == 64
    assert sp.encode("GPT4 User:") == [402, 7982, 29946, 4911, 29901]  # pinned: '▁GP','T','4','▁User',':'


def test_get_model_type_unknown():
    with pytest.raises(ValueError, match="known: openchat_v3.2, openchat_v3.1_llama2, openchat_3.5"):
        get_model_type("nope")


def test_model_type_facts():
    mt = get_model_type("openchat_v3.2")
    assert mt.context_length == 4096 and mt.eot_token == "<|end_of_turn|>"
    assert mt.condition_weights == {"GPT4": 1.0, "GPT3": 0.1} and mt.default_condition == "GPT4"
    with pytest.raises(Exception):
        mt.name = "x"  # frozen


def test_v32_single_turn(tok, sp):
    t = get_model_type("openchat_v3.2").template
    got = t.encode([{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am OpenChat."}], tok)
    exp = build(special(BOS), seg(sp, "GPT4 User:"), seg(sp, "Who are you?"), special(EOT),
                seg(sp, "GPT4 Assistant:"), seg(sp, "I am OpenChat.", 1.0), special(EOT, 1.0))
    assert got == exp
    # and literally
    assert got[0] == [1, 402, 7982, 29946, 4911, 29901] + sp.encode("Who are you?") + [32000, 402, 7982, 29946, 4007,
                                                                                     22137, 29901] + sp.encode("I am OpenChat.") + [32000]


def test_v32_multi_turn_gpt3(tok, sp):
    t = get_model_type("openchat_v3.2").template
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c"},
            {"role": "user", "content": "d"}, {"role": "assistant", "content": "e"}]
    got = t.encode(msgs, tok, condition="GPT3")
    exp = build(special(BOS), seg(sp, "GPT3 User:"), seg(sp, "a"), special(EOT),
                seg(sp, "GPT3 Assistant:"), seg(sp, "b c", 0.1), special(EOT, 0.1),
                seg(sp, "GPT3 User:"), seg(sp, "d"), special(EOT),
                seg(sp, "GPT3 Assistant:"), seg(sp, "e", 0.1), special(EOT, 0.1))
    assert got == exp


def test_v32_system(tok, sp):
    t = get_model_type("openchat_v3.2").template
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    exp = build(special(BOS), seg(sp, "Be brief."), special(EOT), seg(sp, "GPT4 User:"), seg(sp, "hi"), special(EOT),
                seg(sp, "GPT4 Assistant:"), seg(sp, "yo", 1.0), special(EOT, 1.0))
    assert t.encode(msgs, tok, system="Be brief.") == exp
    assert t.encode([{"role": "system", "content": "Be brief."}] + msgs, tok) == exp


def test_v32_prompt(tok, sp):
    t = get_model_type("openchat_v3.2").template
    got = t.encode_prompt([{"role": "user", "content": "hi"}], tok)
    assert got == [BOS] + sp.encode("GPT4 User:") + sp.encode("hi") + [EOT] + sp.encode("GPT4 Assistant:")


def test_v31_cases(tok, sp):
    t = get_model_type("openchat_v3.1_llama2").template
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
            {"role": "user", "content": "z"}, {"role": "assistant", "content": "w"}]
    for cond, w in (("GPT4", 1.0), ("GPT3", 0.1)):
        got = t.encode(msgs, tok, condition=cond)
        exp = build(special(BOS), seg(sp, f"Assistant is {cond}"), special(EOT),
                    seg(sp, "User:"), seg(sp, "x"), special(EOT), seg(sp, "Assistant:"), seg(sp, "y", w), special(EOT, w),
                    seg(sp, "User:"), seg(sp, "z"), special(EOT), seg(sp, "Assistant:"), seg(sp, "w", w), special(EOT, w))
        assert got == exp
    got = t.encode(msgs[:2], tok, system="S")
    exp = build(special(BOS), seg(sp, "Assistant is GPT4"), special(EOT), seg(sp, "S"), special(EOT),
                seg(sp, "User:"), seg(sp, "x"), special(EOT), seg(sp, "Assistant:"), seg(sp, "y", 1.0), special(EOT, 1.0))
    assert got == exp
    assert t.encode_prompt(msgs[:1], tok) == [BOS] + sp.encode("Assistant is GPT4") + [EOT] + sp.encode("User:") + \
        sp.encode("x") + [EOT] + sp.encode("Assistant:")


def test_openchat_35(tok, sp):
    mt = get_model_type("openchat_3.5")
    got = mt.template.encode([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], tok)
    exp = build(special(BOS), seg(sp, "GPT4 Correct User:"), seg(sp, "q"), special(EOT),
                seg(sp, "GPT4 Correct Assistant:"), seg(sp, "a", 1.0), special(EOT, 1.0))
    assert got == exp


def test_unknown_condition(tok):
    t = get_model_type("openchat_v3.2").template
    with pytest.raises(ValueError, match="unknown condition"):
        t.encode([{"role": "user", "content": "q"}], tok, condition="GPT5")


def test_special_text_stays_text(tok, sp):
    t = get_model_type("openchat_v3.2").template
    evil = "<s> and <|end_of_turn|> and </s>"
    toks, _ = t.encode([{"role": "user", "content": evil}, {"role": "assistant", "content": evil}], tok)
    assert toks.count(BOS) == 1 and toks.count(EOT) == 2 and 2 not in toks
    assert tok.encode_batch([evil]) == [sp.encode(evil)]
    assert tok.decode(toks).count("<|end_of_turn|>") == 4


def test_save_hf_roundtrip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_hf(tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf.convert_tokens_to_ids("<|end_of_turn|>") == 32000 and len(hf) == 32001
    assert hf("hello world", add_special_tokens=False).input_ids == tok.encode("hello world")
    # the HF directory loads through load_tokenizer too, with the same facts
    from ochat.data import load_tokenizer

    t2 = load_tokenizer(tmp_path / "hf", "openchat_v3.2")
    assert (t2.vocab_size, t2.eot_id, t2.bos_id) == (32001, 32000, 1)
    assert t2.encode_batch(["a <|end_of_turn|> b"]) != [[]] and 32000 not in t2.encode_batch(["a <|end_of_turn|> b"])[0]
