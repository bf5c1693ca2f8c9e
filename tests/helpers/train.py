"""Running the real trainer from tests: a tiny Llama and the bundled sample, trained on CPU ranks (gloo, float32)."""
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A guard against hangs, not a speed check: a loaded 2-core machine runs a tiny training several times slower.
RUN_TIMEOUT = 1200
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


def trainer_command(ranks: int, model: str, data: str, out: str, *extra: str, runner: bool = False) -> list[str]:
    """DeepSpeed's launcher starting `--module ochat.training.train` on `ranks` CPU ranks with the tests' common
    flags (later flags win): what `deepspeed --num_gpus N` runs on one machine, without the runner's own process
    (its imports and exit cost each launch about 6 s on 2 cores) unless `runner`."""
    port = _port()
    if runner:
        launch = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port)]
    else:
        world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(ranks))}).encode()).decode()
        launch = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
                  "--master_addr=127.0.0.1", f"--master_port={port}"]
    return [*launch, "--module", "ochat.training.train", "--model-path", model, "--data-path", data, "--save-path",
            out, *COMMON, *extra]


def run_trainer(ranks: int, model: str, data: str, out: str, *extra: str, timeout: int = RUN_TIMEOUT):
    return subprocess.run(trainer_command(ranks, model, data, out, *extra), env=_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def run_trainer_until(line_part: str, ranks: int, model: str, data: str, out: str, *extra: str,
                      sig: int = signal.SIGKILL, group: bool = True, timeout: int = RUN_TIMEOUT) -> tuple[int, str]:
    """Start the trainer; once a stdout line contains `line_part`, send `sig` to its whole process group (or,
    group=False, to the `deepspeed` runner alone, which then starts the launcher). Returns (the top process's exit
    status, all output) once every process of the group has ended: ranks still saving keep the test waiting, and
    none is left behind."""
    proc = subprocess.Popen(trainer_command(ranks, model, data, out, *extra, runner=not group), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line_part in line:
                os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
                break
        lines.extend(proc.stdout)  # until every process holding the pipe (the ranks too) has exited
        status = proc.wait(timeout=timeout)
        deadline = time.time() + timeout
        while _group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not _group_alive(proc.pid), "trainer processes left running"
        return status, "".join(lines)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def model_like_tiny(tiny: str, out, config) -> str:
    """The tiny Llama's folder `tiny` (its tokenizer) copied to `out` with the weights of a random PackedCausalLM of
    `config` (seed 0) in place of its own."""
    import torch

    from ochat.model.decoder import PackedCausalLM

    shutil.copytree(tiny, out)
    os.remove(os.path.join(out, "model.safetensors"))
    torch.manual_seed(0)
    PackedCausalLM(config).save_pretrained(out)
    return str(out)


def make_sample_dataset(out: str, conversations: int | None = None) -> str:
    """The bundled ShareGPT sample pre-tokenized into `out` (its first `conversations` records when given)."""
    inputs = []
    if conversations is not None:
        with open(os.path.join(REPO, "ochat", "assets", "sharegpt_sample.json")) as fh:
            records = json.load(fh)[:conversations]
        source = out.rstrip(os.sep) + "_source.json"
        with open(source, "w") as fh:
            json.dump(records, fh)
        inputs = ["--in-files", source]
    subprocess.run([sys.executable, "-m", "ochat.data.generate_dataset", "--out-dir", out, "--quiet", *inputs],
                   check=True, cwd=REPO, env=_env())
    return out


def metrics(save_path: str) -> list[dict]:
    """The trainer's per-step metrics.jsonl lines (train steps only)."""
    with open(os.path.join(save_path, "metrics.jsonl")) as fh:
        return [m for m in map(json.loads, fh) if "loss" in m]


def weights(path: str) -> dict:
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))
