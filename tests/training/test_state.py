"""TrainState's one counting rule and RunSettings' comparison (the DeepSpeed side runs in test_train_e2e)."""
import numpy as np

from ochat.training.state import RunSettings, TrainState


def test_advance_moves_to_the_next_epoch_after_its_last_step():
    s = TrainState()
    for _ in range(3):
        s.advance(steps_in_epoch=3)
    assert (s.epoch, s.step_in_epoch, s.global_step) == (1, 0, 3)
    s.advance(steps_in_epoch=2)
    assert (s.epoch, s.step_in_epoch, s.global_step) == (1, 1, 4)


def settings(**kw):
    base = dict(dataset="abc", batch_max_len=2048, world_size=2, slots=4, seed=42, epochs=2, total_steps=10, warmup_steps=1)
    return RunSettings(**{**base, **kw})


def test_differences_name_each_changed_setting():
    assert settings().differences(settings()) == []
    assert settings(batch_max_len=4096, seed=1).differences(settings()) == ["batch_max_len: 2048 -> 4096", "seed: 42 -> 1"]
    assert settings().differences(settings(expert_parallel=2)) == ["expert_parallel: 2 -> 1"]


def test_dataset_fingerprint_follows_lengths_and_tokenizer():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 4096, 1000)
    fp = RunSettings.dataset_fingerprint(lengths, "sha")
    assert fp == RunSettings.dataset_fingerprint(lengths.astype(np.int32), "sha")
    other = lengths.copy()
    other[17] += 1
    assert RunSettings.dataset_fingerprint(other, "sha") != fp
    assert RunSettings.dataset_fingerprint(lengths, "other") != fp
