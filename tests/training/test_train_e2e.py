"""The real `deepspeed --num_gpus N --module ochat.training.train` on CPU ranks (gloo, float32).

One module-wide set of runs (a ZeRO-2 2-rank run is the reference for several tests):
loss falls, the checkpoint loads in transformers and generates; 2 ranks x 1 micro-step equals
1 rank x 2 micro-steps over the same packs; a run killed hard mid-epoch and resumed from its
--save-state-every state ends bit-for-bit equal; ZeRO-3 with gradient checkpointing trains and saves a gathered checkpoint.
"""
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["--epochs", "2", "--batch-max-len", "2048", "--lr", "3e-3", "--lr-warmup-steps", "2", "--log-every", "1",
          "--save-every", "1"]


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_train(ranks, model, data, out, *extra, env=None):
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(_port()), "--module", "ochat.training.train",
           "--model-path", model, "--data-path", data, "--save-path", out, *COMMON, *extra]
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    e["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=400, cwd=REPO)


def losses(log):
    return [float(x) for x in re.findall(r"step \d+/\d+ loss ([0-9.]+)", log)]


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data, model = str(root / "data"), str(root / "tiny")
    subprocess.run([sys.executable, "-m", "ochat.data.generate_dataset", "--out-dir", data, "--quiet"], check=True, cwd=REPO)
    from ochat.demo import make_tiny_llama
    make_tiny_llama(model)
    return root, data, model


@pytest.fixture(scope="module")
def zero2_run(setup):
    root, data, model = setup
    out = str(root / "zero2")
    r = deepspeed_train(2, model, data, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


def test_zero2_loss_falls_and_checkpoint_generates(zero2_run):
    out, log = zero2_run
    ls = losses(log)
    assert len(ls) >= 8 and ls[-1] < ls[0] - 1.0, ls
    assert "self-check passed" in log and "eval/loss" in log
    from transformers import AutoModelForCausalLM, AutoTokenizer
    final = os.path.join(out, "final")
    assert {"config.json", "generation_config.json", "model.safetensors", "training_args.json"} <= set(os.listdir(final))
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.eos_token == "<|end_of_turn|>" and tok.eos_token_id == 32000
    hf = AutoModelForCausalLM.from_pretrained(final)
    gen = hf.generate(torch.tensor([[1, 450, 4996]]), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 7)
    assert os.path.isdir(os.path.join(out, "ep_0")) and not any(p.endswith(".tmp") for p in os.listdir(out))


def test_two_ranks_equal_one_rank_with_two_micro_steps(setup, zero2_run):
    root, data, model = setup
    out = str(root / "one_rank")
    r = deepspeed_train(1, model, data, out, "--grad-accum", "2", env={"OCHAT_TEST_VIRTUAL_RANKS": "2"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = weights(os.path.join(zero2_run[0], "final")), weights(os.path.join(out, "final"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def step_tags(out):
    return sorted(d for d in os.listdir(os.path.join(out, "ds_state")) if d.startswith("step"))


def test_resume_after_a_hard_kill_is_bit_for_bit(setup, zero2_run):
    root, data, model = setup
    out = str(root / "killed")
    every = 3
    epoch_of = [int(e) for e in re.findall(r"epoch (\d+) step \d+/\d+ loss", zero2_run[1])]  # per global step
    n_steps = len(epoch_of)
    ends = {g for g in range(1, n_steps + 1) if g == n_steps or epoch_of[g] != epoch_of[g - 1]}  # epoch-end steps

    def newest_state(k):  # global step of the newest DeepSpeed state after step k (mid-epoch or epoch end)
        return max([g for g in range(every, k + 1, every)] + [g for g in ends if g <= k], default=0)

    # the latest kill that is mid-epoch, after a mid-epoch state, with steps to redo after it
    kill = max(k for k in range(1, n_steps - 1) if k not in ends and k % every and newest_state(k) not in ends | {0})
    state = newest_state(kill)
    epoch = epoch_of[state - 1]
    in_epoch = state - sum(1 for e in epoch_of if e < epoch)
    assert 0 < in_epoch < epoch_of.count(epoch) and kill > state, (epoch_of, kill, state)

    r = deepspeed_train(2, model, data, out, "--save-state-every", str(every), env={"OCHAT_TEST_EXIT_AT_STEP": str(kill)})
    assert r.returncode != 0 and not os.path.exists(os.path.join(out, "final")), r.stdout[-3000:] + r.stderr[-3000:]
    assert f"saved DeepSpeed state at epoch {epoch} step-in-epoch {in_epoch} (global step {state})" in r.stdout
    with open(os.path.join(out, "ds_state", "latest")) as fh:
        assert fh.read().strip() == f"step{state}"
    assert len(step_tags(out)) <= 2 and f"step{state}" in step_tags(out), step_tags(out)

    r = deepspeed_train(2, model, data, out, "--resume", "--save-state-every", str(every))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed at epoch {epoch} step-in-epoch {in_epoch} (global step {state})" in r.stdout, r.stdout[-3000:]
    assert len(step_tags(out)) <= 2 and f"step{n_steps}" in step_tags(out), step_tags(out)
    a, b = weights(os.path.join(zero2_run[0], "final")), weights(os.path.join(out, "final"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_zero3_with_checkpointing_trains_and_saves_a_gathered_checkpoint(setup):
    root, data, model = setup
    out = str(root / "zero3")
    r = deepspeed_train(2, model, data, out, "--deepspeed-config", "zero3", "--max-steps", "6",
                        "--gradient-checkpointing")  # non-reentrant per-layer recompute under ZeRO-3
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ls = losses(r.stdout)
    assert ls[-1] < ls[0], ls
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"))
    assert hf.model.embed_tokens.weight.shape == (32001, 64)
    assert hf.generate(torch.tensor([[1, 450]]), max_new_tokens=3, do_sample=False).shape == (1, 5)


def test_user_errors_are_one_line(setup, tmp_path):
    root, data, model = setup
    r = deepspeed_train(1, model, data, str(tmp_path / "o"), "--batch-max-len", "64")
    assert r.returncode != 0
    assert "longer than --batch-max-len" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout
