"""StopRequest: signals become a stop after the current step; a second Ctrl-C aborts at once."""
import os
import signal
import subprocess
import sys

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
