"""Input files (ochat.data.sources): every format streams the same records; errors name file and position."""
import bz2
import gzip
import json
import lzma
import random
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ochat.data import sources as S


def records(n=7, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = "".join(rng.choice("abc déf\u2028\u0085\"\\\n\t😀") for _ in range(rng.randint(0, 40)))
        out.append({"messages": [{"role": "user", "content": f"q{i} {text}"},
                                 {"role": "assistant", "content": f"a{i} {text[::-1]}"}],
                    "model": rng.choice(["gpt-4", "gpt-3.5-turbo"])})
    return out


def read(path):
    return [rec for _, rec in S.open_source(path)]


def jsonl_bytes(recs):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode()


def test_jsonl_splits_on_newline_only(tmp_path):
    recs = records()
    raw = jsonl_bytes(recs)
    assert "\u2028".encode() in raw and "\u0085".encode() in raw  # what json.dumps(ensure_ascii=False) writes
    (tmp_path / "a.jsonl").write_bytes(raw + b"\n  \n")
    src = S.open_source(tmp_path / "a.jsonl")
    assert src.format == "jsonl" and src.unit == "line"
    assert list(src) == list(enumerate(recs, 1))
    (tmp_path / "crlf.jsonl").write_bytes(raw.replace(b"\n", b"\r\n"))  # Windows line ends
    assert read(tmp_path / "crlf.jsonl") == recs


def test_json_array_and_single_object(tmp_path):
    recs = records()
    (tmp_path / "a.json").write_text(json.dumps(recs, indent=2, ensure_ascii=False), encoding="utf-8")
    src = S.open_source(tmp_path / "a.json")
    assert src.format == "json" and src.unit == "index" and list(src) == list(enumerate(recs))
    (tmp_path / "b.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(recs[0], indent=2).encode())  # BOM, pretty-printed
    assert read(tmp_path / "b.json") == [recs[0]]
    (tmp_path / "c.json").write_text(" [ ] ")
    (tmp_path / "d.json").write_text("")
    assert read(tmp_path / "c.json") == [] == read(tmp_path / "d.json")


def test_large_values_cross_read_blocks(tmp_path):
    # blocks of 1 MiB: many records straddle a boundary, one is larger than several blocks, numbers at the edge
    rng = random.Random(1)
    recs = [{"conversations": [{"from": "human", "value": "x" * rng.randint(1, 5000)}], "n": rng.random()}
            for _ in range(1500)]
    recs.insert(700, {"big": "é" * 3_000_000})
    recs += [123456789, 1.5e300, [1, 2], None, True]
    (tmp_path / "a.json").write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    assert read(tmp_path / "a.json") == recs
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(recs))
    assert read(tmp_path / "a.jsonl") == recs


@pytest.mark.parametrize("suffix,compress", [(".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)])
def test_compressed(tmp_path, suffix, compress):
    recs = records(20)
    (tmp_path / f"a.jsonl{suffix}").write_bytes(compress(jsonl_bytes(recs)))
    (tmp_path / f"a.json{suffix}").write_bytes(compress(json.dumps(recs).encode()))
    assert read(tmp_path / f"a.jsonl{suffix}") == recs == read(tmp_path / f"a.json{suffix}")


def test_zstd_every_frame(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    recs = records(20)
    raw = jsonl_bytes(recs)
    cut = raw.index(b"\n", len(raw) // 2) + 1
    c = zstandard.ZstdCompressor()
    (tmp_path / "a.jsonl.zst").write_bytes(c.compress(raw[:cut]) + c.compress(raw[cut:]))  # two frames (pzstd, zstd -T)
    assert read(tmp_path / "a.jsonl.zst") == recs


def test_zstd_missing_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails as if not installed
    with pytest.raises(S.InputError, match=r"a.jsonl.zst: reading .zst files needs the zstandard package: pip install zstandard"):
        S.open_source(tmp_path / "a.jsonl.zst")


def test_corrupt_compressed_file(tmp_path):
    data = gzip.compress(jsonl_bytes(records(200)))
    (tmp_path / "a.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(S.InputError, match=r"a.jsonl.gz: cannot read \(jsonl\): Compressed file ended"):
        read(tmp_path / "a.jsonl.gz")


def test_parquet_and_arrow(tmp_path):
    recs = records(30)
    table = pa.Table.from_pylist(recs)
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=7)
    src = S.open_source(tmp_path / "a.parquet")
    assert src.format == "parquet" and list(src) == list(enumerate(recs))
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=4)
    with pa.OSFile(str(tmp_path / "s.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=4)
    assert read(tmp_path / "f.arrow") == recs == read(tmp_path / "s.arrow")


def write_hf_layout(folder, recs, shards=2):
    """What datasets.Dataset.save_to_disk writes: Arrow stream shards listed in state.json."""
    folder.mkdir()
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    table = pa.Table.from_pylist(recs)
    step = -(-len(recs) // shards)
    for i, name in enumerate(names):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table.slice(i * step, step), max_chunksize=3)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names], "_split": None}))
    (folder / "dataset_info.json").write_text("{}")


def test_hf_datasets_folder_layout(tmp_path):
    recs = records(11)
    write_hf_layout(tmp_path / "ds", recs)
    src = S.open_source(tmp_path / "ds")
    assert src.format == "hf_datasets" and list(src) == list(enumerate(recs))


def test_hf_datasets_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    recs = records(11)
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    assert read(tmp_path / "ds") == recs
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs), "test": datasets.Dataset.from_list(recs[:2])}
                         ).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(S.InputError, match=r"dd is a Hugging Face DatasetDict \(splits: train, test\); name one split's folder, e.g. .*dd/train"):
        S.open_source(tmp_path / "dd")


