"""Hugging Face tokenizer folders that serve exactly as trained: `save_serving_tokenizer`.

Every tokenizer folder ochat writes (checkpoints, the demo's model, add_tokens) comes from here. It holds:

- `tokenizer.json`: a tokenizer that tokenizes like training (a SentencePiece `.model` is rebuilt to match
  SentencePiece exactly, see `sentencepiece_hf`; a Hugging Face folder keeps the backend training used),
  loaded as-is by `AutoTokenizer` (`tokenizer_class: PreTrainedTokenizerFast`, so no class rebuilds it);
- `tokenizer_config.json`: special tokens (`eos_token` = the end-of-turn token), every added token with its
  id (`added_tokens_decoder`, which llama.cpp's converter reads), and the `chat_template`;
- the original `tokenizer.model` where there is one (llama.cpp's converter takes the scores from it).

The chat template renders exactly the ids of `template.encode_prompt` (`add_generation_prompt=True`) and of
`template.encode` (whole conversations). The folder is checked by loading it back before returning.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

# conversations the written folder is checked on (plain text: no special-token text in contents)
CHECKS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!  How can I help?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Code:\n    x = 1"},
     {"role": "assistant", "content": "    return x\n\ndone"}, {"role": "user", "content": "1234 and é"},
     {"role": "assistant", "content": "ok"}],
]


def save_serving_tokenizer(tokenizer, chat_format, out_dir) -> dict:
    """Write the Hugging Face tokenizer folder of `tokenizer` (from `ochat.data.load_tokenizer`) for
    `chat_format` into `out_dir`; -> the generation_config.json entries: {"bos_token_id", "eos_token_id"
    (a list starting with the end-of-turn id), "pad_token_id"}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    template = chat_format.template
    hf = tokenizer.serving_tokenizer()
    hf.chat_template = template.serving_chat_template(tokenizer, hf)
    hf.eos_token = tokenizer.eot_token
    hf.save_pretrained(str(out_dir))
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)  # kept in tokenizer_config.json, read by all versions
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=hf.chat_template,
                  added_tokens_decoder={str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip,
                                                 "normalized": t.normalized, "single_word": t.single_word,
                                                 "special": t.special}
                                        for i, t in sorted(hf.added_tokens_decoder.items())})
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for f in tokenizer.original_files():
        shutil.copyfile(f, out_dir / "tokenizer.model")
    _check(tokenizer, template, out_dir)
    eos = [tokenizer.eot_id] + [tokenizer.eos_id] * (tokenizer.eos_id not in (None, tokenizer.eot_id))
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos, "pad_token_id": tokenizer.eot_id}


def _check(tokenizer, template, out_dir) -> None:
    from transformers import AutoTokenizer

    served = AutoTokenizer.from_pretrained(str(out_dir))
    for messages in CHECKS:
        for prompt in (True, False):
            shown = messages[:-1] if prompt else messages
            want = template.encode_prompt(shown, tokenizer) if prompt else template.encode(shown, tokenizer)[0]
            got = served.apply_chat_template(shown, add_generation_prompt=prompt, tokenize=True, return_dict=False)
            if list(got) != list(want):
                raise RuntimeError(f"{out_dir}: the written tokenizer and chat template give other ids than training "
                                   f"({list(got)[:12]}... vs {list(want)[:12]}...)")
