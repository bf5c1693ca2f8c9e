"""The memory-mapped reader: round trip, zero copy, and resident memory on a 100M-token file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ochat.data import DatasetFormatError, TokenizedDataset, open_dataset, write_dataset
from ochat.data.schema import ARROW_SCHEMA as SCHEMA
from ochat.data.schema import FORMAT_VERSION

ROOT = Path(__file__).resolve().parents[2]


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
    meta = {"ochat_dataset": FORMAT_VERSION, "model_type": "openchat_v3.2"}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    ds = open_dataset(tmp_path)
    assert len(ds) == 37 and ds.meta == meta
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


def test_write_dataset_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    train = [(rng.integers(0, 32001, n, dtype=np.int32), rng.random(n, dtype=np.float32)) for n in rng.integers(1, 300, 50)]
    evals = train[:3]
    meta = write_dataset(tmp_path / "syn", train, evals, meta={"model_type": "openchat_v3.2", "vocab_size": 32001})
    assert meta["ochat_dataset"] == FORMAT_VERSION and meta["vocab_size"] == 32001
    lengths = np.array([len(t) for t, _ in train])
    stats = meta["length_stats"]["train"]
    assert stats["count"] == 50 and stats["tokens"] == lengths.sum() and stats["max"] == lengths.max()
    for q in (50, 90, 99):
        assert stats[f"p{q}"] == pytest.approx(np.percentile(lengths, q))
    assert stats["weight_sum"] == pytest.approx(sum(float(w.sum()) for _, w in train), rel=1e-6)
    ds, ev = open_dataset(tmp_path / "syn"), open_dataset(tmp_path / "syn", "eval")
    assert len(ds) == 50 and len(ev) == 3 and ds.meta == meta
    for i, (t, w) in enumerate(train):
        assert np.array_equal(ds[i][0], t) and np.array_equal(ds[i][1], w)
    # a second write replaces it (ochat wrote it); a folder ochat did not write is refused
    write_dataset(tmp_path / "syn", train[:1], meta={"model_type": "openchat_v3.2"})
    assert len(open_dataset(tmp_path / "syn")) == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(Exception, match="not empty and was not written by ochat"):
        write_dataset(tmp_path / "mine", train, meta={"model_type": "openchat_v3.2"})
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_format_version_checked(tmp_path):
    write_dataset(tmp_path / "d", [(np.arange(5, dtype=np.int32), np.ones(5, np.float32))],
                  meta={"model_type": "openchat_v3.2"})
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    (tmp_path / "d" / "meta.json").write_text(json.dumps(dict(meta, ochat_dataset=FORMAT_VERSION + 1)))
    with pytest.raises(DatasetFormatError, match=rf"d is an ochat dataset of format version {FORMAT_VERSION + 1}, "
                                                 rf"this ochat reads version {FORMAT_VERSION}: re-run"):
        open_dataset(tmp_path / "d")
    del meta["ochat_dataset"]
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetFormatError, match=r"meta.json has no format version"):
        open_dataset(tmp_path / "d")
    (tmp_path / "d" / "meta.json").unlink()
    with pytest.raises(DatasetFormatError, match=r"meta.json not found"):
        open_dataset(tmp_path / "d")


def test_foreign_columns_rejected(tmp_path):
    schema = pa.schema([("input_ids", pa.list_(pa.int64()))])
    with pa.OSFile(str(tmp_path / "train.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        w.write_table(pa.table({"input_ids": [[1, 2]]}))
    with pytest.raises(DatasetFormatError, match=r"columns \(input_ids list<item: int64>\) are not ochat's \(tokens"):
        TokenizedDataset(tmp_path / "train.arrow")


def test_cli_output_matches_template(tmp_path):
    from ochat.assets import LLAMA2_TOKENIZER
    from ochat.config import get_model_type
    from ochat.data import load_tokenizer
    from ochat.data.generate_dataset import main

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
# pyarrow sets up about 30 MB on its first to_numpy, whatever the data's size: not the dataset's memory
pyarrow.array([1], pyarrow.int32()).to_numpy(zero_copy_only=True)
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


def write_rows(folder, batches, meta=None):
    """A dataset folder whose rows are given column by column: batches of (tokens, weights, lengths) lists."""
    folder.mkdir(exist_ok=True)
    with pa.OSFile(str(folder / "train.arrow"), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as w:
        for tokens, weights, lengths in batches:
            w.write_batch(pa.record_batch([pa.array(tokens, pa.list_(pa.int32())),
                                           pa.array(weights, pa.list_(pa.float32())),
                                           pa.array(lengths, pa.int32())], schema=SCHEMA))
    meta = {"ochat_dataset": FORMAT_VERSION, "model_type": "openchat_v3.2", "vocab_size": 100} if meta is None else meta
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder / "train.arrow"


GOOD = ([[1, 2, 3], [4, 5]], [[0, 1, 1], [0, 1]], [3, 2])


@pytest.mark.parametrize("bad,msg", [
    (([[1, 2, 3, 4, 5]], [[0, 0, 1, 1, 1]], [50]), "row 2: `length` is 50 but the row has 5 tokens and 5 weights"),
    (([[1, 2, 3]], [[0, 1]], [3]), "row 2: `length` is 3 but the row has 3 tokens and 2 weights"),
    (([[7], [1, 2, 3, 100, 5]], [[1], [0, 0, 1, 1, 1]], [1, 5]),
     "row 3: token id 100 at position 3 is outside [0, 100) (meta.json's vocab_size)"),
    (([[1, -1]], [[0, 1]], [2]), "row 2: token id -1 at position 1 is outside [0, 100)"),
    (([[1, 2], [1, 2]], [[0, 1], [float("nan"), 1]], [2, 2]), "row 3: weight nan at position 0 (weights must be finite and >= 0)"),
    (([[1, 2]], [[0, -0.5]], [2]), "row 2: weight -0.5 at position 1 (weights must be finite and >= 0)"),
    (([[1, 2]], [[float("inf"), 1]], [2]), "row 2: weight inf at position 0"),
    (([None], [[1.0]], [1]), "row 2: `tokens` is null"),
])
def test_rows_checked_on_open(tmp_path, bad, msg):
    # the bad rows come in a second record batch: the row named is the index in the whole file
    path = write_rows(tmp_path / "d", [GOOD, bad])
    with pytest.raises(DatasetFormatError) as e:
        open_dataset(tmp_path / "d")
    assert str(e.value).startswith(f"{path}: {msg}") and "\n" not in str(e.value)


def test_rows_checked_without_meta(tmp_path):
    path = write_rows(tmp_path / "d", [([[1, 2, 3]], [[0, 1, 1]], [30])], meta={})
    with pytest.raises(DatasetFormatError, match=r"row 0: `length` is 30 but the row has 3 tokens and 3 weights"):
        TokenizedDataset(path)
    # without a vocab_size, ids are only checked to be >= 0
    write_rows(tmp_path / "e", [([[1, 10**6]], [[0, 1]], [2])], meta={})
    assert TokenizedDataset(tmp_path / "e" / "train.arrow")[0][0].tolist() == [1, 10**6]
    write_rows(tmp_path / "f", [([[1, -3]], [[0, 1]], [2])], meta={})
    with pytest.raises(DatasetFormatError, match=r"row 0: token id -3 at position 1 is negative$"):
        TokenizedDataset(tmp_path / "f" / "train.arrow")


@pytest.mark.parametrize("text,msg", [
    ('{"ochat_dataset": 1, "model_type": "openchat_v3.2", "vocab',
     "not valid JSON (line 1, column 53: Unterminated string starting at)"),
    ('{"ochat_dataset": 1, "model_type": "openchat_v3.2",', "not valid JSON (line 1, column 52: Expecting property name"),
    ("[1, 2]", "a JSON array, not an object"),
    ('"openchat_v3.2"', "a JSON string, not an object"),
    ('{"ochat_dataset": 1}', 'has no "model_type" (the chat format the dataset was tokenized with: one of openchat_v3.2, '),
    ('{"ochat_dataset": 1, "model_type": "llama"}', "unknown model_type 'llama' (known: openchat_v3.2, "),
    ('{"ochat_dataset": 1, "model_type": ["openchat_v3.2"]}', "unknown model_type ['openchat_v3.2'] (known: "),
    ('{"ochat_dataset": 1, "model_type": "openchat_v3.2", "vocab_size": "32001"}', "vocab_size '32001' is not a positive integer"),
])
def test_bad_meta_json_is_one_line(tmp_path, text, msg):
    write_rows(tmp_path / "d", [GOOD])
    (tmp_path / "d" / "meta.json").write_text(text)
    with pytest.raises(DatasetFormatError) as e:
        open_dataset(tmp_path / "d")
    assert str(e.value).startswith(str(tmp_path / "d" / "meta.json")) and msg in str(e.value) and "\n" not in str(e.value)


def test_write_dataset_needs_a_model_type(tmp_path):
    with pytest.raises(DatasetFormatError, match="write_dataset's meta has no \"model_type\""):
        write_dataset(tmp_path / "d", [(np.arange(3, dtype=np.int32), np.ones(3, np.float32))])
    assert not (tmp_path / "d").exists()
