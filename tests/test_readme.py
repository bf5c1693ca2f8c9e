"""The README's front door works as written: every command of its ```bash / ```sh / ```console blocks is run on
the CPU in a temporary folder (with a time limit), checked to parse, or skipped by a named rule below.

- A command the rules do not cover fails `test_every_readme_command_has_a_rule`, so a new block cannot be
  silently ignored; a command that runs (`RUN`) must succeed.
- What stands for the reader's own files (`MY_MODEL`, `my_chats.jsonl`, `runs/mine/final`) is replaced by what the
  demo, which runs first, leaves behind: its tiny model folder (weights and a tokenizer with its chat template),
  its trained checkpoint, and the bundled ShareGPT sample.
- A command that cannot run here (a multi-GPU launch) is checked to parse (`PARSE`): `python -m MODULE --help`
  exits 0 and lists every `--flag` the command gives the module, and the launcher's own `--help` lists the
  launcher's flags.
- The demo runs with `--epochs 1 --max-steps 4` to keep this test near a minute on 2 cores.
"""
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ochat.assets import SHAREGPT_SAMPLE

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(?:bash|sh|console|shell)[ \t]*\n(.*?)^```", re.DOTALL | re.MULTILINE)

RUN, PARSE, SKIP = "run", "parse", "skip"
# (rule name, pattern matched at the start of a command, what the test does); the first rule that matches applies.
RULES = [
    ("installs packages (network; changes the environment)", r"(python3? -m )?pip3? install\b", SKIP),
    ("the test suite itself (CI runs it)", r"(python3? -m )?pytest\b", SKIP),
    ("downloads a model from the Hugging Face Hub", r"(hf|huggingface-cli) download\b", SKIP),
    ("needs a GPU and vLLM", r"vllm\b", SKIP),
    ("the demo, shortened to four steps", r"python3? -m ochat\.demo\b", RUN),
    ("pre-tokenization, with the demo's model and the bundled sample for yours",
     r"python3? -m ochat\.data\.generate_dataset\b", RUN),
    ("a multi-GPU training launch: --help and its flags checked", r"deepspeed\b", PARSE),
    ("chat with a checkpoint in transformers (the demo's)", r"python3? -c .*\bpipeline\(", RUN),
]
EXTRA_ARGS = {"the demo, shortened to four steps": " --epochs 1 --max-steps 4"}
PLACEHOLDERS = {"MY_MODEL": "runs/demo/tiny-llama", "my_chats.jsonl": str(SHAREGPT_SAMPLE),
                "runs/mine/final": "runs/demo/out/final"}
TIME_LIMIT_S = {"the demo, shortened to four steps": 420}  # others: DEFAULT_LIMIT_S
DEFAULT_LIMIT_S = 180


def readme_commands(text: str) -> list[tuple[int, str]]:
    """(block number, command) for each command of each shell block, in order: continuation lines joined, a
    `$ ` prompt removed, blank lines and comment lines dropped."""
    out = []
    for block, m in enumerate(FENCE.finditer(text)):
        for line in m.group(1).replace("\\\n", " ").splitlines():
            line = line.strip()
            line = line.removeprefix("$ ")
            if line and not line.startswith("#"):
                out.append((block, line))
    return out


def strip_comment(command: str) -> str:
    """`command` without a trailing shell comment (a `#` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(command):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or command[i - 1].isspace()):
            return command[:i].rstrip()
    return command


def rule_of(command: str) -> tuple[str, str] | None:
    """(rule name, action) of the first rule matching `command`; None when no rule covers it."""
    for name, pattern, action in RULES:
        if re.match(pattern, command):
            return name, action
    return None


def _env(bin_dir: Path) -> dict:
    """`python` and `python3` mean this interpreter; its scripts (deepspeed) come first on PATH."""
    bin_dir.mkdir(exist_ok=True)
    for name in ("python", "python3"):
        link = bin_dir / name
        if not link.exists():
            link.symlink_to(sys.executable)
    path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PATH=path, PYTHONPATH=pythonpath, PYTHONUNBUFFERED="1")


