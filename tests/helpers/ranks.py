"""Running a worker script on N gloo CPU ranks (torch.distributed.run) and reading what each rank wrote.

A worker is a script's source; it gets `OUT` (a path prefix) and `args`, and rank r writes its results as JSON to
`OUT.r` (ending with `os._exit(0)` after a barrier: gloo's thread may outlive interpreter teardown)."""
import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.train import _env


def run_ranks(tmp_path: Path, source: str, ranks: int, *args: str, timeout: int = 300, **env: str) -> list[dict]:
    """Run `source` on `ranks` gloo ranks (`env` added to the environment, the repository on PYTHONPATH); returns
    each rank's JSON results, rank order. A failing run fails the test with the end of its output."""
    (tmp_path / "worker.py").write_text(source)
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                        str(tmp_path / "worker.py"), str(out), *args],
                       env=_env(env), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(ranks)]
