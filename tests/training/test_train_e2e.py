"""The real `deepspeed --num_gpus N --module ochat.training.train` on CPU ranks (gloo, float32).

One module-wide set of runs (a ZeRO-2 2-rank run is the reference for several tests): the loss falls and the
checkpoint loads in transformers and generates; 2 ranks x 1 micro-step equals 1 rank x 2 micro-steps (the
same slots: the same packs); a run killed hard and resumed ends bit-for-bit equal; a resume that would train
other packs is refused; ZeRO-3 with gradient checkpointing trains and saves a gathered checkpoint.
"""
import os
import re

import pytest
import torch

from tests.helpers.train import make_sample_dataset, metrics, run_trainer, run_trainer_until, weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data, model = make_sample_dataset(str(root / "data")), str(root / "tiny")
    from ochat.demo import make_tiny_llama
    make_tiny_llama(model)
    return root, data, model


@pytest.fixture(scope="module")
def zero2_run(setup):
    root, data, model = setup
    out = str(root / "zero2")
    r = run_trainer(2, model, data, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


def test_zero2_loss_falls_and_checkpoint_generates(zero2_run):
    out, log = zero2_run
    ls = [m["loss"] for m in metrics(out)]
    assert len(ls) >= 8 and ls[-1] < ls[0] - 1.0, ls
    assert [m["step"] for m in metrics(out)] == list(range(1, len(ls) + 1))
    assert "self-check passed" in log and "eval/loss" in log
    from transformers import AutoModelForCausalLM, AutoTokenizer
    final = os.path.join(out, "final")
    assert {"config.json", "generation_config.json", "model.safetensors", "train_config.json"} <= set(os.listdir(final))
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.eos_token == "<|end_of_turn|>" and tok.eos_token_id == 32000
    hf = AutoModelForCausalLM.from_pretrained(final)
    gen = hf.generate(torch.tensor([[1, 450, 4996]]), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 7)
    assert os.path.isdir(os.path.join(out, "ep_0")) and not any(p.endswith(".tmp") for p in os.listdir(out))


def test_two_ranks_equal_one_rank_with_two_micro_steps(setup, zero2_run):
    root, data, model = setup
    out = str(root / "one_rank")
    r = run_trainer(1, model, data, out, "--grad-accum", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = weights(os.path.join(zero2_run[0], "final")), weights(os.path.join(out, "final"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    la, lb = ([m["loss"] for m in metrics(o)] for o in (zero2_run[0], out))
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=0)


def test_resume_after_a_hard_kill_is_bit_for_bit(setup, zero2_run):
    root, data, model = setup
    out = str(root / "killed")
    status, log = run_trainer_until("(global step 3)", 2, model, data, out, "--save-state-every", "3")
    assert status != 0 and not os.path.exists(os.path.join(out, "final")), log[-3000:]
    saved = int(re.findall(r"saved DeepSpeed state at .*\(global step (\d+)\)", log)[-1])

    r = run_trainer(2, model, data, out, "--resume", "--save-state-every", "3")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(rf"resumed at epoch \d+ step-in-epoch \d+ \(global step {saved}\)", r.stdout), r.stdout[-3000:]
    states = [d for d in os.listdir(os.path.join(out, "ds_state")) if d.startswith("step")]
    assert len(states) <= 2, states
    a, b = weights(os.path.join(zero2_run[0], "final")), weights(os.path.join(out, "final"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(zero2_run[0])]


def test_resume_that_would_train_other_packs_is_refused(setup, zero2_run, tmp_path):
    root, data, model = setup
    r = run_trainer(2, model, data, zero2_run[0], "--resume", "--batch-max-len", "4096")
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "batch_max_len: 2048 -> 4096" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout


def test_zero3_with_checkpointing_trains_and_saves_a_gathered_checkpoint(setup):
    root, data, model = setup
    out = str(root / "zero3")
    r = run_trainer(2, model, data, out, "--deepspeed-config", "zero3", "--max-steps", "6", "--gradient-checkpointing")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ls = [m["loss"] for m in metrics(out)]
    assert ls[-1] < ls[0], ls
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"))
    assert hf.model.embed_tokens.weight.shape == (32001, 64)
    assert hf.generate(torch.tensor([[1, 450]]), max_new_tokens=3, do_sample=False).shape == (1, 5)


@pytest.mark.parametrize("flags, message", [
    (["--batch-max-len", "64"], "longer than --batch-max-len 64"),
    (["--attn-impl", "flash_attn"], "--attn-impl flash_attn: attention backend 'flash_attn' is not available"),
])
def test_user_errors_are_one_line_from_one_rank(setup, tmp_path, flags, message):
    root, data, model = setup
    r = run_trainer(2, model, data, str(tmp_path / "o"), *flags)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("ochat.training.train: error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout
