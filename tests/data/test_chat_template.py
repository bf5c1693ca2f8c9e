"""The chat_template model type against transformers' own `apply_chat_template`, on real chat templates
(tests/data/chat_templates: Qwen2.5, Qwen3, Llama 3.1, Gemma 2, Phi-3.5, Mistral Nemo, as their model
repositories publish them) and the bundled presets, with real or Qwen-style tokenizers."""
import json
import os
import random
from dataclasses import dataclass

import pytest

from ochat.config import get_model_type
from ochat.data import load_tokenizer
from ochat.data.chat_formats import Encoded, UnsupportedConversation
from tests.helpers.data import sample_conversations
from tests.helpers.tokenizers import mistral_v3_tokenizer

HERE = os.path.dirname(__file__)


def template_file(name):
    return os.path.join(HERE, "chat_templates", name)


@dataclass
class Conv:
    messages: list
    condition: str = "GPT4"
    system: str | None = None
    tools: list | None = None


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def tool_conversation(arguments):
    return [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "id": "call00001", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "{\"temp\": 21}"},
            {"role": "assistant", "content": "It is 21 degrees in Paris."}]


def hf_messages(c):
    return ([{"role": "system", "content": c.system}] if c.system else []) + c.messages


def reference(tok, messages, tools=None, generation_prompt=False):
    """transformers' ids for a conversation, with the template the tokenizer was fitted to."""
    return tok.hf.apply_chat_template(messages, tools=tools, chat_template=tok.chat_template,
                                      add_generation_prompt=generation_prompt, tokenize=True, return_dict=False)


def weighted_runs(tok, tokens, weights):
    runs, cur = [], []
    for t, w in zip(tokens, weights):
        if w > 0:
            cur.append(t)
        elif cur:
            runs.append(tok.hf.decode(cur))
            cur = []
    return runs + ([tok.hf.decode(cur)] if cur else [])


@pytest.fixture(scope="module")
def cases(qwen_dir, llama2_folder):
    """(tokenizer folder, template spec) pairs that need no optional package."""
    gemma = llama2_folder(["<start_of_turn>", "<end_of_turn>"])
    phi = llama2_folder(["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"])
    return {"qwen2.5": (qwen_dir, template_file("Qwen-Qwen2.5-7B-Instruct.jinja")),
            "qwen3": (qwen_dir, template_file("Qwen-Qwen3-0.6B.jinja")),
            "chatml": (qwen_dir, "chatml"),
            "gemma2": (gemma, template_file("google-gemma-2-2b-it.jinja")),
            "gemma": (gemma, "gemma"),
            "phi3.5": (phi, template_file("microsoft-Phi-3.5-mini-instruct.jinja"))}


@pytest.mark.parametrize("case", ["qwen2.5", "qwen3", "chatml", "gemma2", "gemma", "phi3.5"])
def test_equals_apply_chat_template(cases, case):
    folder, spec = cases[case]
    mt = get_model_type("chat_template", spec)
    tok = load_tokenizer(folder, mt)
    convs = sample_conversations(mt)
    if case == "gemma2":  # Gemma 2's template refuses system prompts: counted as template_error
        results = mt.template.encode_many([Conv(c.messages, c.condition, "Be brief.") for c in convs[:3]], tok)
        assert all(isinstance(r, UnsupportedConversation) and r.reason == "template_error" for r in results)
        convs = [Conv(c.messages, c.condition) for c in convs]
    results = mt.template.encode_many(convs, tok)
    assert all(isinstance(r, Encoded) for r in results)
    for c, r in zip(convs, results):
        assert r.tokens == reference(tok, hf_messages(c))
        runs = weighted_runs(tok, r.tokens, r.weights)
        assistants = [m["content"] for m in c.messages if m["role"] == "assistant"]
        assert len(runs) == len(assistants)
        for run, content in zip(runs, assistants):  # the content (as rendered) and the end-of-turn token
            assert run.endswith(tok.eot_token) and content.strip()[-20:] in run
        assert set(r.weights) <= {0.0, mt.condition_weights[c.condition]}
    c = convs[1]
    assert mt.template.encode(c.messages, tok, system=c.system)[0] == results[1].tokens
    assert mt.template.encode_prompt(c.messages[:-1], tok, system=c.system) == \
        reference(tok, hf_messages(c)[:-1], generation_prompt=True)


def with_generation_tags(source):
    """The chatml preset with transformers' {% generation %} tags around what an assistant message produces."""
    start = "{{- '<|im_start|>assistant\\n' + (message.content or '') }}"
    end = "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == 'tool' %}"
    assert start in source and end in source
    return (source.replace(start, "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- (message.content or '') }}")
            .replace(end, "        {{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}\n    {%- elif message.role == 'tool' %}"))


def test_weights_equal_transformers_assistant_mask(qwen_dir):
    from ochat.data.chat_template import read_chat_template

    source = with_generation_tags(read_chat_template("chatml")[0])
    mt = get_model_type("chat_template", source)
    tok = load_tokenizer(qwen_dir, mt)
    rng = random.Random(0)
    convs = sample_conversations(mt, 60)
    convs += [Conv(tool_conversation({"city": "Paris"}), tools=TOOLS),
              Conv(tool_conversation("{\"city\": \"Paris\"}"), tools=TOOLS, system="Use tools.")]
    for c in convs:
        c.condition = rng.choice(["GPT4", "GPT3"])
        out = tok.hf.apply_chat_template(hf_messages(c), tools=c.tools, chat_template=source, tokenize=True,
                                         return_dict=True, return_assistant_tokens_mask=True)
        tokens, weights = mt.template.encode(c.messages, tok, condition=c.condition, system=c.system, tools=c.tools)
        assert tokens == out["input_ids"]
        w = {"GPT4": 1.0, "GPT3": 0.1}[c.condition]
        assert weights == [w * m for m in out["assistant_masks"]]