def test_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(S.InputError, match="is a folder but not a Hugging Face datasets folder"):
        S.open_source(tmp_path)


def test_jsonl_bad_lines_are_reported_in_place(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"messages": []}\n{"messages": [}\n\n{"x": "caf\xe9"}\n[1]\n')
    got = list(S.open_source(p))
    assert got[0] == (1, {"messages": []}) and got[3] == (5, [1])
    assert got[1][0] == 2 and got[1][1].reason == S.INVALID_JSON
    assert f"{p}: invalid JSON on line 2 (column 15): Expecting value" == got[1][1].message
    assert got[2][0] == 4 and got[2][1] == S.BadLine(S.NOT_UTF8, f"{p}: not UTF-8 at byte offset 44 (line 4)")


def test_json_array_errors(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[{"messages": []},\n {"messages": ]')
    src = S.open_source(p)
    with pytest.raises(S.InputError, match=r"bad.json: invalid JSON at byte offset 33 \(line 2, column 15\): Expecting value"):
        list(src)
    # records before the error were streamed (nothing is parsed ahead)
    first = next(iter(S.open_source(p)))
    assert first == (0, {"messages": []})
    p.write_text('[{"a": 1} {"b": 2}]')
    with pytest.raises(S.InputError, match=r"byte offset 10 \(line 1, column 11\): Expecting ',' delimiter"):
        read(p)
    p.write_text('[{"a": 1}] x')
    with pytest.raises(S.InputError, match=r"byte offset 11 \(line 1, column 12\): Extra data"):
        read(p)
    p.write_text('[{"a": "é"},')
    with pytest.raises(S.InputError, match=r"byte offset 13 \(line 1, column 13\): Expecting value"):
        read(p)


def test_json_array_error_far_into_the_file(tmp_path):
    head = json.dumps([{"v": "ü" * 1000}] * 3000, ensure_ascii=False)[:-1]  # 3 MB, two-byte characters
    p = tmp_path / "bad.json"
    p.write_text(head + ',\n{"v": nul}]', encoding="utf-8")
    offset = len(head.encode()) + 8
    with pytest.raises(S.InputError, match=rf"byte offset {offset} \(line 2, column 7\): Expecting value"):
        read(p)


def test_non_utf8_in_json_array(tmp_path):
    p = tmp_path / "latin.json"
    p.write_bytes(b'[{"messages": []},\n{"x": "caf\xe9"}]')
    with pytest.raises(S.InputError, match=r"latin.json: not UTF-8 at byte offset 29 \(line 2\)"):
        read(p)


def test_missing_file(tmp_path):
    for name in ("nope.json", "nope.parquet"):
        with pytest.raises(S.InputError, match=rf"{name}: cannot read: No such file or directory"):
            S.open_source(tmp_path / name)


def test_input_spec(tmp_path):
    assert S.parse_input_spec("a/gpt4.jsonl:GPT4") == S.InputSpec(S.Path("a/gpt4.jsonl"), "GPT4")
    assert S.parse_input_spec("gpt4.jsonl:GPT4 Correct").condition == "GPT4 Correct"
    assert S.parse_input_spec("plain.jsonl") == S.InputSpec(S.Path("plain.jsonl"))
    odd = tmp_path / "odd:name.jsonl"
    odd.write_text("")
    assert S.parse_input_spec(str(odd)) == S.InputSpec(odd)  # an existing path wins
    assert S.parse_input_spec(f"{odd}:GPT3") == S.InputSpec(odd, "GPT3")
    assert str(S.parse_input_spec("x.json:GPT3")) == "x.json:GPT3"
