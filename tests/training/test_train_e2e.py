"""The real `deepspeed --num_gpus N --module ochat.training.train` on CPU ranks (gloo, float32).

One module-wide set of runs (a ZeRO-2 2-rank run is the reference for several tests): the loss falls and the
checkpoint loads in transformers and generates; 2 ranks x 1 micro-step equals 1 rank x 2 micro-steps (the
same slots: the same packs); a run killed hard, or stopped by SIGTERM, and resumed ends bit-for-bit equal; a
resume that would train other packs is refused; a signal to the runner alone stops the ranks; a diverged run
stops without saving; ZeRO-3 with gradient checkpointing trains and saves a gathered checkpoint.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from tests.helpers.hostile import CodeRunningPickle
from tests.helpers.train import metrics, run_trainer, run_trainer_until, weights

pytestmark = pytest.mark.slow


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


@pytest.mark.parametrize("ranks, flags, difference", [(2, ["--batch-max-len", "4096"], "batch_max_len: 2048 -> 4096"),
                                                      (1, ["--grad-accum", "2"], "world_size: 2 -> 1")])
def test_resume_that_would_train_other_packs_is_refused(setup, zero2_run, ranks, flags, difference):
    root, data, model = setup
    r = run_trainer(ranks, model, data, zero2_run[0], "--resume", *flags)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and difference in errors[0], r.stderr[-2000:]
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


# one error of each stage on 2 ranks (the command line, the data, the model and engine); the other messages are
# tested where they are raised (tests/config, test_run_folder, test_preflight)
@pytest.mark.parametrize("flags, message, status", [
    (["--lr", "-1"], "--lr must be a finite number > 0.0 (got -1.0)", 2),
    (["--batch-max-len", "64"], "longer than --batch-max-len 64", 1),
    (["--resume"], "--resume: no resume state under", 1),
])
def test_user_errors_are_one_line_from_one_rank(setup, tmp_path, flags, message, status):
    root, data, model = setup
    r = run_trainer(2, model, data, str(tmp_path / "o"), *flags)
    assert r.returncode == status
    errors = [line for line in r.stderr.splitlines() if line.startswith("ochat.training.train: error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout


def test_sigterm_saves_and_resume_is_bit_for_bit(setup, zero2_run):
    """SIGTERM to the whole job (what Slurm sends) at a random step: every rank finishes the step, the resume state
    is written, one line says how to resume; the resumed run ends bit-for-bit equal to an uninterrupted one."""
    root, data, model = setup
    out = str(root / "sigterm")
    n_steps = len(metrics(zero2_run[0]))
    at = int(np.random.default_rng().integers(2, n_steps - 2))
    status, log = run_trainer_until(f"step {at}/", 2, model, data, out, sig=signal.SIGTERM)
    assert status != 0 and not os.path.exists(os.path.join(out, "final")), log[-3000:]
    stopped = re.findall(r"ochat.training.train: stopped: stopped by SIGTERM after step (\d+); resume state saved", log)
    assert len(stopped) == 1, log[-3000:]
    with open(os.path.join(out, "ds_state", "latest")) as fh:
        assert fh.read().strip() == f"step{stopped[0]}"
    r = run_trainer(2, model, data, out, "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = weights(os.path.join(zero2_run[0], "final")), weights(os.path.join(out, "final"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_signal_to_the_runner_alone_stops_the_ranks(setup, tmp_path):
    """The `deepspeed` runner forwards nothing when it alone is signalled: the ranks notice it is gone, save and
    exit (none is left running)."""
    root, data, model = setup
    out = str(tmp_path / "runner")
    status, log = run_trainer_until("step 2/", 2, model, data, out, sig=signal.SIGTERM, group=False)
    assert "stopped by SIGTERM after step" in log and "resume state saved" in log, log[-3000:]
    assert os.path.exists(os.path.join(out, "ds_state", "latest"))


def test_divergence_stops_the_run_without_saving(setup, tmp_path):
    root, data, model = setup
    out = str(tmp_path / "diverged")
    r = run_trainer(2, model, data, out, "--lr", "1e4")  # what a typo for 1e-4 gives
    assert r.returncode == 1, r.stdout[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "training diverged at step" in errors[0] and "Newest good resume state: none" in errors[0]
    assert [n for n in os.listdir(out) if n != "metrics.jsonl" and not n.startswith(".")] == []


def _copy_run(src: str, dst) -> str:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("final", "ep_*", "wandb"))
    return str(dst)


def test_resuming_a_finished_run_says_so(setup, zero2_run, tmp_path):
    root, data, model = setup
    out = _copy_run(zero2_run[0], tmp_path / "finished")
    r = run_trainer(2, model, data, out, "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "has already trained all its" in r.stdout and "nothing to do. To train further" in r.stdout
    assert "done:" not in r.stdout


def test_a_planted_pickle_in_a_resume_state_never_runs(setup, zero2_run, tmp_path):
    """A payload planted in DeepSpeed's model states, its checksum updated as an attacker would: --resume refuses
    it in one line before it can run."""
    root, data, model = setup
    out = _copy_run(zero2_run[0], tmp_path / "planted")
    states = os.path.join(out, "ds_state")
    first = min(os.listdir(states), key=lambda t: int(t[4:]) if t.startswith("step") else 1 << 30)
    with open(os.path.join(states, "latest"), "w") as fh:
        fh.write(first)  # the state at the end of epoch 0: resuming it loads DeepSpeed's files
    marker = tmp_path / "payload_ran"
    planted = os.path.join(states, first, "mp_rank_00_model_states.pt")
    state = torch.load(planted, weights_only=False)
    state["evil"] = CodeRunningPickle(str(marker))
    torch.save(state, planted)
    run_state = os.path.join(states, first, "run_state.json")
    with open(run_state) as fh:
        saved = json.load(fh)
    saved["files"]["mp_rank_00_model_states.pt"] = hashlib.sha256(open(planted, "rb").read()).hexdigest()
    with open(run_state, "w") as fh:
        json.dump(saved, fh)
    r = run_trainer(2, model, data, out, "--resume")
    assert r.returncode == 1 and not marker.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("ochat.training.train: error:")]
    assert len(errors) == 1 and "would run code to load" in errors[0] and "refused" in errors[0], r.stderr[-2000:]



def test_a_bad_row_ends_every_rank_within_seconds(setup, tmp_path):
    """A row whose weights are shorter than its tokens (it once hung a 2-rank job for minutes in a DataLoader
    worker): refused when the dataset opens, one line naming the file and the row, every rank gone."""
    root, data, model = setup
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    with pa.OSFile(str(bad / "train.arrow"), "rb") as source:  # read into memory, not mapped: rewritten below
        table = pa.ipc.open_file(source).read_all()
    weights = table.column("weights").to_pylist()
    weights[7] = weights[7][:-3]
    table = table.set_column(table.schema.get_field_index("weights"), table.schema.field("weights"),
                             pa.array(weights, type=table.schema.field("weights").type))
    with pa.OSFile(str(bad / "train.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    t0 = time.time()
    r = run_trainer(2, model, str(bad), str(tmp_path / "o"))
    assert r.returncode == 1 and time.time() - t0 < 90, r.stderr[-3000:]  # startup included; no wait for a hang
    errors = [line for line in r.stderr.splitlines() if line.startswith("ochat.training.train: error:")]
    assert len(errors) == 1 and "train.arrow: row 7: `length` is" in errors[0], r.stderr[-2000:]