def test_qwen3_reasoning_and_tools(cases):
    folder, spec = cases["qwen3"]
    mt = get_model_type("chat_template", spec)
    tok = load_tokenizer(folder, mt)
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nadd\n</think>\n\nIt is 4."}] + tool_conversation({"city": "Paris"})
    [r] = mt.template.encode_many([Conv(messages, "GPT3", "Be brief.", TOOLS)], tok)
    assert r.tokens == reference(tok, [{"role": "system", "content": "Be brief."}] + messages, tools=TOOLS)
    assert r.rewritten_turns == 1  # the earlier turn's reasoning is dropped by the template
    assert weighted_runs(tok, r.tokens, r.weights) == [
        "It is 4.<|im_end|>",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "<think>\n\n</think>\n\nIt is 21 degrees in Paris.<|im_end|>"]
    assert set(r.weights) == {0.0, 0.1}


def test_llama3_templates(llama3_dir):
    for spec in ("llama3", template_file("meta-llama-Llama-3.1-8B-Instruct.jinja")):
        mt = get_model_type("chat_template", spec)
        tok = load_tokenizer(llama3_dir, mt)
        assert (tok.eot_token, tok.eot_id, tok.bos_id) == ("<|eot_id|>", 128009, 128000)
        for c in sample_conversations(mt, 40) + [Conv(tool_conversation({"city": "Paris"}), system="Hi", tools=TOOLS)]:
            tokens, weights = mt.template.encode(c.messages, tok, system=c.system, tools=c.tools)
            messages = hf_messages(c)
            assert tokens == reference(tok, messages, tools=c.tools)
            assert len(weighted_runs(tok, tokens, weights)) == sum(m["role"] == "assistant" for m in c.messages)


def test_mistral_system_in_last_user_turn(tmp_path):
    """Mistral Nemo's template puts the system prompt in the last user turn, so a turn's prompt is not a
    prefix of the whole conversation: the assistant spans are found by their content."""
    (tmp_path / "tokenizer.model").write_bytes(mistral_v3_tokenizer(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False}))
    mt = get_model_type("chat_template", template_file("mistralai-Mistral-Nemo-Instruct-2407.jinja"))
    tok = load_tokenizer(tmp_path, mt)
    assert tok.eot_token == "</s>"
    for c in sample_conversations(mt, 30):
        tokens, weights = mt.template.encode(c.messages, tok, system="Be brief.")
        assert tokens == reference(tok, [{"role": "system", "content": "Be brief."}] + c.messages)
        runs = weighted_runs(tok, tokens, weights)
        assistants = [m["content"] for m in c.messages if m["role"] == "assistant"]
        assert [r.removesuffix("</s>").strip() for r in runs] == [a.strip() for a in assistants]


def test_tools_unsupported_and_errors(cases, tmp_path, llama2_folder):
    for case in ("gemma", "phi3.5"):  # templates that cannot render tools
        folder, spec = cases[case]
        mt = get_model_type("chat_template", spec)
        tok = load_tokenizer(folder, mt)
        [r] = mt.template.encode_many([Conv(tool_conversation({"city": "Paris"}), tools=TOOLS)], tok)
        assert isinstance(r, UnsupportedConversation) and r.reason == "tools_unsupported"
    for name in ("openchat_v3.2", "openchat_3.5"):  # OpenChat templates have no tools
        mt = get_model_type(name)
        [r] = mt.template.encode_many([Conv(tool_conversation({"city": "Paris"}), condition=mt.default_condition)],
                                      load_tokenizer(cases["gemma"][0], mt))
        assert r.reason == "tools_unsupported"
    folder = llama2_folder()
    with pytest.raises(ValueError, match="has no chat template"):
        load_tokenizer(folder, "chat_template")
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    with pytest.raises(ValueError, match="chat template given as text cannot be split.*no special token"):
        load_tokenizer(folder, get_model_type("chat_template", plain))
    with pytest.raises(ValueError, match="neither a preset"):
        get_model_type("chat_template", "no-such-template")
    with pytest.raises(ValueError, match="needs a Hugging Face tokenizer folder"):
        from ochat.assets import LLAMA2_TOKENIZER

        load_tokenizer(LLAMA2_TOKENIZER, get_model_type("chat_template", "chatml"))


def test_condition_weights_apply_unprinted(cases):
    folder, spec = cases["chatml"]
    mt = get_model_type("chat_template", spec)
    tok = load_tokenizer(folder, mt)
    c = sample_conversations(mt, 1)[0]
    t4, w4 = mt.template.encode(c.messages, tok, condition="GPT4")
    t3, w3 = mt.template.encode(c.messages, tok, condition="GPT3")
    assert t4 == t3 and [x * 0.1 for x in w4] == pytest.approx(w3) and max(w4) == 1.0
    with pytest.raises(ValueError, match="unknown condition"):
        mt.template.encode(c.messages, tok, condition="GPT5")


def test_presets():
    from ochat.data.chat_template import presets

    assert {"chatml", "gemma", "llama3"} <= set(presets())
