"""The golden path on a laptop: pre-tokenize, train a tiny random Llama with DeepSpeed, load, generate.

    python -m ochat.demo [--work-dir runs/demo] [--epochs 3] [--num-gpus 2]

1. `python -m ochat.data.generate_dataset` on the bundled ShareGPT sample and Llama 2 tokenizer.
2. A tiny random Llama (2 layers, hidden 64, vocabulary 32001 = Llama 2 + <|end_of_turn|>) saved in
   Hugging Face format with the bundled tokenizer.
3. `deepspeed --num_gpus N --module ochat.training.train` on 2 CPU ranks (gloo, float32), or on the GPUs.
4. transformers loads the checkpoint and generates a few tokens; the checkpoint's path is printed.
About 2 minutes on 2 CPU cores.
"""
import argparse
import os
import subprocess
import sys


def make_tiny_llama(out_dir, *, vocab_size=32001, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, seed=0):
    """A random LlamaForCausalLM in HF format plus the bundled tokenizer (with <|end_of_turn|>)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ochat.config import get_model_type
    from ochat.data import load_tokenizer

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tok = load_tokenizer(bundled_tokenizer(), get_model_type("openchat_v3.2"))
    tok.save_hf(out_dir)
    return out_dir


def bundled_tokenizer():
    return os.path.join(os.path.dirname(__file__), "assets", "llama2-tokenizer.model")


def launcher_args(num_gpus):
    """`deepspeed` launcher arguments; on a machine without GPUs it starts CPU ranks."""
    return ["deepspeed", "--num_gpus", str(num_gpus), "--master_port", str(29500 + os.getpid() % 1000)]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m ochat.demo", description=__doc__.split("\n")[0])
    p.add_argument("--work-dir", default="runs/demo")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-gpus", type=int, default=None, help="ranks (default: GPUs, or 2 CPU ranks)")
    args = p.parse_args(argv)
    import torch

    n = args.num_gpus or (torch.cuda.device_count() or 2)
    data, model, out = (os.path.join(args.work_dir, d) for d in ("data", "tiny-llama", "out"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    print(f"[demo] 1/4 pre-tokenizing the bundled sample -> {data}", flush=True)
    subprocess.run([sys.executable, "-m", "ochat.data.generate_dataset", "--out-dir", data, "--overwrite", "--quiet"],
                   check=True, env=env)
    print(f"[demo] 2/4 a tiny random Llama (vocab 32001) -> {model}", flush=True)
    make_tiny_llama(model)
    print(f"[demo] 3/4 training with DeepSpeed on {n} {'GPU' if torch.cuda.is_available() else 'CPU'} ranks", flush=True)
    cmd = launcher_args(n) + ["--module", "ochat.training.train", "--model-path", model, "--data-path", data,
                              "--save-path", out, "--epochs", str(args.epochs), "--batch-max-len", "1024",
                              "--lr", "3e-3", "--lr-warmup-steps", "2", "--log-every", "5"]
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0:
        raise SystemExit(f"[demo] training failed (exit {r.returncode})")
    final = os.path.join(out, "final")
    print(f"[demo] 4/4 loading {final} with transformers and generating", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ochat.config import get_model_type
    from ochat.data import load_tokenizer

    hf = AutoModelForCausalLM.from_pretrained(final)
    tok = load_tokenizer(final, get_model_type("openchat_v3.2"))
    prompt = get_model_type("openchat_v3.2").template.encode_prompt(
        [{"role": "user", "content": "What is the capital of France?"}], tok)
    ids = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
    print(f"[demo] generated: {tok.decode(ids.tolist())!r}")
    print(f"[demo] checkpoint: {os.path.abspath(final)} (AutoTokenizer + AutoModelForCausalLM load it)")
    AutoTokenizer.from_pretrained(final)


if __name__ == "__main__":
    main()
