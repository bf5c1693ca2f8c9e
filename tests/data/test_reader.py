"""The memory-mapped reader: round trip, zero copy, and resident memory on a 100M-token file."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ochat.data import TokenizedDataset, open_dataset

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = pa.schema([("tokens", pa.list_(pa.int32())), ("weights", pa.list_(pa.float32())), ("length", pa.int32())])


def write_arrow(path, batches):
    """batches: list of lists of (tokens, weights)."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as w:
        for items in batches:
            w.write_batch(pa.record_batch([pa.array([t for t, _ in items], pa.list_(pa.int32())),
                                           pa.array([x for _, x in items], pa.list_(pa.float32())),
                                           pa.array([len(t) for t, _ in items], pa.int32())], schema=SCHEMA))


def test_round_trip_multi_batch(tmp_path):
    rng = np.random.default_rng(0)
    items = [(rng.integers(0, 32001, n).tolist(), rng.random(n).astype(np.float32).tolist())
             for n in rng.integers(1, 50, 37)]
    write_arrow(tmp_path / "train.arrow", [items[:10], [], items[10:11], items[11:]])
    (tmp_path / "meta.json").write_text(json.dumps({"model_type": "openchat_v3.2"}))
    ds = open_dataset(tmp_path)
    assert len(ds) == 37 and ds.meta == {"model_type": "openchat_v3.2"}
    assert ds.lengths.dtype == np.int64 and ds.lengths.tolist() == [len(t) for t, _ in items]
    for i, (t, w) in enumerate(items):
        gt, gw = ds[i]
        assert gt.dtype == np.int32 and gw.dtype == np.float32
        assert gt.tolist() == t and np.allclose(gw, w)
    assert ds[-1][0].tolist() == items[-1][0]
    with pytest.raises(IndexError):
        ds[37]
    # zero copy: the arrays are read-only views, not owners
    assert not ds[0][0].flags.owndata and not ds[0][0].flags.writeable
    with pytest.raises(FileNotFoundError):
        open_dataset(tmp_path, "eval")


def test_cli_output_matches_template(tmp_path):
    from ochat.config import get_model_type
    from ochat.data import load_tokenizer
    from ochat.data.generate_dataset import main
    from ochat.assets import LLAMA2_TOKENIZER

    recs = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}], "condition": ["GPT4", "GPT3"][i % 2]}
            for i in range(20)]
    (tmp_path / "in.json").write_text(json.dumps(recs))
    assert main(["--in-files", str(tmp_path / "in.json"), "--out-dir", str(tmp_path / "o"), "--eval-ratio", "0",
                 "--quiet", "--workers", "1"]) == 0
    ds = open_dataset(tmp_path / "o")
    mt = get_model_type("openchat_v3.2")
    tok = load_tokenizer(LLAMA2_TOKENIZER, mt)
    for i, r in enumerate(recs):
        t, w = mt.template.encode(r["messages"], tok, condition=r["condition"])
        assert ds[i][0].tolist() == t and np.allclose(ds[i][1], w)


MEASURE = r"""
import sys
import numpy as np, pyarrow
from ochat.data import TokenizedDataset
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
rss0, anon0 = status("VmRSS"), status("RssAnon")
ds = TokenizedDataset(sys.argv[1])
total = int(ds.lengths.sum())
for i in (0, len(ds) // 2, len(ds) - 1):
    t, w = ds[i]
    assert int(t[-1]) >= 0 and w.shape == t.shape
rss1 = status("VmRSS")
# touching more items maps file pages (shared, clean, reclaimable: counted in VmRSS, not RssAnon);
# private memory must stay flat
for i in range(0, len(ds), max(1, len(ds) // 50)):
    t, w = ds[i]
    int(t[-1]) + int(w[-1])
anon1 = status("RssAnon")
print(total, len(ds), rss1 - rss0, anon1 - anon0)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_open_100m_tokens_rss(tmp_path):
    rows, per = 25_000, 4_000  # 100M tokens: 400 MB tokens + 400 MB weights on disk
    path = tmp_path / "big.arrow"
    toks = np.arange(per * 1000, dtype=np.int32) % 32001
    ws = np.ones(per * 1000, dtype=np.float32)
    off = pa.array(np.arange(0, per * 1000 + 1, per, dtype=np.int32))
    batch = pa.record_batch([pa.ListArray.from_arrays(off, pa.array(toks)),
                             pa.ListArray.from_arrays(off, pa.array(ws)),
                             pa.array(np.full(1000, per, np.int32))], schema=SCHEMA)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as w:
        for _ in range(rows // 1000):
            w.write_batch(batch)
    r = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert r.returncode == 0, r.stderr
    total, n, grew, anon = map(int, r.stdout.split())
    assert total == rows * per == 100_000_000 and n == rows
    assert grew < 100 * 2**20, f"RSS grew by {grew / 2**20:.1f} MB on open + lengths + 3 items"
    assert anon < 20 * 2**20, f"private (anonymous) memory grew by {anon / 2**20:.1f} MB after 50 items"
