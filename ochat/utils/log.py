"""ochat's one way of telling the user what a run does: `[ochat] message` lines on stdout, from rank 0 only."""
from __future__ import annotations

from ochat.utils.ranks import is_main


def log(msg: str) -> None:
    """Print `[ochat] msg` once (rank 0), flushed at once (logs are often read live through a launcher)."""
    if is_main():
        print(f"[ochat] {msg}", flush=True)
