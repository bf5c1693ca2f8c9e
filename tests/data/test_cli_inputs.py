"""generate_dataset on every input format, per-file conditions, malformed lines and range-checked flags."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ochat.config import get_model_type
from ochat.data import open_dataset
from ochat.data.generate_dataset import main

ROOT = Path(__file__).resolve().parents[2]


def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "ochat.data.generate_dataset", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def conversation(i):
    return {"messages": [{"role": "user", "content": f"question {i}: what is {i} squared?\u2028"},
                         {"role": "assistant", "content": f"{i * i}, and U+0085 \u0085 is not a line break"}],
            "model": "gpt-4" if i % 2 else "gpt-3.5-turbo"}


def dataset_rows(out):
    rows = []
    for split in ("train", "eval"):
        ds = open_dataset(out, split)
        rows += [(t.tolist(), w.tolist()) for t, w in ds]
    return rows


def run_ok(*args):
    assert main([*map(str, args), "--quiet", "--workers", "1", "--eval-ratio", "0"]) == 0


def test_every_format_gives_the_same_dataset(tmp_path):
    recs = [conversation(i) for i in range(12)]
    jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode()
    files = {"a.jsonl": jsonl, "a.json": json.dumps(recs, ensure_ascii=False, indent=1).encode(),
             "a.jsonl.gz": gzip.compress(jsonl)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    try:
        import zstandard
        (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    except ImportError:
        pass
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet")
    try:
        import datasets
        datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "hf"))
    except ImportError:
        pass
    inputs = sorted(p for p in tmp_path.iterdir())
    assert len(inputs) >= 4
    reference = None
    for i, path in enumerate(inputs):
        run_ok("--in-files", path, "--out-dir", tmp_path / f"out{i}")
        rows = dataset_rows(tmp_path / f"out{i}")
        meta = json.loads((tmp_path / f"out{i}" / "meta.json").read_text())
        assert meta["report"]["written"] == 12 and meta["condition_counts"]["train"] == {"GPT3": 6, "GPT4": 6}
        reference = reference or rows
        assert rows == reference, path.name
    # and it is what the template makes of the records
    from ochat.assets import LLAMA2_TOKENIZER
    from ochat.data import load_tokenizer
    mt = get_model_type("openchat_v3.2")
    tok = load_tokenizer(LLAMA2_TOKENIZER, mt)
    for (t, w), r in zip(reference, recs):
        want_t, want_w = mt.template.encode(r["messages"], tok, condition="GPT4" if "gpt-4" in r["model"] else "GPT3")
        assert t == want_t and np.allclose(w, want_w)


def test_per_file_conditions(tmp_path):
    plain = [{"messages": conversation(i)["messages"]} for i in range(4)]
    gpt4 = tmp_path / "gpt4.jsonl"
    gpt35 = tmp_path / "gpt35.jsonl"
    gpt4.write_text("".join(json.dumps(r) + "\n" for r in plain))
    # in the GPT3 file: one record says GPT4 itself (the record wins), one has a GPT-4 model (the file wins)
    gpt35.write_text("".join(json.dumps(r) + "\n" for r in plain[:2] + [dict(plain[2], condition="GPT4"),
                                                                        dict(plain[3], model="gpt-4")]))
    run_ok("--in-files", f"{gpt4}:GPT4", f"{gpt35}:GPT3", "--out-dir", tmp_path / "o")
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["condition_counts"]["train"] == {"GPT3": 3, "GPT4": 5}
    assert [i["condition"] for i in meta["inputs"]] == ["GPT4", "GPT3"]
    weights = [max(w) for _, w in dataset_rows(tmp_path / "o")]
    assert weights == pytest.approx([1.0] * 4 + [0.1, 0.1, 1.0, 0.1])
    r = cli("--in-files", f"{gpt4}:GPT5", "--out-dir", str(tmp_path / "o2"))
    assert r.returncode == 2 and "condition 'GPT5' has no weight in --condition-weights (known: GPT4, GPT3)" in r.stderr


def test_skip_bad_lines(tmp_path):
    lines = [json.dumps(conversation(i)) for i in range(40)]
    for n in range(3, 40, 3):  # 13 malformed lines, one not UTF-8
        lines[n - 1] = '{"messages": [' if n != 6 else '{"messages": "caf\xe9"}'
    path = tmp_path / "in.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8").replace("caf\xe9".encode(), b"caf\xe9"))
    r = cli("--in-files", str(path), "--out-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"{path}: invalid JSON on line 3 (column 15)" in r.stderr and "--skip-bad-lines" in r.stderr
    assert not (tmp_path / "o").exists()
    r = cli("--in-files", str(path), "--out-dir", str(tmp_path / "o"), "--skip-bad-lines", "--eval-ratio", "0")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    rep = meta["report"]
    assert rep["records_read"] == 40 and rep["written"] == 27
    assert rep["skipped"] == {"invalid_json": 12, "not_utf8": 1}
    assert rep["bad_lines"] == {str(path): {"invalid_json": {"count": 12, "lines": [3, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39]},
                                            "not_utf8": {"count": 1, "lines": [6]}}}
    assert "invalid_json lines (3, 9, 12" in r.stdout
    skipped = [json.loads(line) for line in (tmp_path / "o" / "skipped.jsonl").read_text().splitlines()]
    assert [(s["line"], s["reason"]) for s in skipped] == [(n, "not_utf8" if n == 6 else "invalid_json") for n in range(3, 40, 3)]
    assert skipped[1]["detail"] == f"{path}: not UTF-8 at byte offset {len(chr(10).join(lines[:5]).encode()) + 1 + 17} (line 6)"
    assert len(open_dataset(tmp_path / "o")) == 27


def test_bad_lines_listed_up_to_20_per_reason(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(conversation(i)) + "\n" + "nope\n" for i in range(25)))
    run_ok("--in-files", path, "--out-dir", tmp_path / "o", "--skip-bad-lines")
    entry = json.loads((tmp_path / "o" / "meta.json").read_text())["report"]["bad_lines"][str(path)]["invalid_json"]
    assert entry == {"count": 25, "lines": list(range(2, 42, 2))}


@pytest.mark.parametrize("flag,value,msg", [
    ("--condition-weights", "GPT4=-1", "weight of 'GPT4' must be finite and >= 0, got -1"),
    ("--condition-weights", "GPT4=nan", "weight of 'GPT4' must be finite and >= 0, got nan"),
    ("--condition-weights", "GPT4=1,GPT3=inf", "weight of 'GPT3' must be finite and >= 0, got inf"),
    ("--max-length", "0", "argument --max-length: must be at least 2, got 0"),
    ("--max-length", "1.5", "argument --max-length: expected an integer, got '1.5'"),
    ("--workers", "0", "argument --workers: must be at least 1, got 0"),
    ("--workers", "-2", "argument --workers: must be at least 1, got -2"),
    ("--eval-ratio", "1", "argument --eval-ratio: must be in [0, 1), got 1"),
    ("--eval-ratio", "-0.1", "argument --eval-ratio: must be in [0, 1), got -0.1"),
    ("--eval-ratio", "nan", "argument --eval-ratio: must be a finite number, got 'nan'"),
    ("--progress-interval", "0", "argument --progress-interval: must be > 0, got 0"),
])
def test_numeric_flags_range_checked(tmp_path, flag, value, msg):
    r = cli(flag, value, "--out-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert r.stderr.startswith("generate_dataset: error: ") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_deeply_nested_json_is_a_bad_line(tmp_path, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([json.dumps(conversation(0)), deep, '{"messages": ' + deep + "}", json.dumps(conversation(1))]))
    out = tmp_path / "o"
    assert main(["--in-files", str(path), "--out-dir", str(out), "--quiet", "--workers", "1"]) == 2
    assert capsys.readouterr().err == (f"generate_dataset: error: {path}: JSON nested too deeply to parse on line 2 "
                                       "(--skip-bad-lines skips such lines)\n")
    run_ok("--in-files", path, "--out-dir", out, "--skip-bad-lines")
    report = json.loads((out / "meta.json").read_text())["report"]
    assert report["written"] == 2 and report["skipped"] == {"too_deep": 2}
    assert report["bad_lines"] == {str(path): {"too_deep": {"count": 2, "lines": [2, 3]}}}
    assert [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()] == [
        {"file": str(path), "line": n, "reason": "too_deep", "detail": f"{path}: JSON nested too deeply to parse on line {n}"}
        for n in (2, 3)]
    array = tmp_path / "in.json"
    array.write_text("[" + json.dumps(conversation(0)) + ", " + deep + "]")
    assert main(["--in-files", str(array), "--out-dir", str(out), "--quiet", "--workers", "1"]) == 2
    offset = len("[" + json.dumps(conversation(0)) + ", ")
    assert capsys.readouterr().err == (f"generate_dataset: error: {array}: invalid JSON at byte offset {offset} "
                                       f"(line 1, column {offset + 1}): nested too deeply to parse\n")


def test_alpaca_records(tmp_path):
    recs = [{"instruction": "Give the square of 3.", "input": "", "output": "9"},
            {"instruction": "Translate to French.", "input": "cat", "output": "chat", "system": "Be brief."}]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(recs))
    run_ok("--in-files", path, "--out-dir", tmp_path / "o")
    assert json.loads((tmp_path / "o" / "meta.json").read_text())["report"]["written"] == 2
    from ochat.assets import LLAMA2_TOKENIZER
    from ochat.data import load_tokenizer
    mt = get_model_type("openchat_v3.2")
    tok = load_tokenizer(LLAMA2_TOKENIZER, mt)
    want = [mt.template.encode([{"role": "user", "content": "Give the square of 3."}, {"role": "assistant", "content": "9"}], tok),
            mt.template.encode([{"role": "user", "content": "Translate to French.\n\ncat"},
                                {"role": "assistant", "content": "chat"}], tok, system="Be brief.")]
    got = dataset_rows(tmp_path / "o")
    assert [t for t, _ in got] == [t for t, _ in want]
    assert all(np.allclose(g, w) for (_, g), (_, w) in zip(got, want))