def _run(args, *, cwd, env, timeout, shell=False) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, timeout=timeout, shell=shell,
                          executable="/bin/bash" if shell else None, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, check=False)


def _flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def _listed(flag: str, help_text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


def check_parses(command: str, *, cwd, env) -> None:
    """The command's module (`deepspeed ... --module M ...` or `python -m M ...`) takes every flag it is given."""
    argv = shlex.split(command, comments=True)
    if argv[0] == "deepspeed":
        i = argv.index("--module")
        module, module_args, launcher_flags = argv[i + 1], argv[i + 2:], _flags(argv[1:i]) + ["--module"]
        launcher = _run(["deepspeed", "--help"], cwd=cwd, env=env, timeout=DEFAULT_LIMIT_S)
        assert launcher.returncode == 0, launcher.stdout[-3000:]
        missing = [f for f in launcher_flags if not _listed(f, launcher.stdout)]
        assert not missing, f"{command}\n  deepspeed --help does not list {missing}"
    else:
        assert argv[0] in ("python", "python3") and argv[1] == "-m", command
        module, module_args = argv[2], argv[3:]
    helped = _run([sys.executable, "-m", module, "--help"], cwd=cwd, env=env, timeout=DEFAULT_LIMIT_S)
    assert helped.returncode == 0, f"python -m {module} --help failed:\n{helped.stdout[-3000:]}"
    missing = [f for f in _flags(module_args) if not _listed(f, helped.stdout)]
    assert not missing, f"{command}\n  python -m {module} --help does not list {missing}"


def test_every_readme_command_has_a_rule():
    """Each command of the README's shell blocks is run, parsed or skipped by a named rule, and the front door's
    two runnable paths (the demo and pre-tokenization) are among those run."""
    commands = readme_commands(README.read_text())
    blocks = len(FENCE.findall(README.read_text()))
    assert commands and {b for b, _ in commands} == set(range(blocks)), "a shell block without a command"
    uncovered = [c for _, c in commands if rule_of(c) is None]
    assert not uncovered, f"README commands no rule in tests/test_readme.py covers: {uncovered}"
    ran = {rule_of(c)[0] for _, c in commands if rule_of(c)[1] == RUN}
    assert {"the demo, shortened to four steps",
            "pre-tokenization, with the demo's model and the bundled sample for yours"} <= ran


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    """Every README command, in order, as its rule says (the demo first: later commands use what it wrote)."""
    env, work = _env(tmp_path / "bin"), tmp_path / "work"
    work.mkdir()
    done = []
    for block, command in readme_commands(README.read_text()):
        name, action = rule_of(command)
        t0 = time.monotonic()
        if action == SKIP:
            done.append((block, command, f"skipped: {name}"))
            continue
        if action == PARSE:
            check_parses(command, cwd=work, env=env)
            done.append((block, command, f"parsed in {time.monotonic() - t0:.0f} s: {name}"))
            continue
        runnable = command
        for placeholder, value in PLACEHOLDERS.items():
            runnable = runnable.replace(placeholder, value)
        runnable = strip_comment(runnable) + EXTRA_ARGS.get(name, "")
        limit = TIME_LIMIT_S.get(name, DEFAULT_LIMIT_S)
        try:
            result = _run(runnable, cwd=work, env=env, timeout=limit, shell=True)
        except subprocess.TimeoutExpired as e:
            out = e.output or ""
            out = out.decode(errors="replace") if isinstance(out, bytes) else out
            pytest.fail(f"README block {block}: `{runnable}` ran over {limit} s:\n{out[-3000:]}")
        assert result.returncode == 0, f"README block {block}: `{runnable}` exited {result.returncode}:\n" \
                                       f"{result.stdout[-3000:]}"
        done.append((block, command, f"ran in {time.monotonic() - t0:.0f} s: {name}"))
    assert (work / "runs/demo/out/final/config.json").is_file(), "the demo wrote no checkpoint"
    assert (work / "data/mine/train.arrow").is_file(), "pre-tokenization wrote no dataset"
    print("\n".join(f"block {b}: {what}: {c[:80]}" for b, c, what in done))
