"""StopRequest: signals become a stop after the current step; a second Ctrl-C aborts at once. init_distributed on
CPU ranks leaves no DeepSpeed shared-memory buffer behind and the ranks still communicate."""
import os
import signal
import subprocess
import sys

import pytest

from tests.helpers.train import REPO

CHILD = r'''
import os, signal, sys, time
from ochat.training.runtime import StopRequest
stop = StopRequest(watch_launcher=False)
print("ready", stop.requested(), flush=True)
sys.stdin.readline()
print("after first", stop.requested(), stop.exit_status, flush=True)
sys.stdin.readline()
print("after second", stop.requested(), stop.exit_status, flush=True)
time.sleep(5)
print("still running", flush=True)
'''


def run_child(first: int, second: int):
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.stdout.readline().split() == ["ready", "False"]
    proc.send_signal(first)
    proc.stdin.write("\n")
    proc.stdin.flush()
    first_line = proc.stdout.readline()  # the first signal was handled: the second is not merged into it
    proc.send_signal(second)
    proc.stdin.write("\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=30)
    return proc.returncode, first_line + out, err


def test_sigterm_twice_asks_once_and_does_not_abort():
    code, out, _ = run_child(signal.SIGTERM, signal.SIGTERM)
    assert out.splitlines()[:3] == ["after first True 143", "after second True 143", "still running"] and code == 0


def test_a_second_ctrl_c_aborts_at_once():
    code, out, err = run_child(signal.SIGINT, signal.SIGINT)
    assert out.splitlines()[0] == "after first True 130" and "still running" not in out
    assert code == 130 and "interrupted again: exiting without saving" in err


RANKS_WORKER = r"""
import os, sys
import torch, torch.distributed as dist
from ochat.training.runtime import init_distributed
init_distributed(cuda=False)
prefix = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_"
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
dist.barrier()
left = [r for r in range(2) if os.path.exists(prefix + str(r))]
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.txt"), "w") as f:
    f.write(f"sum {float(t)} left {left}")
"""


def test_cpu_ranks_communicate_without_deepspeeds_shared_memory_op(tmp_path):
    """Under DeepSpeed's launcher (LOCAL_SIZE set) DeepSpeed's own init would compile its shared-memory op and leave a
    buffer per rank in /dev/shm; ochat's init_distributed uses gloo alone: no buffer, and the ranks communicate."""
    worker = tmp_path / "worker.py"
    worker.write_text(RANKS_WORKER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(worker), str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=REPO, LOCAL_SIZE="2"))
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "sum 3.0 left []"


PORT_WORKER = r"""
import os, socket, sys
from ochat.training.runtime import TrainError, init_distributed
held = socket.socket()
held.bind(("127.0.0.1", 0))
held.listen()
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(held.getsockname()[1]))
try:
    init_distributed(cuda=False)
    print("started")
except TrainError as e:
    print(e)
"""


def test_a_port_in_use_is_one_line_saying_how_to_pick_another():
    r = subprocess.run([sys.executable, "-c", PORT_WORKER], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=REPO))
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("port ") and "is in use (another run on this machine?)" in line, r.stdout + r.stderr
    assert "deepspeed --master_port" in line


def test_weights_and_biases_without_a_login_is_one_line(tmp_path, monkeypatch):
    from ochat.config.train_config import TrainConfig
    from ochat.model.config import ModelConfig
    from ochat.training.metrics import ProgressLog
    from ochat.training.runtime import TrainError
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no saved login
    monkeypatch.setenv("WANDB_MODE", "online")
    cfg = TrainConfig(model_path="m", data_path="d", save_path=str(tmp_path), wandb_project="demo")
    with pytest.raises(TrainError, match=r"Weights & Biases: .*Log in with `wandb login`, or log locally with "
                                         r"--wandb-mode offline"):
        ProgressLog(cfg, ModelConfig.debug(), metrics_path=str(tmp_path / "metrics.jsonl"), world_size=1,
                    device="cpu", total_steps=1)
