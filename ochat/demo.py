"""The golden path on a laptop: pre-tokenize, train a tiny random Llama with DeepSpeed, load, generate.

    python -m ochat.demo [--work-dir runs/demo] [--epochs 3] [--max-steps N] [--num-gpus 2] [--verbose]

1. `python -m ochat.data.generate_dataset` on the bundled ShareGPT sample and Llama 2 tokenizer.
2. A tiny random Llama (2 layers, hidden 64, vocabulary 32001 = Llama 2 + <|end_of_turn|>) saved in
   Hugging Face format with the bundled tokenizer.
3. `deepspeed --num_gpus N --module ochat.training.train` on 2 CPU ranks (gloo, float32), or on the GPUs;
   only the trainer's own lines are shown (--verbose shows the launcher's too).
4. transformers loads the checkpoint and generates a few tokens; the next commands to try are printed.
About a minute on 2 CPU cores.
"""
import argparse
import os
import subprocess
import sys

from ochat.assets import LLAMA2_TOKENIZER, SHAREGPT_SAMPLE


def make_tiny_llama(out_dir, *, vocab_size=32001, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, seed=0):
    """A random LlamaForCausalLM in HF format plus the bundled tokenizer (with <|end_of_turn|>); returns out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ochat.data import load_tokenizer, save_serving_tokenizer
    from ochat.data.chat_formats import get_chat_format

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    chat_format = get_chat_format("openchat_v3.2")
    save_serving_tokenizer(load_tokenizer(LLAMA2_TOKENIZER, chat_format), chat_format, out_dir)
    return out_dir


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _train(cmd: list[str], verbose: bool) -> int:
    """Run the launcher; without --verbose only the trainer's lines (and errors) reach the terminal."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if verbose or line.startswith(("[ochat]", "ochat.", "Traceback")) or "Error" in line:
            print(line, end="", flush=True)
    return proc.wait()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m ochat.demo", description=__doc__.split("\n")[0])
    p.add_argument("--work-dir", default="runs/demo")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (a quick check)")
    p.add_argument("--num-gpus", type=int, default=None, help="ranks (default: the GPUs, or 2 CPU ranks)")
    p.add_argument("--verbose", action="store_true", help="show the DeepSpeed launcher's output too")
    args = p.parse_args(argv)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    gpus = torch.cuda.device_count()
    if not gpus:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed then says nothing about not finding a GPU
    n = args.num_gpus or gpus or 2
    data, model, out = (os.path.join(args.work_dir, d) for d in ("data", "tiny-llama", "out"))
    _say(f"1/4 pre-tokenizing the bundled ShareGPT sample -> {data}")
    subprocess.run([sys.executable, "-m", "ochat.data.generate_dataset", "--in-files", str(SHAREGPT_SAMPLE), "--out-dir",
                    data, "--overwrite", "--quiet"], check=True)
    _say(f"2/4 a tiny random Llama (vocabulary 32001) -> {model}")
    make_tiny_llama(model)
    _say(f"3/4 training {args.epochs} epochs with DeepSpeed on {n} {'GPU' if gpus else 'CPU'} ranks -> {out}")
    cmd = ["deepspeed", "--num_gpus", str(n), "--master_port", str(29500 + os.getpid() % 1000), "--module",
           "ochat.training.train", "--model-path", model, "--data-path", data, "--save-path", out, "--overwrite",
           "--epochs", str(args.epochs), "--batch-max-len", "1024", "--lr", "3e-3", "--lr-warmup-steps", "2",
           "--log-every", "5"] + (["--max-steps", str(args.max_steps)] if args.max_steps else [])
    status = _train(cmd, args.verbose)
    if status != 0:
        raise SystemExit(f"[demo] training failed (exit {status}); run again with --verbose for the launcher's output")
    final = os.path.join(out, "final")
    _say(f"4/4 loading {final} with transformers and generating")
    from transformers import AutoModelForCausalLM

    from ochat.data import load_tokenizer
    from ochat.data.chat_formats import get_chat_format

    hf = AutoModelForCausalLM.from_pretrained(final)
    tok = load_tokenizer(final, get_chat_format("openchat_v3.2"))
    prompt = get_chat_format("openchat_v3.2").template.encode_prompt(
        [{"role": "user", "content": "What is the capital of France?"}], tok)
    ids = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
    _say(f"generated: {tok.decode(ids.tolist())!r} (a tiny random model: fragments at best)")
    _say(f"checkpoint: {os.path.abspath(final)}")
    print(f"""
Next:
  # chat with the checkpoint (transformers; its tokenizer formats prompts as in training)
  python -c "from transformers import pipeline; p = pipeline('text-generation', '{final}'); \\
print(p([{{'role': 'user', 'content': 'Hi'}}], max_new_tokens=20)[0]['generated_text'])"
  # train a real Hugging Face model on your own conversations
  python -m ochat.data.generate_dataset --tokenizer MODEL_DIR --in-files my_data.jsonl --out-dir data/mine
  deepspeed --num_gpus 8 --module ochat.training.train --model-path MODEL_DIR --data-path data/mine --save-path runs/mine
""", flush=True)


if __name__ == "__main__":
    main()
