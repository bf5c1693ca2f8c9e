import json

import pytest

from ochat.config.deepspeed import DEEPSPEED_CONFIGS, load_deepspeed_config
from ochat.config.errors import ConfigError
from ochat.config.train_config import TrainConfig, build_parser, parse_args
from ochat.model.transforms import ModelTransforms
from ochat.training.train import main

BASE = ["--model-path", "m", "--data-path", "d", "--save-path", "s"]


def error_of(argv, capsys) -> str:
    """What the trainer's command prints for a bad command line: exactly one line on stderr, exit code 2."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert captured.err.startswith("ochat.training.train: error: ")
    return captured.err


def test_dash_and_underscore_spellings():
    a = parse_args(BASE + ["--lr-min-ratio", "0.2", "--batch-max-len", "4096", "--grad-accum", "4", "--resume"])
    b = parse_args(["--model_path", "m", "--data_path", "d", "--save_path", "s", "--lr_min_ratio", "0.2",
                    "--batch_max_len", "4096", "--grad_accum", "4", "--resume"])
    assert a == b and a.lr_min_ratio == 0.2 and a.batch_max_len == 4096 and a.resume


def test_gradient_checkpointing_flag_alone_or_with_a_fraction():
    assert parse_args(BASE).gradient_checkpointing == 0.0
    assert parse_args(BASE + ["--gradient-checkpointing"]).gradient_checkpointing == 1.0
    assert parse_args(BASE + ["--gradient_checkpointing", "0.5", "--resume"]).gradient_checkpointing == 0.5
    assert parse_args(BASE + ["--gradient-checkpointing", "--resume"]).resume
    for word in ("auto", "selective", "selective-attention"):
        cfg = parse_args(BASE + ["--gradient-checkpointing", word])
        assert cfg.gradient_checkpointing == word == cfg.transforms.recompute


def test_defaults():
    c = parse_args(BASE)
    assert (c.epochs, c.lr, c.lr_min_ratio, c.weight_decay, c.beta1, c.beta2, c.eps) == (5, 2e-5, 0.1, 0.1, 0.9, 0.95, 1e-5)
    assert c.deepspeed_config == "zero2" and c.grad_clip == 1.0 and c.save_state_every is None
    assert not c.wandb_enabled


@pytest.mark.parametrize("flags, message", [
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--epoch", "2"], "unrecognized arguments: --epoch"),
    (["--lr"], "expected one argument"),
    (["--batch-max-len", "8", "--batch-size-per-gpu", "2"], "give --batch-max-len or --batch-size-per-gpu, not both"),
    (["--dtype", "fp16"], "invalid choice: 'fp16' (choose from 'auto', 'bf16', 'float32')"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--attn-impl", "flash"], "invalid choice: 'flash' (choose from 'auto', 'flash_attn_4', 'flash_attn', 'torch_varlen', 'sdpa')"),
    (["--wandb-mode", "off"], "invalid choice: 'off'"),
    (["--lr", "-1"], "--lr must be a finite number > 0.0 (got -1.0)"),
    (["--lr", "nan"], "--lr must be a finite number > 0.0 (got nan)"),
    (["--lr", "inf"], "--lr must be a finite number > 0.0 (got inf)"),
    (["--epochs", "0"], "--epochs must be a finite number >= 1 (got 0)"),
    (["--batch-max-len", "0"], "--batch-max-len must be a finite number >= 1 (got 0)"),
    (["--log-every", "0"], "--log-every must be a finite number >= 1 (got 0)"),
    (["--save-state-every", "0"], "--save-state-every must be a finite number >= 1 (got 0)"),
    (["--gradient-checkpointing", "1.5"], "--gradient-checkpointing must be a finite number >= 0.0 and <= 1.0 (got 1.5)"),
    (["--lr-min-ratio", "2"], "--lr-min-ratio must be a finite number >= 0.0 and <= 1.0 (got 2.0)"),
    (["--deepspeed-config", "zero4"], "--deepspeed-config 'zero4' is neither one of zero2, zero3, zero3_offload nor a file"),
    (["--sequence-parallel", "0"], "--sequence-parallel must be a finite number >= 1 (got 0)"),
    (["--tiled-mlp", "0"], "--tiled-mlp must be a finite number >= 1 (got 0)"),
    (["--offload-activations"], "--offload-activations moves the inputs of checkpointed layers to CPU memory: add "
                                "--gradient-checkpointing"),
    (["--compile", "--sequence-parallel", "2"], "--compile compiles whole decoder layers, which --sequence-parallel, "
                                                "--tiled-mlp and --offload-activations change"),
    (["--compile", "--tiled-mlp", "4"], "--compile compiles whole decoder layers"),
    (["--lora-trainable-tokens", "7"], "--lora-trainable-tokens trains embedding and lm_head rows beside LoRA "
                                       "adapters: add --lora-rank"),
    (["--lora-rank", "4", "--lora-trainable-tokens", "7,,8"], "--lora-trainable-tokens '7,,8': an empty item"),
])
def test_bad_values_are_one_line_errors_naming_the_flag(flags, message, capsys):
    assert message in error_of(BASE + flags, capsys)


def test_lora_trainable_tokens_are_ids_and_token_strings():
    cfg = parse_args(BASE + ["--lora-rank", "4", "--lora-trainable-tokens", "<|end_of_turn|>, 32000,<|im_end|>"])
    assert cfg.transforms.lora_trainable_tokens == ("<|end_of_turn|>", 32000, "<|im_end|>")
    assert parse_args(BASE).transforms.lora_trainable_tokens == ()


def test_required_flags(capsys):
    assert "the following arguments are required: --model-path" in error_of(["--data-path", "d", "--save-path", "s"],
                                                                             capsys)


def test_help_shows_every_default():
    text = " ".join(build_parser().format_help().split())
    assert "(default: 2e-05)" in text and "(default: zero2)" in text and "(default: 42)" in text
    assert "--local-rank" not in text and "--local_rank" not in text
    assert "else no logging (default: None)" not in text and "(default: None)" in text  # a stated default: once


def test_run_file_with_flags_overriding_it(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("model-path: m\ndata_path: d\nsave-path: s\nlr: 2e-5\nepochs: 3\ngradient_checkpointing: 0.5\n"
                   "resume: true\nattn-impl: sdpa\n")
    c = parse_args(["--config", str(run), "--epochs", "7"])
    assert (c.model_path, c.lr, c.epochs, c.gradient_checkpointing, c.resume, c.attn_impl) == ("m", 2e-5, 7, 0.5, True,
                                                                                              "sdpa")
    assert isinstance(c.lr, float)


def test_resolved_config_reads_back_as_a_run_file(tmp_path):
    c = parse_args(BASE + ["--lr", "1e-4", "--gradient-checkpointing", "--max-steps", "9"])
    (tmp_path / "train_config.json").write_text(c.to_json())
    assert parse_args(["--config", str(tmp_path / "train_config.json")]) == c


@pytest.mark.parametrize("text, message", [
    ("lr: 1e-4\nbogus: 1\n", "unknown key 'bogus'"),
    ("lr: fast\n", "lr: 'fast' is not a float"),
    ("dtype: fp16\n", "dtype: 'fp16' is not one of auto, bf16, float32"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_run_files(tmp_path, capsys, text, message):
    run = tmp_path / "run.yaml"
    run.write_text(text)
    assert message in error_of(BASE + ["--config", str(run)], capsys)


def test_every_field_has_help():
    import dataclasses
    assert all(f.metadata.get("help") for f in dataclasses.fields(TrainConfig))


@pytest.mark.parametrize("name", sorted(DEEPSPEED_CONFIGS))
def test_shipped_deepspeed_configs(name):
    ds = load_deepspeed_config(name, grad_accum=3, grad_clip=1.0, bf16=True)
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True
    assert ds["train_micro_batch_size_per_gpu"] == 1
    assert "auto" not in json.dumps(ds)
    assert ds["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)


def test_the_gradient_scan_for_skipping_steps_is_on_only_when_skips_are_tolerated(tmp_path):
    assert load_deepspeed_config("zero2", grad_accum=1, grad_clip=1.0, bf16=True)["bf16"]["check_grad_overflow"] is False
    assert load_deepspeed_config("zero2", grad_accum=1, grad_clip=1.0, bf16=True,
                                 skip_nonfinite_steps=True)["bf16"]["check_grad_overflow"] is True
    (tmp_path / "ds.json").write_text(json.dumps({"bf16": {"enabled": True, "check_grad_overflow": True},
                                                  "zero_optimization": {"stage": 2}}))
    assert load_deepspeed_config(str(tmp_path / "ds.json"), grad_accum=1, grad_clip=1.0,
                                 bf16=True)["bf16"]["check_grad_overflow"] is True  # the user's setting stays


def test_long_context_flags_reach_the_deepspeed_config():
    c = parse_args(BASE + ["--sequence-parallel", "4", "--tiled-mlp", "8", "--offload-activations",
                           "--gradient-checkpointing"])
    assert (c.sequence_parallel, c.tiled_mlp, c.offload_activations) == (4, 8, True)
    ds = load_deepspeed_config("zero3", grad_accum=1, grad_clip=1.0, bf16=True,
                               transforms=ModelTransforms(sequence_parallel=4, offload_activations=True, recompute=1.0))
    assert ds["sequence_parallel_size"] == 4 and ds["activation_checkpointing"] == {"cpu_checkpointing": True}
    plain = load_deepspeed_config("zero3", grad_accum=1, grad_clip=1.0, bf16=True)
    assert "sequence_parallel_size" not in plain and "activation_checkpointing" not in plain


def test_sequence_parallelism_refuses_zero_without_reduce_scatter(tmp_path):
    ds = json.loads(open(DEEPSPEED_CONFIGS["zero3"]).read())
    ds["zero_optimization"]["reduce_scatter"] = False
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="--sequence-parallel needs ZeRO's reduce_scatter"):
        load_deepspeed_config(str(tmp_path / "ds.json"), grad_accum=1, grad_clip=1.0, bf16=True,
                              transforms=ModelTransforms(sequence_parallel=2))
    assert load_deepspeed_config(str(tmp_path / "ds.json"), grad_accum=1, grad_clip=1.0, bf16=True)


def test_compile_refuses_zero3():
    with pytest.raises(ConfigError, match="--deepspeed-config zero3: --compile needs ZeRO stage 2 or lower"):
        load_deepspeed_config("zero3", grad_accum=1, grad_clip=1.0, bf16=True, transforms=ModelTransforms(compile=True))
    assert load_deepspeed_config("zero2", grad_accum=1, grad_clip=1.0, bf16=True, transforms=ModelTransforms(compile=True))


def test_bf16_master_weights_reach_deepspeed_and_are_refused_where_they_cannot_run():
    assert parse_args(BASE).master_dtype == "float32"
    assert parse_args(BASE + ["--master-dtype", "bf16"]).master_dtype == "bf16"
    bf16 = load_deepspeed_config("zero2", grad_accum=1, grad_clip=1.0, bf16=True, bf16_master=True)["bf16"]
    assert bf16["bf16_master_weights_and_grads"] is True and bf16["bf16_optimizer_states"] is True
    assert "bf16_master_weights_and_grads" not in load_deepspeed_config("zero2", grad_accum=1, grad_clip=1.0,
                                                                        bf16=True)["bf16"]
    for name, bf16_run, transforms, why in [
            ("zero2", False, ModelTransforms(), "it needs a bf16 run"),
            ("zero3_offload", True, ModelTransforms(), "CPU Adam in float32"),
            ("zero2", True, ModelTransforms(lora_rank=8), "LoRA's optimizer holds only the adapters")]:
        with pytest.raises(ConfigError, match=f"--master-dtype bf16 with --deepspeed-config {name} is refused: .*{why}"):
            load_deepspeed_config(name, grad_accum=1, grad_clip=1.0, bf16=bf16_run, transforms=transforms,
                                  bf16_master=True)
