"""Pre-tokenize conversations into Arrow IPC files that the trainer memory-maps.

    python -m ochat.data.generate_dataset                       # bundled Llama 2 tokenizer + sample
    python -m ochat.data.generate_dataset --model-type openchat_v3.2 \
        --tokenizer llama2/tokenizer.model --in-files a.json b.jsonl --out-dir data/mix

Output (DIR = --out-dir): DIR/train.arrow, DIR/eval.arrow (columns tokens list<int32>,
weights list<float32>, length int32) and DIR/meta.json (model type, tokenizer checksum,
report, length statistics, arguments). The directory is written under a temporary name and
renamed at the end, so a failed run never leaves a partial output.

Pipeline: read + normalise all records (main process, see formats.normalize) -> chunks of
conversations, tokenized in order by --workers processes (batched tokenizer calls) ->
truncate -> split train/eval by a seeded permutation -> write. The output depends only on the
inputs and --seed, never on --workers.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ochat.config.model_types import MODEL_TYPES, get_model_type, with_condition_weights
from ochat.data import formats
from ochat.data.formats import InputError

FORMAT_VERSION = 1
CHUNK = 512  # conversations per tokenizer batch / worker task


# ----------------------------------------------------------------------------- args

def parse_weights(s: str) -> dict:
    out = {}
    for part in s.split(","):
        if not part.strip():
            continue
        k, sep, v = part.rpartition("=")
        try:
            if not sep or not k.strip():
                raise ValueError
            out[k.strip()] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad --condition-weights entry {part!r} (expected NAME=FLOAT)") from None
    if not out:
        raise argparse.ArgumentTypeError("--condition-weights is empty")
    return out


def build_parser():
    from ochat.assets import LLAMA2_TOKENIZER, SHAREGPT_SAMPLE

    p = argparse.ArgumentParser(prog="python -m ochat.data.generate_dataset", allow_abbrev=False,
                                description="Tokenize ShareGPT / OpenAI-messages conversations into Arrow files.")
    p.add_argument("--model-type", default="openchat_v3.2", help=f"one of {', '.join(MODEL_TYPES)} (default: %(default)s)")
    p.add_argument("--chat-template", default=None, metavar="FILE|NAME",
                   help="chat_template type: a Jinja file or a bundled preset (chatml, llama3, gemma); default: the tokenizer's own")
    p.add_argument("--tokenizer", default=str(LLAMA2_TOKENIZER),
                   help="SentencePiece .model file or Hugging Face tokenizer dir (default: bundled Llama 2)")
    p.add_argument("--in-files", nargs="+", default=[str(SHAREGPT_SAMPLE)],
                   help="JSON array or JSONL files (default: the bundled ShareGPT sample)")
    p.add_argument("--out-dir", default="data/sample", help="output directory (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=None, help="truncate at this many tokens (default: the model type's context)")
    p.add_argument("--eval-ratio", type=float, default=0.01, help="fraction of conversations in eval.arrow (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="seed of the train/eval split (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count)")
    p.add_argument("--condition-weights", type=parse_weights, default=None,
                   help="e.g. GPT4=1.0,GPT3=0.1 (default: the model type's)")
    p.add_argument("--default-condition", default=None, help="condition of records with neither `condition` nor `model` (default: the model type's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# ----------------------------------------------------------------------------- workers

_W = {}


def _init_worker(model_type_name, weights, default_condition, tokenizer_path, max_length, chat_template=None):
    from ochat.data.tokenizer import load_tokenizer

    mt = with_condition_weights(get_model_type(model_type_name, chat_template), weights, default_condition)
    _W.update(mt=mt, tok=load_tokenizer(tokenizer_path, mt), max_length=max_length)


def _tokenize_chunk(convs):
    """[Conversation] -> (lengths int32, tokens int32, weights float32, status int8 per conversation:
    0 kept, 1 truncated, 2 no target after truncation, 3 the template could not render it; reasons of status 3)."""
    from ochat.config.model_types import UnsupportedConversation

    tok, max_len = _W["tok"], _W["max_length"]
    lengths, status, toks, ws, reasons = [], [], [], [], []
    for enc in _W["mt"].template.encode_many(convs, tok):
        if isinstance(enc, UnsupportedConversation):
            status.append(3)
            lengths.append(0)
            reasons.append(enc.reason)
            continue
        t, w = enc.tokens, enc.weights
        st = 0
        if len(t) > max_len:
            t, w = t[:max_len], w[:max_len]
            st = 1 if any(x > 0 for x in w) else 2
        status.append(st)
        if st == 2:
            lengths.append(0)
            continue
        lengths.append(len(t))
        toks.extend(t)
        ws.extend(w)
    return (np.asarray(lengths, np.int32), np.asarray(toks, np.int32), np.asarray(ws, np.float32),
            np.asarray(status, np.int8), reasons)


# ----------------------------------------------------------------------------- main

def _prepare_out_dir(out_dir: Path, overwrite: bool):
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError(f"--out-dir {out_dir} exists and is not a directory")
        entries = list(out_dir.iterdir())
        if entries and not overwrite and not (out_dir / "meta.json").is_file():
            raise InputError(f"--out-dir {out_dir} is not empty and holds no ochat dataset (use --overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _length_stats(lengths: np.ndarray, weights_sum: float, targets: int) -> dict:
    if len(lengths) == 0:
        return {"count": 0}
    q = np.percentile(lengths, [50, 90, 99])
    return {"count": int(len(lengths)), "tokens": int(lengths.sum()), "target_tokens": int(targets),
            "weight_sum": float(weights_sum), "min": int(lengths.min()), "max": int(lengths.max()),
            "mean": float(lengths.mean()), "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2])}


def run(args) -> dict:
    import pyarrow as pa
    from tqdm import tqdm

    from ochat.data.tokenizer import load_tokenizer

    t0 = time.time()
    try:
        base_mt = get_model_type(args.model_type, args.chat_template)
    except ValueError as e:
        raise InputError(str(e)) from None
    weights = args.condition_weights or dict(base_mt.condition_weights)
    default_condition = args.default_condition or base_mt.default_condition
    if default_condition not in weights:
        raise InputError(f"--default-condition {default_condition!r} has no weight in --condition-weights "
                         f"(known: {', '.join(weights)})")
    mt = with_condition_weights(base_mt, weights, default_condition)
    max_length = args.max_length or mt.context_length
    if max_length < 2:
        raise InputError("--max-length must be at least 2")
    if not 0.0 <= args.eval_ratio < 1.0:
        raise InputError("--eval-ratio must be in [0, 1)")
    workers = args.workers or os.cpu_count() or 1
    if workers < 1:
        raise InputError("--workers must be at least 1")
    try:
        tok = load_tokenizer(args.tokenizer, mt)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    except Exception as e:  # a corrupt tokenizer file: one line, not a traceback
        raise InputError(f"cannot load tokenizer {args.tokenizer}: {type(e).__name__}: {e}".splitlines()[0]) from None

    # read + normalise (file-level problems raise InputError before anything is written)
    convs, skipped, records_read = [], Counter(), 0
    for f in args.in_files:
        recs = formats.read_records(f)
        if not isinstance(recs, list):
            recs = [recs]
        records_read += len(recs)
        for rec in recs:
            c = formats.normalize(rec, mt, weights, default_condition)
            if isinstance(c, str):
                skipped[c] += 1
            else:
                convs.append(c)

    out_dir = Path(args.out_dir)
    tmp = _prepare_out_dir(out_dir, args.overwrite)
    try:
        rng = np.random.default_rng(args.seed)
        n = len(convs)
        is_eval = np.zeros(n, bool)
        is_eval[rng.permutation(n)[: int(round(n * args.eval_ratio))]] = True

        schema = pa.schema([("tokens", pa.list_(pa.int32())), ("weights", pa.list_(pa.float32())),
                            ("length", pa.int32())])
        sinks = {s: pa.OSFile(str(tmp / f"{s}.arrow"), "wb") for s in ("train", "eval")}
        writers = {s: pa.ipc.new_file(sinks[s], schema) for s in sinks}
        cond_counts = {s: Counter() for s in sinks}
        lens = {s: [] for s in sinks}
        tsum = {s: [0.0, 0] for s in sinks}
        truncated = 0
        chunks = [convs[i:i + CHUNK] for i in range(0, n, CHUNK)]
        init = (mt.name, weights, default_condition, args.tokenizer, max_length, args.chat_template)
        bar = tqdm(total=n, unit="conv", disable=args.quiet or None, file=sys.stderr, desc="tokenize")
        if workers == 1 or len(chunks) <= 1:
            _init_worker(*init)
            results = map(_tokenize_chunk, chunks)
            pool = None
        else:
            pool = mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(
                min(workers, len(chunks)), initializer=_init_worker, initargs=init)
            results = pool.imap(_tokenize_chunk, chunks)
        start = 0
        try:
            for chunk, (lengths, toks, ws, status, reasons) in zip(chunks, results):
                truncated += int((status == 1).sum())
                skipped[formats.NO_TARGET_AFTER_TRUNCATION] += int((status == 2).sum())
                skipped.update(reasons)
                keep = (status == 0) | (status == 1)
                offsets = np.zeros(len(lengths) + 1, np.int64)
                np.cumsum(lengths, out=offsets[1:])
                ev = is_eval[start:start + len(chunk)]
                for s, mask in (("train", keep & ~ev), ("eval", keep & ev)):
                    idx = np.nonzero(mask)[0]
                    if len(idx) == 0:
                        continue
                    sel = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx])
                    l = lengths[idx]
                    off = np.zeros(len(idx) + 1, np.int32)
                    np.cumsum(l, out=off[1:])
                    w_sel = ws[sel]
                    batch = pa.record_batch([
                        pa.ListArray.from_arrays(pa.array(off), pa.array(toks[sel])),
                        pa.ListArray.from_arrays(pa.array(off), pa.array(w_sel)),
                        pa.array(l)], schema=schema)
                    writers[s].write_batch(batch)
                    lens[s].append(l)
                    tsum[s][0] += float(w_sel.sum())
                    tsum[s][1] += int((w_sel > 0).sum())
                    for i in idx:
                        cond_counts[s][chunk[i].condition] += 1
                start += len(chunk)
                bar.update(len(chunk))
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
            for s in writers:
                writers[s].close()
                sinks[s].close()

        written = {s: int(sum(len(x) for x in lens[s])) for s in lens}
        if written["train"] + written["eval"] == 0:
            raise InputError("no conversation was written (every record was skipped: "
                             + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) + ")")
        seconds = time.time() - t0
        stats = {s: _length_stats(np.concatenate(lens[s]) if lens[s] else np.zeros(0, np.int32), *tsum[s]) for s in lens}
        total_tokens = sum(st.get("tokens", 0) for st in stats.values())
        report = {"records_read": records_read, "written": written["train"] + written["eval"],
                  "written_train": written["train"], "written_eval": written["eval"],
                  "truncated": truncated, "skipped": dict(sorted(skipped.items())),
                  "skipped_total": int(sum(skipped.values())), "tokens": total_tokens,
                  "seconds": round(seconds, 3), "tokens_per_second": round(total_tokens / max(seconds, 1e-9), 1)}
        assert report["written"] + report["skipped_total"] == records_read
        args_dict = {k: v for k, v in vars(args).items()}
        meta = {"ochat_dataset": FORMAT_VERSION, "model_type": mt.name, "template": mt.template.kind,
                "tokenizer": str(args.tokenizer), "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
                "eot_token": tok.eot_token, "eot_token_id": tok.eot_id, "bos_token_id": tok.bos_id,
                "chat_template": tok.chat_template,
                "eos_token_id": tok.eos_id, "max_length": max_length, "condition_weights": weights,
                "default_condition": default_condition, "report": report,
                "condition_counts": {s: dict(sorted(c.items())) for s, c in cond_counts.items()},
                "length_stats": stats, "args": args_dict,
                "columns": {"tokens": "list<int32>", "weights": "list<float32> (weight of token i as a target)",
                            "length": "int32"}}
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2)
        # swap into place
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return meta
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def format_report(meta: dict, out_dir) -> str:
    r = meta["report"]
    lines = [f"records read      {r['records_read']}",
             f"written           {r['written']} (train {r['written_train']}, eval {r['written_eval']})",
             f"truncated         {r['truncated']} (at {meta['max_length']} tokens, kept)",
             f"skipped           {r['skipped_total']}"]
    lines += [f"  {k:<24}{v}" for k, v in r["skipped"].items() if v]
    st = meta["length_stats"]["train"]
    if st.get("count"):
        lines.append(f"train tokens      {st['tokens']} (targets {st['target_tokens']}), length mean "
                     f"{st['mean']:.0f}, p50 {st['p50']:.0f}, p99 {st['p99']:.0f}, max {st['max']}")
    conds = Counter()
    for c in meta["condition_counts"].values():
        conds.update(c)
    lines.append("conditions        " + ", ".join(f"{k}={v}" for k, v in sorted(conds.items())))
    lines.append(f"speed             {r['tokens_per_second']:.0f} tokens/s ({r['seconds']:.1f} s)")
    lines.append(f"output            {out_dir}/{{train,eval}}.arrow, meta.json")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        meta = run(args)
    except InputError as e:
        print(f"generate_dataset: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("generate_dataset: interrupted, nothing written", file=sys.stderr)
        return 130
    print(format_report(meta, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
