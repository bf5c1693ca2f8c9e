"""The run folder: who may write --save-path, what --overwrite deletes (never through a link), the lock, the
disk-space preflight, and the pruning of resume states (saving and resuming run in test_train_e2e)."""
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from ochat.config.train_config import TrainConfig
from ochat.training.run_folder import LOCK, RunFolder, _prune_states, previous_run_outputs
from ochat.training.runtime import TrainError
from tests.helpers.hostile import CodeRunningPickle


def config(tmp_path, **kw):
    return TrainConfig(model_path="m", data_path="d", save_path=str(tmp_path / "run"), **kw)


def test_previous_run_outputs_are_checkpoints_and_states_only(tmp_path):
    run = tmp_path / "run"
    for name in ("ep_0", "ep_12", "final", "ds_state", "src", "ep_x", "final2"):
        (run / name).mkdir(parents=True)
    for name in ("metrics.jsonl", "notes.txt"):
        (run / name).write_text("")
    assert previous_run_outputs(str(run)) == ["ds_state", "ep_0", "ep_12", "final"]


def test_a_run_that_saved_nothing_does_not_block_the_same_command(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')  # a failed or --no-save run
    RunFolder.open(config(tmp_path)).close()
    assert sorted(os.listdir(run)) == ["metrics.jsonl"]  # the lock goes with the run


def test_overwrite_deletes_only_the_previous_runs_outputs(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "ds_state").mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match=r"holds a previous run \(ds_state, final\)"):
        RunFolder.open(config(tmp_path))
    folder = RunFolder.open(config(tmp_path, overwrite=True))
    assert sorted(os.listdir(run)) == [LOCK, "notes.txt"]
    folder.close()


def test_overwrite_never_deletes_through_a_symbolic_link(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / "final").symlink_to(foreign)
    with pytest.raises(TrainError, match="is a symbolic link; ochat does not delete through links"):
        RunFolder.open(config(tmp_path, overwrite=True))
    assert (foreign / "precious.txt").read_text() == "keep" and (run / "final").is_symlink()


def test_a_save_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(TrainError, match=r"--save-path .*run is a file, not a folder"):
        RunFolder.open(config(tmp_path))


def test_two_runs_cannot_write_one_save_path(tmp_path):
    held = RunFolder.open(config(tmp_path))
    with pytest.raises(TrainError, match="is being written by another run"):
        RunFolder.open(config(tmp_path))
    held.close()
    RunFolder.open(config(tmp_path)).close()


