"""Progress of a long run on stderr: a bar on a terminal, else a line every few seconds (for logs)."""
from __future__ import annotations

import sys
import time


class Progress:
    """A tqdm bar when stderr is a terminal, else a line every `interval` seconds; nothing when `quiet`."""

    def __init__(self, prog: str, quiet: bool, interval: float):
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        self.bar = tqdm(unit=" records", file=sys.stderr, desc="tokenize", disable=quiet or not tty)
        self.prog, self.lines, self.interval = prog, not quiet and not tty, interval
        self.t0 = self.last = time.time()

    def update(self, step: int, records_read: int, written: int, tokens: int) -> None:
        """`step` more records handled; the totals so far."""
        self.bar.update(step)
        now = time.time()
        if self.lines and now - self.last >= self.interval:
            self.last = now
            elapsed = now - self.t0
            print(f"{self.prog}: {records_read:,} records read, {written:,} written, {tokens / 1e6:.1f}M tokens, "
                  f"{tokens / elapsed / 1e3:.0f}k tokens/s, {elapsed:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
