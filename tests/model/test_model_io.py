"""Loading and saving against transformers (round trip, shards, .bin, dtype) and add_tokens."""
import contextlib
import io
import json
import os
import shutil

import pytest
import torch
import transformers

from ochat.assets import LLAMA2_TOKENIZER
from ochat.model.config import ModelConfig
from ochat.model.decoder import PackedCausalLM
from ochat.training.add_tokens import main as add_tokens_main
from tests.helpers.models import HF_CLASSES, VARIANTS, make_pack


def hf_model(name, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.debug(**VARIANTS[name])
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_config())
    return cfg, getattr(transformers, HF_CLASSES[cfg.model_type])(hf_cfg).float().eval()


def packed_vs_hf(ours, hf, cfg):
    seqs, ids, pos, cu, mx = make_pack(cfg)
    with torch.no_grad():
        logits = ours(ids, pos, cu, mx)
        ref = torch.cat([hf(input_ids=s[None]).logits[0] for s in seqs])
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def check_round_trip(tmp_path, hf, cfg=None):
    """transformers writes -> ochat loads (same logits, per conversation) -> ochat writes -> transformers loads
    (the same class, identical logits)."""
    hf.save_pretrained(tmp_path / "hf")
    ours = PackedCausalLM.from_pretrained(tmp_path / "hf", attn_impl="sdpa")
    if cfg is not None:
        assert ours.config == cfg
    packed_vs_hf(ours, hf, ours.config)
    ours.save_pretrained(tmp_path / "ours")
    assert ModelConfig.from_hf_config(tmp_path / "ours") == ours.config
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
    assert type(hf2) is type(hf) and type(hf2.config) is type(hf.config)
    ids = torch.randint(0, ours.config.vocab_size, (1, 50))
    with torch.no_grad():
        assert torch.equal(hf2(input_ids=ids).logits, hf(input_ids=ids).logits)
    return ours


@pytest.mark.parametrize("name", list(VARIANTS))
def test_round_trip_transformers_to_ours_to_transformers(tmp_path, name):
    cfg, hf = hf_model(name)
    check_round_trip(tmp_path, hf, cfg)


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
NATIVE = {  # transformers' own defaults for everything else (Gemma 2: soft-caps 50 / 30, query_pre_attn_scalar 256)
    "llama": dict(), "mistral": dict(), "qwen2": dict(), "qwen3": dict(), "olmo2": dict(),
    "gemma2": dict(head_dim=16), "gemma3_text": dict(head_dim=16, sliding_window=8, sliding_window_pattern=2),
    "phi3": dict(pad_token_id=0),  # the default pad id (32000) is outside the tiny vocabulary
    "gpt_oss": dict(num_local_experts=4, head_dim=16),  # YaRN, sinks, sliding window 128 / full layers
}


@pytest.mark.parametrize("model_type", list(NATIVE))
def test_ochat_loads_what_transformers_writes_from_its_own_defaults(tmp_path, model_type):
    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(model_type, **TINY, **NATIVE[model_type])
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    ours = check_round_trip(tmp_path, hf)
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert ours.config.num_params() == sum(p.numel() for p in hf.parameters())


def test_unsupported_architectures_are_refused_in_one_line(tmp_path):
    for model_type in ("deepseek_v3", "qwen3_next", "gemma3"):
        hf_cfg = transformers.AutoConfig.for_model(model_type)
        (tmp_path / "config.json").write_text(hf_cfg.to_json_string())
        with pytest.raises(ValueError, match=rf"config.json: model_type '{model_type}' not supported "
                                             rf"\(supported: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, "
                                             rf"phi3, olmo2, mixtral, olmoe, qwen2_moe, qwen3_moe, gpt_oss\)$"):
            PackedCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="llama", rope_scaling=dict(
        rope_type="dynamic", factor=4.0))))
    with pytest.raises(ValueError, match="rope type 'dynamic' not supported"):
        PackedCausalLM.from_pretrained(tmp_path)


