"""Add special tokens to a Hugging Face checkpoint, or make existing but untrained ones trainable.

    python -m ochat.training.add_tokens --model-path IN --out-dir OUT --tokens "<|end_of_turn|>"
    python -m ochat.training.add_tokens --model-path LLAMA3_BASE --out-dir OUT \\
        --init-mean "<|eot_id|>" "<|start_header_id|>" "<|end_header_id|>"

- `--tokens`: each token the tokenizer lacks is added as a special token; its new embedding and lm_head rows
  are the mean of the existing rows (float32 mean), as OpenChat did. Tokens already present are left alone.
  Default: `<|end_of_turn|>`, unless `--init-mean` is given.
- `--init-mean`: tokens the tokenizer has but the base checkpoint never trained (Llama 3 base's reserved special
  tokens, `<|eot_id|>` and the header tokens among them, have near-zero rows that a chat fine-tune then cannot
  move far): their embedding and lm_head rows become the mean of the ordinary rows, the rows of the
  tokenizer's vocabulary that are not special (added) tokens, as OpenChat 3.6 did.

Tied embeddings change once (the lm_head is that matrix). Tensors are read and written through
`ochat.model.hf_weights`, in the checkpoint's dtype; OUT gets the tokenizer, config.json and safetensors,
written whole or not at all. An existing OUT is replaced only when ochat wrote it (else `--overwrite`).
"""
import argparse
import dataclasses
import os

import torch

from ochat.model import hf_weights
from ochat.model.config import ModelConfig
from ochat.model.decoder import PackedCausalLM
from ochat.training.checkpoint import CHECKPOINT_KIND
from ochat.utils.atomic import RefusedOverwrite, atomic_directory, check_replaceable
from ochat.utils.log import log

EMBEDDING = "model.embed_tokens.weight"


def mean_rows(matrix: torch.Tensor, new_vocab: int, init_ids: list[int], ordinary_ids: list[int]) -> torch.Tensor:
    """`matrix` [V, H] grown to `new_vocab` rows (new rows = mean of the existing rows), with the rows `init_ids`
    set to the mean of the rows `ordinary_ids`. Means in float32; the result in matrix's dtype."""
    rows = matrix.float()
    if new_vocab > len(rows):
        rows = torch.cat([rows, rows.mean(0, keepdim=True).expand(new_vocab - len(rows), -1)])
    if init_ids:
        rows[init_ids] = rows[ordinary_ids].mean(0)
    return rows.to(matrix.dtype)


def add_tokens(model_path: str, out_dir: str, tokens: list[str], init_mean: list[str] = (), *,
               overwrite: bool = False) -> list[int]:
    """Add `tokens` (those missing) as special tokens and mean-initialise the rows of `init_mean`; returns the ids
    of `tokens`. Saves the tokenizer and model to out_dir atomically (RefusedOverwrite for a folder ochat did not
    write, unless `overwrite`)."""
    from transformers import AddedToken, AutoTokenizer

    check_replaceable(out_dir, CHECKPOINT_KIND, overwrite)  # before reading a large checkpoint for nothing
    tok = AutoTokenizer.from_pretrained(model_path)
    vocab = tok.get_vocab()
    unknown = [t for t in init_mean if t not in vocab]
    if unknown:
        raise ValueError(f"{model_path}: --init-mean tokens {unknown} are not in the tokenizer (add them with --tokens)")
    config = ModelConfig.from_hf_config(model_path)
    init_ids = [vocab[t] for t in init_mean]
    special = set(tok.added_tokens_decoder) | set(tok.all_special_ids) | set(init_ids)
    ordinary = [i for i in range(min(len(tok), config.vocab_size)) if i not in special]
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    new_vocab = max(len(tok), config.vocab_size)
    with torch.device("meta"):  # the shapes config.json gives, to check the tensors against
        described = PackedCausalLM(config)
    state = hf_weights.read_state_dict(model_path, described)
    for name in (EMBEDDING, hf_weights.TIED_NAME):
        if name in state and not (config.tie_word_embeddings and name == hf_weights.TIED_NAME):
            state[name] = mean_rows(state[name], new_vocab, init_ids, ordinary)
    with atomic_directory(out_dir, CHECKPOINT_KIND, overwrite=overwrite) as tmp:
        hf_weights.save_weights(tmp, state, dataclasses.replace(config, vocab_size=new_vocab))
        tok.save_pretrained(tmp)
    ids = tok.convert_tokens_to_ids(tokens)
    log(f"added {missing} (ids {ids}), mean-initialised {list(init_mean)} (ids {init_ids}); vocab {config.vocab_size} "
        f"-> {new_vocab} in {out_dir}")
    return ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", "--model_path", required=True)
    ap.add_argument("--out-dir", "--out_dir", required=True)
    ap.add_argument("--tokens", nargs="*", default=None,
                    help="special tokens to add when missing (rows = mean of the existing rows); "
                         "default <|end_of_turn|> unless --init-mean is given")
    ap.add_argument("--init-mean", "--init_mean", nargs="+", default=[], metavar="TOKEN",
                    help="existing tokens whose embedding and lm_head rows become the mean of the ordinary rows")
    ap.add_argument("--overwrite", action="store_true", help="replace --out-dir even when ochat did not write it")
    args = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model_path, "config.json")):
        ap.error(f"--model-path {args.model_path}: not a Hugging Face model folder (no config.json)")
    tokens = args.tokens if args.tokens is not None else [] if args.init_mean else ["<|end_of_turn|>"]
    try:
        ids = add_tokens(args.model_path, args.out_dir, tokens, args.init_mean, overwrite=args.overwrite)
    except (ValueError, RefusedOverwrite) as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    print(" ".join(f"{t}={i}" for t, i in zip(tokens, ids)))


if __name__ == "__main__":
    main()
