"""generate_dataset end to end: output files, report, errors, determinism across --workers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ochat.assets import SHAREGPT_SAMPLE
from ochat.config import get_model_type
from ochat.data import open_dataset
from ochat.data.generate_dataset import main

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "ochat.data.generate_dataset", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def sg(*turns, **kw):
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **kw}


def test_defaults_end_to_end(tmp_path):
    r = cli("--out-dir", str(tmp_path / "out"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "records read      500" in r.stdout and "Traceback" not in r.stderr
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == [".ochat.json", "eval.arrow", "meta.json", "skipped.jsonl", "train.arrow"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left
    meta = json.loads((out / "meta.json").read_text())
    for k in ("model_type", "tokenizer_sha256", "vocab_size", "eot_token_id", "bos_token_id", "max_length",
              "report", "condition_counts", "length_stats", "args"):
        assert k in meta
    assert meta["vocab_size"] == 32001 and meta["eot_token_id"] == 32000 and meta["max_length"] == 4096
    ds, ev = open_dataset(out), open_dataset(out, "eval")
    assert len(ds) + len(ev) == 500 and 0 < len(ev) < 15  # each conversation in eval with probability 0.01
    toks, w = ds[0]
    assert toks.dtype == np.int32 and w.dtype == np.float32 and toks[0] == 1 and len(toks) == ds.lengths[0]
    # a second run into the same (ochat) directory replaces it
    assert cli("--out-dir", str(out), "--quiet").returncode == 0


def test_report_counts_every_record(tmp_path, tok):
    recs = [sg(("human", "q"), ("gpt", "a")),                      # written
            sg(("human", "q")),                                     # no_assistant
            {"text": "x"},                                          # no_conversation
            sg(("robot", "q"), ("gpt", "a")),                       # unknown_role
            {"messages": [{"role": "user", "content": None}]},      # non_string_content
            sg(("human", "q"), ("gpt", "a"), condition="GPT9"),     # unknown_condition
            sg(("human", "x " * 50), ("gpt", "a")),                 # no target after truncation
            sg(("human", "q"), ("gpt", "word " * 50), model="gpt-3.5"),  # truncated, kept
            7]                                                      # not_an_object
    f = write_jsonl(tmp_path / "in.jsonl", recs)
    out = tmp_path / "out"
    assert main(["--in-files", f, "--out-dir", str(out), "--max-length", "30", "--eval-ratio", "0",
                 "--workers", "1", "--quiet"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    r = meta["report"]
    assert r["records_read"] == 9 and r["written"] == 2 and r["truncated"] == 1
    assert r["skipped"] == {"no_assistant": 1, "no_conversation": 1, "unknown_role": 1, "non_string_content": 1,
                            "unknown_condition": 1, "no_target_after_truncation": 1, "not_an_object": 1}
    assert meta["condition_counts"]["train"] == {"GPT3": 1, "GPT4": 1}
    ds = open_dataset(out)
    assert ds.lengths.tolist()[1] == 30
    t, w = ds[1]
    assert w.max() == pytest.approx(0.1) and w[-1] > 0
    full = len(get_model_type("openchat_v3.2").template.encode(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 50}], tok)[0])
    assert r["truncated_tokens_dropped"] == full - 30 and r["longest_before_truncation"] == full
    assert r["normalised"] == {} and r["rewritten_turns"] == 0 and r["bad_lines"] == {}
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"file": f, "line": n, "reason": reason} for n, reason in [
        (2, "no_assistant"), (3, "no_conversation"), (4, "unknown_role"), (5, "non_string_content"),
        (6, "unknown_condition"), (7, "no_target_after_truncation"), (9, "not_an_object")]]


def test_condition_flags(tmp_path):
    f = write_jsonl(tmp_path / "in.jsonl", [sg(("human", "q"), ("gpt", "a"))])
    out = tmp_path / "o"
    assert main(["--in-files", f, "--out-dir", str(out), "--condition-weights", "GPT4=2,GPT3=0.5,X=0.25",
                 "--default-condition", "X", "--eval-ratio", "0", "--quiet"]) == 0
    t, w = open_dataset(out)[0]
    assert set(w.tolist()) == {0.0, 0.25}


@pytest.mark.parametrize("mode", [None, "tokens"])
def test_special_tokens_in_content(tmp_path, mode):
    """Typed special-token text trains as plain text by default (OpenChat's rule) or as the token; meta.json says
    which."""
    f = write_jsonl(tmp_path / "in.jsonl", [sg(("human", "say <|end_of_turn|> and <s>"), ("gpt", "ok"))])
    out = tmp_path / "o"
    assert main(["--in-files", f, "--out-dir", str(out), "--eval-ratio", "0", "--quiet"]
                + (["--special-tokens-in-content", mode] if mode else [])) == 0
    tokens = open_dataset(out)[0][0].tolist()
    assert (tokens.count(32000), tokens.count(1)) == ((3, 2) if mode else (2, 1))
    assert json.loads((out / "meta.json").read_text())["special_tokens_in_content"] == (mode or "text")


@pytest.mark.parametrize("args,msg", [
    (["--model-type", "llama9"], "unknown model type 'llama9' (known: openchat_v3.2"),
    (["--default-condition", "GPT5"], "--default-condition 'GPT5' has no weight"),
    (["--tokenizer", "/nonexistent/tok.model"], "tokenizer not found"),
    (["--in-files", "/nonexistent.json"], "/nonexistent.json: cannot read"),
    (["--model-type", "chat_template", "--special-tokens-in-content", "text"],
     "--special-tokens-in-content text: the chat_template type tokenizes the rendered conversation as one string"),
])
def test_user_errors_one_line(tmp_path, args, msg):
    out = tmp_path / "out"
    r = cli(*args, "--out-dir", str(out), "--quiet")
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and os.listdir(tmp_path) == []  # no partial or temporary directory


def test_bad_file_no_partial_output(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [sg(("human", "q"), ("gpt", "a"))])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\nnot json\n')
    out = tmp_path / "out"
    r = cli("--in-files", good, str(bad), "--out-dir", str(out), "--quiet")
    assert r.returncode == 2 and "bad.jsonl: invalid JSON on line 2" in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.jsonl"]
    # everything skipped is an error too, with the reasons
    allbad = write_jsonl(tmp_path / "allbad.jsonl", [{"text": 1}])
    r = cli("--in-files", allbad, "--out-dir", str(out), "--quiet")
    assert r.returncode == 2 and "no_conversation=1" in r.stderr and not out.exists()


def test_bad_flags_rejected(tmp_path):
    r = cli("--condition-weights", "GPT4", "--out-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "NAME=FLOAT" in r.stderr
    r = cli("--no-such-flag")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_refuses_foreign_nonempty_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["--out-dir", str(tmp_path), "--quiet"]) == 2
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_a_meta_json_does_not_make_a_folder_ochat_output(tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('hi')")
    (project / "README").write_text("readme")
    (project / "meta.json").write_text(json.dumps({"ochat_dataset": 1}))
    r = cli("--in-files", str(SHAREGPT_SAMPLE), "--out-dir", str(project), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"--out-dir {project} is not empty and was not written by ochat" in r.stderr and "--overwrite" in r.stderr
    assert (project / "src" / "main.py").read_text() == "print('hi')" and sorted(os.listdir(tmp_path)) == ["project"]
    assert cli("--out-dir", str(project), "--quiet", "--overwrite").returncode == 0
    assert not (project / "src").exists() and (project / ".ochat.json").is_file()


def test_refuses_out_dir_holding_an_input(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    f = write_jsonl(data / "in.jsonl", [sg(("human", "q"), ("gpt", "a"))])
    r = cli("--in-files", f, "--out-dir", str(data), "--overwrite", "--quiet")
    assert r.returncode == 2 and f"--out-dir {data} holds the input {f}" in r.stderr
    assert os.listdir(data) == ["in.jsonl"]


def test_deterministic_across_workers(tmp_path):
    recs = json.loads(Path(SHAREGPT_SAMPLE).read_text())
    # > one chunk so two workers really split the work; mix in OpenAI records and conditions
    many = []
    for i in range(1200):
        r = dict(recs[i % len(recs)])
        r["conversations"] = [dict(m, value=m["value"] + f" #{i}") for m in r["conversations"]]
        if i % 3 == 0:
            r["model"] = "gpt-3.5-turbo"
        many.append(r if i % 97 else {"broken": i})
    f = write_jsonl(tmp_path / "many.jsonl", many)
    outs = []
    for w in (1, 2):
        out = tmp_path / f"w{w}"
        assert main(["--in-files", f, "--out-dir", str(out), "--workers", str(w), "--quiet", "--seed", "3",
                     "--eval-ratio", "0.05"]) == 0
        outs.append(out)
    for name in ("train.arrow", "eval.arrow", "skipped.jsonl"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    assert 30 < len(open_dataset(outs[0], "eval")) < 90  # 5% of 1,187 conversations
    assert len((outs[0] / "skipped.jsonl").read_text().splitlines()) == 13


def test_unwritable_out_dir_is_one_line(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    r = cli("--in-files", str(SHAREGPT_SAMPLE), "--out-dir", str(tmp_path / "file.txt" / "out"), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"--out-dir {tmp_path / 'file.txt' / 'out'}: cannot write: " in r.stderr


def test_no_records_is_one_line(tmp_path, capsys):
    empty, blank, array = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl", tmp_path / "empty.json"
    empty.write_text("")
    blank.write_text("\n \n")
    array.write_text("[]")
    for files in ([empty], [blank, array]):
        assert main(["--in-files", *map(str, files), "--out-dir", str(tmp_path / "o"), "--quiet"]) == 2
        assert capsys.readouterr().err == f"generate_dataset: error: {', '.join(map(str, files))}: no records\n"
    assert not (tmp_path / "o").exists()


def test_bundled_sample_is_noted(tmp_path, capsys):
    assert main(["--out-dir", str(tmp_path / "o"), "--quiet", "--workers", "1"]) == 0
    assert capsys.readouterr().err == ("generate_dataset: note: no --in-files: tokenizing the bundled 500-conversation "
                                       f"ShareGPT sample ({SHAREGPT_SAMPLE})\n")
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["args"]["in_files"] == [str(SHAREGPT_SAMPLE)] and meta["report"]["records_read"] == 500
    assert main(["--in-files", str(SHAREGPT_SAMPLE), "--out-dir", str(tmp_path / "o"), "--quiet", "--workers", "1"]) == 0
    assert capsys.readouterr().err == ""