def test_sharded_bin_and_dtype(tmp_path):
    cfg, hf = hf_model("llama2")
    hf.save_pretrained(tmp_path / "bin", safe_serialization=False, max_shard_size="100KB") \
        if "safe_serialization" in hf.save_pretrained.__code__.co_varnames else None
    src = tmp_path / "bin"
    if not src.exists():  # transformers without .bin saving: write a sharded .bin by hand
        os.makedirs(src)
        sd = hf.state_dict()
        keys = list(sd)
        half = len(keys) // 2
        wm = {}
        for i, part in enumerate((keys[:half], keys[half:])):
            name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
            torch.save({k: sd[k] for k in part}, src / name)
            wm.update({k: name for k in part})
        (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
        hf.config.save_pretrained(src)
    ours = PackedCausalLM.from_pretrained(src, attn_impl="sdpa")
    packed_vs_hf(ours, hf, ours.config)
    ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=50_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    half = PackedCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert all(p.device.type == "cpu" for p in half.parameters())
    for (n, a), (_, b) in zip(half.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b.to(torch.bfloat16)), n


def llama2_tokenizer(folder):
    """A Hugging Face tokenizer folder built from the bundled Llama 2 SentencePiece model."""
    os.makedirs(folder)
    shutil.copyfile(LLAMA2_TOKENIZER, os.path.join(folder, "tokenizer.model"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "legacy": True}, f)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 32000
    return tok


@pytest.mark.parametrize("name", ["llama2", "tied"])
def test_add_tokens_cli(tmp_path, name):
    cfg, hf = hf_model(name)
    # a tiny model whose vocab is the Llama 2 tokenizer's (32000): resize the random model to it
    hf.resize_token_embeddings(32000, mean_resizing=False)
    hf.save_pretrained(tmp_path / "in")
    tok = llama2_tokenizer(tmp_path / "tok")
    tok.save_pretrained(tmp_path / "in")
    add_tokens_main(["--model-path", str(tmp_path / "in"), "--out-dir", str(tmp_path / "out"),
                     "--tokens", "<|end_of_turn|>"])
    tok2 = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    eot = tok2.convert_tokens_to_ids("<|end_of_turn|>")
    assert eot == 32000
    assert tok2.encode("Hi<|end_of_turn|>", add_special_tokens=False)[-1] == eot
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float()
    emb = hf2.get_input_embeddings().weight
    old = hf.get_input_embeddings().weight
    assert emb.shape[0] == 32001
    torch.testing.assert_close(emb[:32000], old)
    torch.testing.assert_close(emb[32000], old.mean(0))
    head = hf2.get_output_embeddings().weight
    torch.testing.assert_close(head[32000], hf.get_output_embeddings().weight.mean(0))
    assert hf2.config.tie_word_embeddings == cfg.tie_word_embeddings
    # running it again adds nothing; an output folder ochat wrote is replaced whole
    add_tokens_main(["--model-path", str(tmp_path / "out"), "--out-dir", str(tmp_path / "out2")])
    add_tokens_main(["--model-path", str(tmp_path / "out"), "--out-dir", str(tmp_path / "out2")])
    assert PackedCausalLM.from_pretrained(tmp_path / "out2").config.vocab_size == 32001


def add_tokens_error(argv) -> str:
    """The one line add_tokens prints for a bad invocation (exit code 2)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        add_tokens_main(argv)
    assert e.value.code == 2
    return err.getvalue().strip().splitlines()[-1]


def test_add_tokens_refuses_what_it_cannot_do_and_keeps_other_folders(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert "not a Hugging Face model folder (no config.json)" in add_tokens_error(
        ["--model-path", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "out")])
    _, hf = hf_model("llama2")
    hf.resize_token_embeddings(32000, mean_resizing=False)
    hf.save_pretrained(tmp_path / "in")
    llama2_tokenizer(tmp_path / "tok").save_pretrained(tmp_path / "in")
    assert "is not empty and was not written by ochat" in add_tokens_error(
        ["--model-path", str(tmp_path / "in"), "--out-dir", str(mine)])
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    add_tokens_main(["--model-path", str(tmp_path / "in"), "--out-dir", str(mine), "--overwrite"])
    assert not (mine / "notes.txt").exists() and (mine / "config.json").exists()
    config = json.loads((tmp_path / "in" / "config.json").read_text())  # a config.json that lies about the tensors
    (tmp_path / "in" / "config.json").write_text(json.dumps(dict(config, hidden_size=config["hidden_size"] // 2)))
    assert "config.json does not describe these weights" in add_tokens_error(
        ["--model-path", str(tmp_path / "in"), "--out-dir", str(tmp_path / "lying")])
    assert not (tmp_path / "lying").exists()


@pytest.fixture(scope="module")
def llama3_tokenizer_dir(tmp_path_factory):
    """Meta's Llama 3 tokenizer (shipped by llama-models) cut to its first 1,000 BPE ranks, with its 256 special
    tokens right after them (ids 1000-1255, as 128000-128255 in the full one), as a Hugging Face folder."""
    pytest.importorskip("llama_models")
    from pathlib import Path

    import llama_models
    import tiktoken
    from llama_models.llama3.tokenizer import Tokenizer
    from transformers.integrations.tiktoken import convert_tiktoken_to_fast

    full = Tokenizer(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")
    ranks = {piece: r for piece, r in full.model._mergeable_ranks.items() if r < LLAMA3_ORDINARY}
    specials = {name: i - 128000 + LLAMA3_ORDINARY for name, i in full.special_tokens.items()}
    folder = tmp_path_factory.mktemp("llama3_tokenizer")
    convert_tiktoken_to_fast(tiktoken.Encoding("llama3_cut", pat_str=full.model._pat_str, mergeable_ranks=ranks,
                                               special_tokens=specials), folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert len(tok) == LLAMA3_ORDINARY + 256 and len(tok.added_tokens_decoder) == 256
    return folder, tok.convert_tokens_to_ids(LLAMA3_CHAT_TOKENS)


LLAMA3_ORDINARY = 1000
LLAMA3_CHAT_TOKENS = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


@pytest.mark.parametrize("tied,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_add_tokens_init_mean_makes_llama3_reserved_tokens_trainable(tmp_path, llama3_tokenizer_dir, tied, dtype):
    """A tiny Llama 3-style base model whose special rows are (nearly) zero, as in Llama 3 base: --init-mean sets
    the chat tokens' embedding and lm_head rows to the mean of the ordinary rows and changes nothing else."""
    tokenizer_dir, ids = llama3_tokenizer_dir
    assert ids == [LLAMA3_ORDINARY + 9, LLAMA3_ORDINARY + 6, LLAMA3_ORDINARY + 7]
    vocab = LLAMA3_ORDINARY + 256
    torch.manual_seed(0)
    cfg = ModelConfig.debug(vocab_size=vocab, rope_theta=500000.0, tie_word_embeddings=tied)
    hf = transformers.LlamaForCausalLM(transformers.AutoConfig.for_model(**cfg.to_hf_config())).to(dtype)
    with torch.no_grad():
        for w in (hf.model.embed_tokens.weight, hf.lm_head.weight):
            w[LLAMA3_ORDINARY:] *= 1e-4  # untrained special tokens
    shutil.copytree(tokenizer_dir, tmp_path / "in")
    hf.save_pretrained(tmp_path / "in")
    add_tokens_main(["--model-path", str(tmp_path / "in"), "--out-dir", str(tmp_path / "out"),
                     "--init-mean", *LLAMA3_CHAT_TOKENS])

    out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype)
    assert out.config.vocab_size == vocab  # nothing added
    others = torch.ones(vocab, dtype=torch.bool)
    others[ids] = False
    for before, after in ((hf.model.embed_tokens.weight, out.model.embed_tokens.weight),
                          (hf.lm_head.weight, out.lm_head.weight)):
        assert after.dtype == dtype and after.shape == before.shape
        assert torch.equal(after[others], before[others])
        mean = before[:LLAMA3_ORDINARY].float().mean(0).to(dtype)
        for i in ids:
            assert torch.equal(after[i], mean)
    assert (out.lm_head.weight is out.model.embed_tokens.weight) is tied
    if tied:
        assert "--init-mean tokens ['<|not_a_token|>'] are not in the tokenizer" in add_tokens_error(
            ["--model-path", str(tmp_path / "in"), "--out-dir", str(tmp_path / "bad"), "--init-mean", "<|not_a_token|>"])
        assert not (tmp_path / "bad").exists()
