"""Add special tokens to a Hugging Face checkpoint: tokenizer and model, new rows = mean of existing rows.

    python -m ochat.training.add_tokens --model-path IN --out-dir OUT --tokens "<|end_of_turn|>"

As OpenChat did: each new embedding row and lm_head row is the mean of the existing rows (float32 mean).
Tokens the tokenizer already has are left alone. Writes the tokenizer, config.json and safetensors to OUT.
"""
import argparse
import logging

import torch

from ochat.training.model import PackedCausalLM

log = logging.getLogger(__name__)


def resize_with_mean(model: PackedCausalLM, new_vocab: int) -> PackedCausalLM:
    """A copy of `model` with vocab `new_vocab`; rows beyond the old vocab = mean of the old rows."""
    import dataclasses

    old = model.config.vocab_size
    if new_vocab <= old:
        return model
    cfg = dataclasses.replace(model.config, vocab_size=new_vocab)
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            mean = v.float().mean(0, keepdim=True).to(v.dtype)
            v = torch.cat([v, mean.expand(new_vocab - old, -1)], 0)
        out[k] = v
    dev = model.lm_head.weight.device
    with torch.device("meta"):
        new = PackedCausalLM(cfg, attn_impl=model.attn_impl)
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    new.load_state_dict(out, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        new.lm_head.weight = new.model.embed_tokens.weight
    return new.to(dev)


def add_tokens(model_path: str, out_dir: str, tokens: list[str]) -> list[int]:
    """Add `tokens` as special tokens; returns their ids. Saves the tokenizer and model to out_dir."""
    from transformers import AddedToken, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    missing = [t for t in tokens if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    model = PackedCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = resize_with_mean(model, max(len(tok), model.config.vocab_size))
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    ids = tok.convert_tokens_to_ids(tokens)
    log.info("added %s (ids %s); vocab %d -> %s", missing, ids, model.config.vocab_size, out_dir)
    return ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", "--model_path", required=True)
    ap.add_argument("--out-dir", "--out_dir", required=True)
    ap.add_argument("--tokens", nargs="+", default=["<|end_of_turn|>"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    ids = add_tokens(args.model_path, args.out_dir, args.tokens)
    print(" ".join(f"{t}={i}" for t, i in zip(args.tokens, ids)))


if __name__ == "__main__":
    main()