def test_the_lock_of_a_killed_run_is_taken_over_with_a_note(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (run / LOCK).write_text(str(killed.pid))
    killed.kill()
    killed.wait()
    folder = RunFolder.open(config(tmp_path))
    assert f"was left by process {killed.pid}, which has ended: taken over" in capsys.readouterr().out
    assert (run / LOCK).read_text() == str(os.getpid())
    folder.close()
    assert not (run / LOCK).exists()


def test_disk_space_for_a_checkpoint_and_the_states_kept(tmp_path):
    folder = RunFolder.open(config(tmp_path))
    folder.check_disk_space(1_000_000, bf16=True)
    with pytest.raises(TrainError, match=r"a checkpoint plus 3 resume states .* need about .* GiB: free space, "
                                         r"choose another folder, or pass --no-save"):
        folder.check_disk_space(10**15, bf16=True)
    # LoRA: the states and final/ hold the adapters, the whole model only when merged (Qwen3-30B-A3B's 30.5B
    # parameters: 1.3 TB for full fine-tuning, about 30 GB for its 0.64B rank-16 adapters)
    free = shutil.disk_usage(tmp_path).free
    folder.check_disk_space(free // 2, bf16=True, adapters=free // 200)
    with pytest.raises(TrainError, match="need about"):
        folder.check_disk_space(free // 2 + 1, bf16=True, adapters=free // 200, merged=True)
    folder.close()


def test_pruning_keeps_the_newest_states_below_the_new_one(tmp_path):
    for step in (2, 4, 6, 9):  # step9: a state of an earlier run in this folder that `latest` no longer names
        (tmp_path / f"step{step}").mkdir()
    (tmp_path / "notes").mkdir()
    _prune_states(str(tmp_path), "step6")
    assert sorted(os.listdir(tmp_path)) == ["notes", "step4", "step6"]


# ---------------------------------------------------------------- resume states: checksums, fallback, safe loading
SETTINGS = dict(dataset="abc", batch_max_len=64, world_size=1, slots=1, seed=1, epochs=1, total_steps=9, warmup_steps=0)


def _fake_state(d, step, payload=b"weights", **changed):
    """A state folder as save_state writes it (DeepSpeed's files faked), its checksums recorded; `changed`: its
    settings that are not SETTINGS (a state saved before a setting existed lacks it)."""
    from ochat.training.run_folder import RUN_STATE, _checksums
    folder = d / f"step{step}"
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(payload)
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(payload * 2)
    settings = {**SETTINGS, **changed}
    files = _checksums(str(folder), sorted(os.listdir(folder)))
    (folder / RUN_STATE).write_text(json.dumps({"train_state": {"epoch": 0, "step_in_epoch": step, "global_step": step,
                                                                "last_checkpoint": None},
                                                "run_settings": settings, "files": files}))
    (d / "latest").write_text(f"step{step}")
    return folder


@pytest.fixture
def states(tmp_path):
    d = tmp_path / "run" / "ds_state"
    _fake_state(d, 2)
    newest = _fake_state(d, 4)
    return RunFolder(config(tmp_path)), newest


def test_a_whole_state_is_resumed(states):
    folder, newest = states
    state, settings = folder.latest()
    assert state.global_step == 4 and settings.total_steps == 9 and folder.last_state == str(newest)
    assert settings.expert_parallel == 1  # a state without the setting: saved before expert-parallel states existed


def test_a_resume_with_another_expert_parallel_size_is_refused_in_one_line(tmp_path):
    from ochat.training.state import RunSettings
    from ochat.training.train import _resume
    _fake_state(tmp_path / "run" / "ds_state", 2, world_size=4, expert_parallel=2)
    with pytest.raises(TrainError) as e:
        _resume(RunFolder(config(tmp_path)), RunSettings(**{**SETTINGS, "world_size": 4, "expert_parallel": 4}))
    assert "--resume: the saved run differs (expert_parallel: 2 -> 4)" in str(e.value) and "\n" not in str(e.value)


def test_each_rank_checksums_the_files_it_wrote(monkeypatch):
    from ochat.training import run_folder
    monkeypatch.setattr(run_folder, "world_size", lambda: 4)
    names = ["zero_pp_rank_3_mp_rank_00_optim_states.pt", "expert_shards_ep_rank_1.safetensors",
             "mp_rank_00_model_states.pt", "run_state.json"]
    assert [run_folder._owner(n) for n in names] == [3, 1, 0, 0]


def test_planted_expert_shards_never_run(tmp_path, monkeypatch):
    """An expert-shards file that is a pickle: refused in one line, nothing in it runs (safetensors holds tensors
    only)."""
    import torch

    from ochat.model import expert_parallel
    from ochat.training.run_folder import _expert_shards_file
    folder = RunFolder(config(tmp_path, expert_parallel=2))
    folder.bind(SimpleNamespace(module=torch.nn.Linear(1, 1)), tokenizer=None, chat_format=None, settings=None)
    folder._resume_tag = "step2"
    planted = _expert_shards_file(os.path.join(folder.states_dir, "step2"), 1)
    os.makedirs(os.path.dirname(planted))
    marker = tmp_path / "ran"
    torch.save({"model.layers.0.mlp.experts.down_proj": CodeRunningPickle(str(marker))}, planted)
    monkeypatch.setattr(expert_parallel, "ranks", lambda size: (1, 0))
    with pytest.raises(TrainError, match=r"--resume: .*expert_shards_ep_rank_1.safetensors: .*only states ochat "
                                         r"wrote can be resumed"):
        folder._load_expert_shards()
    assert not marker.exists()


@pytest.mark.parametrize("damage, problem", [
    (lambda f: _xor_inside(f / "zero_pp_rank_0_mp_rank_00_optim_states.pt"), "differs from the checksum recorded"),
    (lambda f: (f / "mp_rank_00_model_states.pt").unlink(), "mp_rank_00_model_states.pt missing"),
    (lambda f: (f / "run_state.json").write_text('{"train_state": {"epo'), "run_state.json unreadable"),
    (lambda f: shutil.rmtree(f), "run_state.json missing"),  # `latest` names a state that is gone
])
def test_a_damaged_newest_state_falls_back_to_the_newest_whole_one(states, capsys, damage, problem):
    folder, newest = states
    damage(newest)
    state, _ = folder.latest()
    out = capsys.readouterr().out
    assert state.global_step == 2 and folder.last_state.endswith("step2")
    assert f"resume state {newest} is not usable: " in out and problem in out
    assert f"resume state {newest} is damaged or incomplete: resuming from" in out


def test_no_whole_state_is_one_line(states):
    folder, newest = states
    for f in newest.parent.glob("step*"):
        _xor_inside(f / "mp_rank_00_model_states.pt")
    with pytest.raises(TrainError, match="--resume: no whole resume state under .* start again with --overwrite"):
        folder.latest()


def _xor_inside(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))



def test_a_state_file_that_would_run_code_is_refused(tmp_path):
    import torch

    from ochat.training.safe_states import UnsafeState, load_state_file
    marker = tmp_path / "ran"
    planted = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "evil": CodeRunningPickle(str(marker))}, planted)
    with pytest.raises(UnsafeState, match="would run code to load .*: refused"):
        load_state_file(str(planted))
    assert not marker.exists()
    honest = tmp_path / "honest.pt"
    torch.save({"module": {"w": torch.ones(2)}, "global_steps": 3}, honest)
    assert load_state_file(str(honest))["global_steps"] == 3


def test_disk_full_while_saving_a_state_is_one_line_naming_the_newest_good_state(tmp_path):
    class FullDisk:
        def save_checkpoint(self, d, tag, save_latest, exclude_frozen_parameters=False):
            raise OSError(28, "No space left on device")

    from ochat.training.state import TrainState
    folder = RunFolder(config(tmp_path))
    folder.bind(FullDisk(), tokenizer=None, chat_format=None, settings=None)
    folder.last_state = "run/ds_state/step4"
    with pytest.raises(TrainError, match=r"cannot write the resume state .*step6: No space left on device. The newest "
                                         r"good state is run/ds_state/step4: free space and run again with --resume"):
        folder.save_state(TrainState(global_step=6))
