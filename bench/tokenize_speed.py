"""Tokenization speed of the data CLI on >= 50,000 conversations.

    python bench/tokenize_speed.py [--n 50000] [--workers N]

Replicates the bundled ShareGPT sample with varied text (a counter and shuffled words appended
to each message, every third record tagged GPT-3.5, every fifth in OpenAI format), runs
`python -m ochat.data.generate_dataset` as a user would, and prints tokens/s from its meta.json.
"""
import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ochat.assets import SHAREGPT_SAMPLE  # noqa: E402


def make_records(n, seed=0):
    rng = random.Random(seed)
    base = json.loads(Path(SHAREGPT_SAMPLE).read_text())
    words = " ".join(m["value"] for r in base for m in r["conversations"]).split()
    out = []
    for i in range(n):
        r = base[i % len(base)]
        extra = lambda: " " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) + f" ({i})"
        turns = [{"from": m["from"], "value": m["value"] + extra()} for m in r["conversations"]]
        if i % 5 == 0:
            rec = {"messages": [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                                for t in turns]}
        else:
            rec = {"conversations": turns}
        if i % 3 == 0:
            rec["model"] = "gpt-3.5-turbo"
        out.append(rec)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "conv.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in make_records(a.n)))
        cmd = [sys.executable, "-m", "ochat.data.generate_dataset", "--in-files", str(f), "--out-dir",
               str(Path(tmp) / "out"), "--quiet"] + (["--workers", str(a.workers)] if a.workers else [])
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        wall = time.time() - t0
        meta = json.loads((Path(tmp) / "out" / "meta.json").read_text())
    r = meta["report"]
    print(f"\nconversations {r['records_read']}, tokens {r['tokens']}, cpus {os.cpu_count()}, "
          f"{platform.processor() or platform.machine()}")
    print(f"inside the CLI (read + tokenize + write): {r['tokens_per_second']:.0f} tokens/s ({r['seconds']:.1f} s)")
    print(f"whole command incl. interpreter start:   {r['tokens'] / wall:.0f} tokens/s ({wall:.1f} s)")


if __name__ == "__main__":
    main()
