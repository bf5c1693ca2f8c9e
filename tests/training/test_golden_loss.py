"""A pinned loss curve: the first 20 steps of the tiny CPU model on the bundled sample (one process, float32).

Data, sampler, model, loss and schedule all feed this curve, so a silent change anywhere shows up here. The same
run with `--compile` (every decoder layer compiled by torch.compile) follows the same curve. If a change is meant to
move it, regenerate the file and say why in the commit:

    OCHAT_REGENERATE_GOLDEN=1 python -m pytest tests/training/test_golden_loss.py
"""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.train import REPO, RUN_TIMEOUT, metrics

pytestmark = pytest.mark.slow
GOLDEN = os.path.join(REPO, "tests", "assets", "golden_loss_tiny.json")
FLAGS = ["--max-steps", "20", "--batch-max-len", "2048", "--lr", "3e-3", "--lr-warmup-steps", "2", "--no-save",
         "--eval-every", "0", "--skip-self-check"]


@pytest.mark.parametrize("extra", [[], ["--compile"]], ids=["eager", "compiled"])
def test_first_20_losses_of_the_tiny_model_are_pinned(tmp_path, extra, tiny_inputs):
    data, model = tiny_inputs
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-m", "ochat.training.train", "--model-path", model, "--data-path", data,
                        "--save-path", str(tmp_path / "out"), *FLAGS, *extra], env=env, capture_output=True, text=True,
                       timeout=RUN_TIMEOUT, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert ("compile: each decoder layer runs compiled" in r.stdout) == bool(extra)
    got = [round(m["loss"], 7) for m in metrics(str(tmp_path / "out"))]
    if os.environ.get("OCHAT_REGENERATE_GOLDEN") and not extra:
        with open(GOLDEN, "w") as fh:
            json.dump({"flags": FLAGS, "losses": got}, fh, indent=1)
    with open(GOLDEN) as fh:
        golden = json.load(fh)
    assert golden["flags"] == FLAGS
    assert len(got) == len(golden["losses"]) == 20
    for step, (a, b) in enumerate(zip(got, golden["losses"]), 1):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: loss {a} vs pinned {b}"
