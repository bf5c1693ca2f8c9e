import json

import pytest

from ochat.config.train_config import DEEPSPEED_CONFIGS, load_deepspeed_config, parse_args

BASE = ["--model-path", "m", "--data-path", "d", "--save-path", "s"]


def test_dash_and_underscore_spellings():
    a = parse_args(BASE + ["--lr-min-ratio", "0.2", "--batch-max-len", "4096", "--grad-accum", "4", "--resume"])
    b = parse_args(["--model_path", "m", "--data_path", "d", "--save_path", "s", "--lr_min_ratio", "0.2",
                    "--batch_max_len", "4096", "--grad_accum", "4", "--resume"])
    assert a == b and a.lr_min_ratio == 0.2 and a.batch_max_len == 4096 and a.resume


def test_save_state_every():
    assert parse_args(BASE).save_state_every is None
    assert parse_args(BASE + ["--save-state-every", "500"]).save_state_every == 500
    assert parse_args(BASE + ["--save_state_every", "500"]) == parse_args(BASE + ["--save-state-every", "500"])
    for bad in (["--save-state-every", "0"], ["--save-state-every", "x"], ["--save-state-every"]):
        with pytest.raises(SystemExit) as e:
            parse_args(BASE + bad)
        assert e.value.code != 0


def test_gradient_checkpointing_flag_alone_or_with_a_fraction():
    assert parse_args(BASE).gradient_checkpointing == 0.0
    assert parse_args(BASE + ["--gradient-checkpointing"]).gradient_checkpointing == 1.0
    assert parse_args(BASE + ["--gradient_checkpointing", "0.5", "--resume"]).gradient_checkpointing == 0.5
    assert parse_args(BASE + ["--gradient-checkpointing", "--resume"]).resume
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--gradient-checkpointing", "1.5"])


def test_defaults_match_the_issue():
    c = parse_args(BASE)
    assert (c.epochs, c.lr, c.lr_min_ratio, c.weight_decay, c.beta1, c.beta2, c.eps) == (5, 2e-5, 0.1, 0.1, 0.9, 0.95, 1e-5)
    assert c.deepspeed_config == "zero2" and c.grad_clip == 1.0


@pytest.mark.parametrize("argv", [BASE + ["--bogus", "1"], BASE + ["--lr"], ["--data-path", "d"],
                                  BASE + ["--batch-max-len", "8", "--batch-size-per-gpu", "2"], BASE + ["--epoch", "2"]])
def test_bad_command_lines_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code != 0


@pytest.mark.parametrize("name", sorted(DEEPSPEED_CONFIGS))
def test_shipped_deepspeed_configs(name):
    ds = load_deepspeed_config(name, grad_accum=3, grad_clip=1.0, bf16=True)
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True
    assert ds["train_micro_batch_size_per_gpu"] == 1
    assert "auto" not in json.dumps(ds)
    assert ds["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)
