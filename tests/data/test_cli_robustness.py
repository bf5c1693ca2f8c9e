"""generate_dataset under stress: signals, killed runs, memory on a large input, progress, long conversations."""
import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from ochat.config import get_model_type
from ochat.data import generate_dataset, open_dataset
from ochat.data.generate_dataset import main

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
COMMAND = [sys.executable, "-m", "ochat.data.generate_dataset"]


def many_conversations(path, n):
    from ochat.assets import SHAREGPT_SAMPLE

    base = json.loads(Path(SHAREGPT_SAMPLE).read_text())
    with open(path, "w") as f:
        for i in range(n):
            rec = base[i % len(base)]
            f.write(json.dumps({"conversations": [dict(m, value=f"{m['value']} ({i})") for m in rec["conversations"]]}) + "\n")
    return str(path)


START_LIMIT = 300  # seconds for a run to start: a guard against hangs, not a speed check (a loaded 2-core machine)


def temporaries(parent, name):
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith(f".{name}.tmp-"))


def start_and_wait_for_temporary(tmp_path, *args):
    proc = subprocess.Popen([*COMMAND, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + START_LIMIT
    while not any((tmp_path / name / ".ochat.json").is_file() for name in temporaries(tmp_path, "out")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    return proc


def start_and_wait_for_progress(*args, command=COMMAND):
    """Start a run and return once it reports its first chunk written (it is in the tokenizing loop, its
    workers started), however loaded the machine: -> (process, the stderr lines read so far)."""
    proc = subprocess.Popen([*command, *args, "--progress-interval", "0.001"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    lines = [proc.stderr.readline()]
    assert "records read" in lines[0], lines[0] + proc.communicate()[1]
    assert proc.poll() is None, "finished before it could be interrupted: use a larger input"
    return proc, lines


def assert_interrupted(proc, sig, out, stderr_lines):
    """The run ended on `sig`: its exit status, and on stderr only progress lines then the one-line notice."""
    stdout, stderr = proc.communicate(timeout=120)
    *progress, last = (stderr_lines + stderr.splitlines()) or [""]
    assert proc.returncode == 128 + sig, stderr
    assert last == f"generate_dataset: interrupted by {sig.name}: {out} left as it was, temporary folder removed"
    assert all(line.startswith("generate_dataset: ") and "records read" in line for line in progress), progress


@pytest.mark.parametrize("sig,workers", [(signal.SIGTERM, "2"), (signal.SIGINT, "1")])
def test_signal_cleans_up(tmp_path, sig, workers):
    big = many_conversations(tmp_path / "big.jsonl", 20_000)
    out = tmp_path / "out"
    assert main(["--out-dir", str(out), "--quiet"]) == 0  # an earlier output, which must survive
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc, lines = start_and_wait_for_progress("--in-files", big, "--out-dir", str(out), "--workers", workers)
    assert temporaries(tmp_path, "out")
    proc.send_signal(sig)
    assert_interrupted(proc, sig, out, lines)
    assert temporaries(tmp_path, "out") == [] and {p.name: p.read_bytes() for p in out.iterdir()} == before


SLOW_WORKERS = r"""
import os, sys, time
from pathlib import Path
from ochat.data import generate_dataset

init = generate_dataset._init_worker_process

def slow_init(*args):  # a worker the loaded machine runs late: the stop comes before it set its handlers
    Path(sys.argv[1], str(os.getpid())).touch()
    time.sleep(float(sys.argv[2]))
    init(*args)

generate_dataset._init_worker_process = slow_init
sys.exit(generate_dataset.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("startup", [1, 3600])  # seconds before a worker sets its handlers: late, or never
def test_signal_before_workers_set_their_handlers(tmp_path, startup):
    # the stop comes while the workers still hold the signals (until they set their own handlers) and read no
    # chunk: they must not run the parent's handler (a traceback), nor keep the run from ending
    big = many_conversations(tmp_path / "big.jsonl", 5_000)
    out, started = tmp_path / "out", tmp_path / "started"
    started.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WORKERS, str(started), str(startup), "--in-files", big,
                             "--out-dir", str(out), "--workers", "2", "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + START_LIMIT
    while len(list(started.iterdir())) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert_interrupted(proc, signal.SIGTERM, out, [])
    assert temporaries(tmp_path, "out") == [] and not out.exists()
    for worker in started.iterdir():  # stopped and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(int(worker.name), 0)


def test_failing_worker_stops_the_run(tmp_path, monkeypatch):
    def tokenizer_bug(convs):
        raise ValueError("tokenizer bug")

    monkeypatch.setattr(generate_dataset, "_tokenize_chunk", tokenizer_bug)  # raises in the workers
    big = many_conversations(tmp_path / "big.jsonl", 1_200)
    with pytest.raises(RuntimeError, match=r"a tokenizer worker stopped unexpectedly \(its error, if any, is above\)"):
        main(["--in-files", big, "--out-dir", str(tmp_path / "out"), "--workers", "2", "--quiet"])
    assert temporaries(tmp_path, "out") == [] and not (tmp_path / "out").exists()


def test_killed_run_leftovers_are_cleaned_by_the_next_run(tmp_path):
    big = many_conversations(tmp_path / "big.jsonl", 20_000)
    out = tmp_path / "out"
    proc = start_and_wait_for_temporary(tmp_path, "--in-files", big, "--out-dir", str(out), "--workers", "1", "--quiet")
    proc.kill()
    proc.wait()
    [left] = temporaries(tmp_path, "out")
    assert left.startswith(f".out.tmp-{proc.pid}-") and (tmp_path / left / ".ochat.json").is_file()
    foreign = tmp_path / ".out.tmp-999999999"  # the name, but no ochat marker: reported, never deleted
    foreign.mkdir()
    (foreign / "mine.txt").write_text("x")
    r = subprocess.run([*COMMAND, "--out-dir", str(out), "--quiet"], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"generate_dataset: note: removed {tmp_path / left}, left behind by process {proc.pid}, which no longer runs" in r.stderr
    assert f"{foreign} looks like a temporary folder of an interrupted run but holds no ochat marker" in r.stderr
    assert temporaries(tmp_path, "out") == [foreign.name] and (foreign / "mine.txt").exists()
    assert len(open_dataset(out)) > 400


PEAK = r"""
import resource, sys
from ochat.data.generate_dataset import main
code = main(sys.argv[1:])
print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_kb(*args):
    r = subprocess.run([sys.executable, "-c", PEAK, *args, "--quiet", "--workers", "1"], capture_output=True, text=True,
                       env=ENV, timeout=120)
    code, peak = map(int, r.stdout.splitlines()[-1].split())
    assert code == 0, r.stderr
    return peak


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB on Linux")
def test_memory_does_not_grow_with_the_input(tmp_path):
    # 60 MB of records: 3 conversations, the rest skipped (no assistant turn) so that the test is about reading,
    # not tokenizing. Holding the input (as parsed JSON) would take several hundred MB.
    pad = "lorem ipsum dolor sit amet " * 400
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    good = json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}) + "\n"
    bad = json.dumps({"conversations": [{"from": "human", "value": pad}]}) + "\n"
    small.write_text(good * 3)
    big.write_text(good * 3 + bad * 5500)
    assert big.stat().st_size > 55e6
    base = peak_rss_kb("--in-files", str(small), "--out-dir", str(tmp_path / "o1"))
    peak = peak_rss_kb("--in-files", str(big), "--out-dir", str(tmp_path / "o2"))
    assert peak - base < 40_000, f"peak RSS {peak / 1024:.0f} MiB on 60 MB of input vs {base / 1024:.0f} MiB on 3 records"


def test_progress_lines_without_a_terminal(tmp_path):
    from ochat.assets import SHAREGPT_SAMPLE

    r = subprocess.run([*COMMAND, "--in-files", str(SHAREGPT_SAMPLE), "--out-dir", str(tmp_path / "o"),
                        "--progress-interval", "0.001"],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0
    lines = r.stderr.strip().splitlines()
    assert lines and all(line.startswith("generate_dataset: ") and "records read" in line for line in lines)
    assert "500 records read, 500 written" in lines[-1] and "tokens/s" in lines[-1] and "\r" not in r.stderr


def test_progress_bar_on_a_terminal(tmp_path):
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    proc = subprocess.Popen([*COMMAND, "--out-dir", str(tmp_path / "o")], stdout=subprocess.DEVNULL, stderr=child, env=ENV)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(parent, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    seen = b"".join(chunks).decode(errors="replace")
    assert "tokenize: " in seen and "500" in seen and "records read" not in seen


def test_long_conversations_and_truncation_report(tmp_path, tok):
    long_text = " ".join(f"w{i}" for i in range(100_000))
    path = tmp_path / "long.jsonl"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": long_text}]
    path.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"messages": messages[:1] + [
        {"role": "assistant", "content": "short"}]}) + "\n")
    out = tmp_path / "o"
    assert main(["--in-files", str(path), "--out-dir", str(out), "--max-length", "262144", "--eval-ratio", "0",
                 "--quiet", "--workers", "1"]) == 0
    full = len(get_model_type("openchat_v3.2").template.encode(messages, tok)[0])
    assert full > 262_144
    report = json.loads((out / "meta.json").read_text())["report"]
    assert report["truncated"] == 1 and report["truncated_tokens_dropped"] == full - 262_144
    assert report["longest_before_truncation"] == full
    ds = open_dataset(out)
    assert ds.lengths.tolist()[0] == 262_144 and ds[0][1][-1] > 0


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB on Linux")
def test_huge_records_are_skipped_before_tokenizing(tmp_path):
    # a 20 MB line (5M tokens) and one of 300,000 turns: tokenized whole, then cut to --max-length, they took
    # over 1 GB (and 25 s); skipped as too_long, barely more than the lines themselves
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    text = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "lorem ipsum dolor " * 1_100_000}]}
    turns = {"conversations": [{"from": ("human", "gpt")[i % 2], "value": ""} for i in range(300_000)]}
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    big.write_text("".join(json.dumps(r) + "\n" for r in (good, text, good, turns)))
    small.write_text(json.dumps(good) + "\n")
    base = peak_rss_kb("--in-files", str(small), "--out-dir", str(tmp_path / "o1"))
    peak = peak_rss_kb("--in-files", str(big), "--out-dir", str(tmp_path / "o2"))
    assert peak - base < 300_000, f"peak RSS {peak / 1024:.0f} MiB on two huge records vs {base / 1024:.0f} MiB on one small"
    report = json.loads((tmp_path / "o2" / "meta.json").read_text())["report"]
    assert report["written"] == 2 and report["skipped"] == {"too_long": 2}
    assert [json.loads(line) for line in (tmp_path / "o2" / "skipped.jsonl").read_text().splitlines()] == [
        {"file": str(big), "line": 2, "reason": "too_long",
         "detail": "19800001 characters of text, over --max-record-chars 262144"},
        {"file": str(big), "line": 4, "reason": "too_long", "detail": "300000 messages, over --max-length 4096"}]
    # a smaller cap skips what it exceeds; the report lists the reason
    r = subprocess.run([*COMMAND, "--in-files", str(small), "--out-dir", str(tmp_path / "o3"), "--max-record-chars", "1",
                        "--eval-ratio", "0"], capture_output=True, text=True, env=ENV, timeout=120, check=False)
    assert r.returncode == 2 and "too_long=1" in r.stderr
