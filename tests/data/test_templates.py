"""Exact token ids and weights of OpenChat's templates.

On the bundled Llama 2 tokenizer, expectations are built piece by piece from the template text,
encoding each segment with SentencePiece directly (BOS = 1, end-of-turn = 32000, added after the
32,000 pieces of Llama 2). openchat_3.6 is pinned to the ids OpenChat's own test publishes for
Meta's Llama 3 tokenizer (imoneoi/openchat, ochat/tests/test_model_config.py)."""
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
    with pytest.raises(ValueError, match="known: openchat_v3.2, openchat_v3.1_llama2, openchat_3.5, openchat_3.6, chat_template"):
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


def test_serving_folder_roundtrip(tok, tmp_path):
    from transformers import AutoTokenizer

    from ochat.data import save_serving_tokenizer

    save_serving_tokenizer(tok, get_model_type("openchat_v3.2"), tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf.convert_tokens_to_ids("<|end_of_turn|>") == 32000 and len(hf) == 32001
    assert hf("hello world", add_special_tokens=False).input_ids == tok.encode("hello world")
    # the HF directory loads through load_tokenizer too, with the same facts
    from ochat.data import load_tokenizer

    t2 = load_tokenizer(tmp_path / "hf", "openchat_v3.2")
    assert (t2.vocab_size, t2.eot_id, t2.bos_id) == (32001, 32000, 1)
    assert t2.encode_batch(["a <|end_of_turn|> b"]) != [[]] and 32000 not in t2.encode_batch(["a <|end_of_turn|> b"])[0]


# OpenChat's test conversations and its expected openchat_3.6 ids (Meta-Llama-3-8B tokenizer)
OPENCHAT_CONVERSATIONS = [
    ("GPT4", None, ["What's the weather like?", "I'm an AI and don't have access to real-time data.",
                    "Oh, right. How can I know?", "You can check a weather website or app for the most current information."]),
    ("GPT3", None, ["What is AI?", "AI stands for Artificial Intelligence. It refers to the simulation of human "
                    "intelligence processes by machines.", "Can you learn?", "I can't learn or remember information "
                    "like humans. I generate responses based on pre-existing data."]),
    ("GPT3", "You are a helpful assistant.", ["Can you recommend a book?", "Sure. 'Sapiens: A Brief History of "
                                              "Humankind' by Yuval Noah Harari is a great read.", "What's it about?",
                                              "It's about the history of the human species from the evolution of Homo "
                                              "Sapiens in Africa up to the present day."]),
    ("GPT4", "<s>You are a helpful assistant.", ["What do <s> </s> <|end_of_turn|> mean?",
                                                 "<s> </s> <|end_of_turn|> are special tokens."]),
]
OPENCHAT_36_IDS = [
    [128000, 128006, 38, 2898, 19, 2724, 128007, 271, 3923, 596, 279, 9282, 1093, 30, 128009, 128006, 38, 2898, 19, 22103, 128007, 271, 40, 2846, 459, 15592, 323, 1541, 956, 617, 2680, 311, 1972, 7394, 828, 13, 128009, 128006, 38, 2898, 19, 2724, 128007, 271, 12174, 11, 1314, 13, 2650, 649, 358, 1440, 30, 128009, 128006, 38, 2898, 19, 22103, 128007, 271, 2675, 649, 1817, 264, 9282, 3997, 477, 917, 369, 279, 1455, 1510, 2038, 13, 128009],  # noqa: E501
    [128000, 128006, 38, 2898, 18, 2724, 128007, 271, 3923, 374, 15592, 30, 128009, 128006, 38, 2898, 18, 22103, 128007, 271, 15836, 13656, 369, 59294, 22107, 13, 1102, 19813, 311, 279, 19576, 315, 3823, 11478, 11618, 555, 12933, 13, 128009, 128006, 38, 2898, 18, 2724, 128007, 271, 6854, 499, 4048, 30, 128009, 128006, 38, 2898, 18, 22103, 128007, 271, 40, 649, 956, 4048, 477, 6227, 2038, 1093, 12966, 13, 358, 7068, 14847, 3196, 389, 864, 50457, 828, 13, 128009],  # noqa: E501
    [128000, 128006, 2374, 128007, 271, 2675, 527, 264, 11190, 18328, 13, 128009, 128006, 38, 2898, 18, 2724, 128007, 271, 6854, 499, 7079, 264, 2363, 30, 128009, 128006, 38, 2898, 18, 22103, 128007, 271, 40914, 13, 364, 50, 2113, 729, 25, 362, 37618, 11346, 315, 20449, 70370, 6, 555, 28372, 838, 43084, 5340, 2850, 374, 264, 2294, 1373, 13, 128009, 128006, 38, 2898, 18, 2724, 128007, 271, 3923, 596, 433, 922, 30, 128009, 128006, 38, 2898, 18, 22103, 128007, 271, 2181, 596, 922, 279, 3925, 315, 279, 3823, 9606, 505, 279, 15740, 315, 84497, 328, 2113, 729, 304, 10384, 709, 311, 279, 3118, 1938, 13, 128009],  # noqa: E501
    [128000, 128006, 2374, 128007, 271, 45147, 55621, 527, 264, 11190, 18328, 13, 128009, 128006, 38, 2898, 19, 2724, 128007, 271, 3923, 656, 366, 82, 29, 694, 82, 29, 83739, 408, 3659, 38374, 91, 29, 3152, 30, 128009, 128006, 38, 2898, 19, 22103, 128007, 271, 45147, 29, 694, 82, 29, 83739, 408, 3659, 38374, 91, 29, 527, 3361, 11460, 13, 128009],  # noqa: E501
]


@pytest.fixture(scope="module")
def llama3_tok(llama3_dir):
    from ochat.data import load_tokenizer

    return load_tokenizer(llama3_dir, "openchat_3.6")


def test_openchat_36_equals_openchat(llama3_tok):
    from ochat.data.chat_formats import with_condition_weights

    mt = get_model_type("openchat_3.6")
    assert (mt.context_length, mt.eot_token, mt.default_condition) == (8192, "<|eot_id|>", "GPT4 Correct")
    assert (llama3_tok.bos_id, llama3_tok.eot_id, llama3_tok.vocab_size) == (128000, 128009, 128256)
    t = with_condition_weights(mt, {"GPT4": 1.0, "GPT3": 0.1}, "GPT4").template
    for (cond, system, texts), ids in zip(OPENCHAT_CONVERSATIONS, OPENCHAT_36_IDS):
        msgs = [{"role": ("user", "assistant")[i % 2], "content": x} for i, x in enumerate(texts)]
        tokens, weights = t.encode(msgs, llama3_tok, condition=cond, system=system)
        assert tokens == ids
        # targets: each assistant content and the <|eot_id|> after it, at the condition's weight
        w = {"GPT4": 1.0, "GPT3": 0.1}[cond]
        starts = [i + 2 for i, x in enumerate(tokens) if x == 128007 and tokens[i - 1] == 22103]  # after "...Assistant" header, "\n\n"
        expect = [0.0] * len(tokens)
        for s in starts:
            end = tokens.index(128009, s)
            expect[s:end + 1] = [w] * (end + 1 - s)
        assert weights == expect


def test_openchat_36_prompt_and_refusals(llama3_tok, tok):
    mt = get_model_type("openchat_3.6")
    prompt = mt.template.encode_prompt([{"role": "user", "content": "Hi"}], llama3_tok)
    # <|begin_of_text|> header("GPT4 Correct User") "Hi" <|eot_id|> header("GPT4 Correct Assistant")
    assert prompt[:2] == [128000, 128006] and prompt[-2:] == [128007, 271] and prompt.count(128009) == 1
    assert llama3_tok.hf.decode(prompt) == ("<|begin_of_text|><|start_header_id|>GPT4 Correct User<|end_header_id|>\n\n"
                                            "Hi<|eot_id|><|start_header_id|>GPT4 Correct Assistant<|end_header_id|>\n\n")
    from ochat.assets import LLAMA2_TOKENIZER
    from ochat.data import load_tokenizer

    with pytest.raises(ValueError, match="lacks <|begin_of_text|>.*needs"):
        load_tokenizer(LLAMA2_TOKENIZER, "openchat_3.6")
