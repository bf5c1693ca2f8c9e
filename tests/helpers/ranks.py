"""Running a worker script on N gloo CPU ranks (torch.distributed.run) and reading what each rank wrote.

A worker is a script's source that gets `OUT` (a path prefix) and `args` and leaves its results in a dict `res`;
`run_ranks` appends the ending every worker shares: rank r writes `res` as JSON to `OUT.r`, then, after a barrier,
the process exits without interpreter teardown (gloo's thread may still free the last collective's tensors, and
taking the GIL while Python finalizes aborts the process: "terminate called without an active exception")."""
import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.train import _env

_ENDING = """
import json as _json, os as _os, sys as _sys
import torch.distributed as _dist
with open(f"{_sys.argv[1]}.{_dist.get_rank()}", "w") as _fh:
    _json.dump(res, _fh)
_dist.barrier()
_os._exit(0)
"""


def run_ranks(tmp_path: Path, source: str, ranks: int, *args: str, timeout: int = 300, **env: str) -> list[dict]:
    """Run `source` (module docstring) on `ranks` gloo ranks (`env` added to the environment, the repository on PYTHONPATH); returns
    each rank's JSON results, rank order. A failing run fails the test with the end of its output."""
    (tmp_path / "worker.py").write_text(source + _ENDING)
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                        str(tmp_path / "worker.py"), str(out), *args],
                       env=_env(env), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(ranks)]
