"""Pre-tokenize conversations into Arrow IPC files that the trainer memory-maps.

    python -m ochat.data.generate_dataset                       # bundled Llama 2 tokenizer + sample
    python -m ochat.data.generate_dataset --model-type openchat_v3.2 \
        --tokenizer llama2/tokenizer.model --in-files gpt4.jsonl.zst:GPT4 rest.parquet --out-dir data/mix

Output (DIR = --out-dir): DIR/train.arrow, DIR/eval.arrow (see ochat.data.schema), DIR/meta.json (model type,
tokenizer checksum, report, length statistics, arguments), DIR/skipped.jsonl (every record not written: file,
line or index, reason) and ochat's marker file. The folder is written under a temporary name next to DIR and
swapped in at the end (ochat.utils.atomic), so a failed or interrupted run leaves DIR as it was.

Pipeline, streamed (memory is bounded by a few chunks, not by the input): records are read one at a time
(ochat.data.sources) and normalised (ochat.data.formats) in this process; one far longer than --max-length
(more characters than --max-record-chars, or more messages than --max-length tokens) is skipped as
`too_long` before it is tokenized, so one huge record costs little more memory than its own text ->
chunks of conversations,
tokenized in order by --workers processes (a few chunks in flight) -> truncated -> each conversation goes to
eval when a seeded hash of its record's position is below --eval-ratio -> appended to the Arrow files. The
output depends only on the inputs, --seed and the flags that change tokens, never on --workers.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ochat.data.chat_formats import (CHAT_FORMATS, UnsupportedConversation, get_chat_format, with_condition_weights,
                                     with_special_tokens_in_content)
from ochat.data.openchat_template import SPECIAL_TOKENS_IN_CONTENT
from ochat.data import formats, sources
from ochat.data.progress import Progress
from ochat.data.schema import DATASET_KIND, SPLITS, SplitWriter, write_meta
from ochat.data.sources import InputError, one_line
from ochat.utils.atomic import RefusedOverwrite, atomic_directory

CHUNK = 512  # conversations per tokenizer batch / worker task ...
CHUNK_CHARS = 1 << 21  # ... or fewer, when they hold this many characters
CHUNK_SKIPS = 4096  # ... or none, after this many skipped records (their log waits for the chunk)
IN_FLIGHT_PER_WORKER = 2  # chunks queued per worker process
LINES_PER_REASON = 20  # malformed lines listed per file and reason in the report
# default --max-record-chars per --max-length token: no tokenizer averages more characters per token over a
# record (whitespace runs of 16+ characters are single tokens in some, but not a whole record of them)
CHARS_PER_TOKEN_BOUND = 64
PROG = "generate_dataset"

# tokenization status per conversation
KEPT, TRUNCATED, NO_TARGET, UNSUPPORTED = 0, 1, 2, 3


# ----------------------------------------------------------------------------- args

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, like every other error of this CLI (no usage block)."""
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _int_at_least(lowest: int):
    def parse(s: str) -> int:
        try:
            value = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        return value
    return parse


def _finite(s: str) -> float:
    try:
        value = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {s!r}")
    return value


def _ratio(s: str) -> float:
    value = _finite(s)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return value


def _positive(s: str) -> float:
    value = _finite(s)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return value


def parse_weights(s: str) -> dict:
    """`NAME=WEIGHT,...` -> {NAME: WEIGHT}; each weight finite and >= 0."""
    out = {}
    for part in s.split(","):
        if not part.strip():
            continue
        k, sep, v = part.rpartition("=")
        try:
            if not sep or not k.strip():
                raise ValueError
            weight = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad entry {part!r} (expected NAME=FLOAT)") from None
        if not math.isfinite(weight) or weight < 0:
            raise argparse.ArgumentTypeError(f"weight of {k.strip()!r} must be finite and >= 0, got {v.strip()}")
        out[k.strip()] = weight
    if not out:
        raise argparse.ArgumentTypeError("empty (expected NAME=FLOAT,...)")
    return out


def build_parser():
    from ochat.assets import LLAMA2_TOKENIZER, SHAREGPT_SAMPLE

    p = _Parser(prog="python -m ochat.data.generate_dataset", allow_abbrev=False,
                description="Tokenize ShareGPT, OpenAI-messages and Alpaca conversations into Arrow files.")
    p.add_argument("--model-type", default="openchat_v3.2", help=f"one of {', '.join(CHAT_FORMATS)} (default: %(default)s)")
    p.add_argument("--chat-template", default=None, metavar="FILE|NAME",
                   help="chat_template type: a Jinja file or a bundled preset (chatml, llama3, gemma); default: the tokenizer's own")
    p.add_argument("--tokenizer", default=str(LLAMA2_TOKENIZER),
                   help="SentencePiece .model file or Hugging Face tokenizer dir (default: bundled Llama 2)")
    p.add_argument("--in-files", nargs="+", default=None, metavar="PATH[:CONDITION]",
                   help="JSON array, JSONL (optionally .gz/.bz2/.xz/.zst), Parquet, Arrow files or Hugging Face "
                        "save_to_disk folders; PATH:CONDITION sets the condition of the file's records "
                        f"(default: the bundled ShareGPT sample, {SHAREGPT_SAMPLE}, with a note)")
    p.add_argument("--out-dir", default="data/sample", help="output directory (default: %(default)s)")
    p.add_argument("--max-length", type=_int_at_least(2), default=None,
                   help="truncate at this many tokens (default: the model type's context)")
    p.add_argument("--max-record-chars", type=_int_at_least(1), default=None,
                   help="skip (as too_long) a record with more characters of text than this, instead of tokenizing "
                        f"it all to keep --max-length tokens (default: {CHARS_PER_TOKEN_BOUND} x --max-length)")
    p.add_argument("--eval-ratio", type=_ratio, default=0.01,
                   help="probability that a conversation goes to eval.arrow, in [0, 1) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="seed of the train/eval split (default: %(default)s)")
    p.add_argument("--workers", type=_int_at_least(1), default=None, help="tokenizer processes (default: CPU count)")
    p.add_argument("--condition-weights", type=parse_weights, default=None,
                   help="e.g. GPT4=1.0,GPT3=0.1, each finite and >= 0 (default: the model type's)")
    p.add_argument("--default-condition", default=None,
                   help="condition of records with no `condition`, file condition or `model` (default: the model type's)")
    p.add_argument("--special-tokens-in-content", choices=SPECIAL_TOKENS_IN_CONTENT, default=None,
                   help="special-token text typed in a message (<s>, <|end_of_turn|>): `text` trains it as plain text "
                        "(OpenChat's rule, the OpenChat types' default), `tokens` as the token, what serving with the "
                        "checkpoint's chat template does (chat_template's only rule)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) JSONL lines that are not valid JSON or UTF-8 instead of stopping")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty --out-dir that ochat did not write")
    p.add_argument("--progress-interval", type=_positive, default=30.0,
                   help="seconds between progress lines when stderr is not a terminal (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or lines")
    return p


# ----------------------------------------------------------------------------- workers

_W = {}


def _init_worker(chat_format_name, weights, default_condition, tokenizer_path, max_length, chat_template=None,
                 special_tokens_in_content=None):
    from ochat.data.tokenizer import load_tokenizer

    mt = with_condition_weights(get_chat_format(chat_format_name, chat_template), weights, default_condition)
    mt = with_special_tokens_in_content(mt, special_tokens_in_content)
    _W.update(mt=mt, tok=load_tokenizer(tokenizer_path, mt), max_length=max_length)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_signals_held():
    """Hold SIGINT and SIGTERM meanwhile: one that comes is handled on exit, by the handler of then. Workers
    started meanwhile keep them blocked until they set their own handlers, so the parent's (Interrupted) never
    runs in one. The handlers are swapped too: blocking the signals in this thread does not keep it from running
    its handler when another thread (numpy's) takes one, and an Interrupted raised inside Process.start leaks a
    worker, or is dropped with the signal by os.fork's callbacks."""
    held = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in STOP_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # inherited by spawned workers too
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one pending for this thread is held now
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])


def _init_worker_process(*init):
    # Ctrl-C reaches the whole process group: the main process alone handles it (and stops the workers)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent while it started us
    _init_worker(*init)


def _worker(conn, init) -> None:
    """A tokenizer process: tokenizes the chunks that come through `conn`, in order, and sends back each one's
    Tokenized, until the parent is gone. Threads receive and send meanwhile, so neither process ever waits on
    the other's work: the parent's send of a chunk returns once this process is running, and a result waits
    here, not in a full pipe, until the parent reads it."""
    _init_worker_process(*init)
    tasks, results = queue.SimpleQueue(), queue.SimpleQueue()
    threading.Thread(target=_receive_tasks, args=(conn, tasks), daemon=True).start()
    threading.Thread(target=_send_results, args=(conn, results), daemon=True).start()
    for convs in iter(tasks.get, None):
        results.put(_tokenize_chunk(convs))


def _receive_tasks(conn, tasks: queue.SimpleQueue) -> None:
    with contextlib.suppress(EOFError, OSError):  # the parent is gone: end the worker
        while True:
            tasks.put(conn.recv())
    tasks.put(None)


def _send_results(conn, results: queue.SimpleQueue) -> None:
    with contextlib.suppress(OSError):  # the parent is gone
        while True:
            conn.send(results.get())


@dataclass
class Tokenized:
    """A chunk's conversations after the template and truncation."""

    status: np.ndarray  # int8 per conversation: KEPT, TRUNCATED, NO_TARGET, UNSUPPORTED
    lengths: np.ndarray  # int32 per conversation: tokens written (0 unless KEPT / TRUNCATED)
    full_lengths: np.ndarray  # int64 per conversation: tokens before truncation (0 if UNSUPPORTED)
    tokens: np.ndarray  # int32, the written conversations' tokens concatenated
    weights: np.ndarray  # float32, likewise
    reasons: list  # skip reason of each UNSUPPORTED conversation, in order
    rewritten_turns: int


def _tokenize_chunk(convs) -> Tokenized:
    tok, max_len = _W["tok"], _W["max_length"]
    status, lengths, full, toks, ws, reasons, rewritten = [], [], [], [], [], [], 0
    for enc in _W["mt"].template.encode_many(convs, tok) if convs else []:
        if isinstance(enc, UnsupportedConversation):
            status.append(UNSUPPORTED)
            lengths.append(0)
            full.append(0)
            reasons.append(enc.reason)
            continue
        t, w = enc.tokens, enc.weights
        rewritten += enc.rewritten_turns
        full.append(len(t))
        st = KEPT
        if len(t) > max_len:
            t, w = t[:max_len], w[:max_len]
            st = TRUNCATED if any(x > 0 for x in w) else NO_TARGET
        status.append(st)
        if st == NO_TARGET:
            lengths.append(0)
            continue
        lengths.append(len(t))
        toks.extend(t)
        ws.extend(w)
    return Tokenized(np.asarray(status, np.int8), np.asarray(lengths, np.int32), np.asarray(full, np.int64),
                     np.asarray(toks, np.int32), np.asarray(ws, np.float32), reasons, rewritten)


# ----------------------------------------------------------------------------- reading

@dataclass
class Plan:
    """What a run reads and how, checked before anything is written."""

    mt: object  # the model type, with the run's condition weights
    weights: dict
    default_condition: str
    max_length: int
    max_record_chars: int
    workers: int
    inputs: list  # InputSpec per --in-files entry
    opened: list  # sources.Source per input
    tokenizer: object
    out_dir: Path


@dataclass
class Chunk:
    """Consecutive input records: the conversations to tokenize, and the records skipped among them."""

    convs: list = field(default_factory=list)
    where: list = field(default_factory=list)  # (file index, position) per conversation
    ordinals: list = field(default_factory=list)  # index among all records read, per conversation
    skips: list = field(default_factory=list)  # (file index, position, reason, detail or None)
    chars: int = 0


@dataclass
class Tally:
    """What the run saw; becomes the report."""

    records_read: int = 0
    per_file: list = field(default_factory=list)  # records read per input
    skipped: Counter = field(default_factory=Counter)
    bad_lines: dict = field(default_factory=dict)  # file -> reason -> {"count", "lines"}
    changes: Counter = field(default_factory=Counter)
    truncated: int = 0
    truncated_tokens_dropped: int = 0
    longest_before_truncation: int = 0
    rewritten_turns: int = 0
    written: Counter = field(default_factory=Counter)  # per split
    conditions: dict = field(default_factory=lambda: {s: Counter() for s in SPLITS})


def _too_long(conv, plan: Plan) -> str | None:
    """Why a conversation is too long to tokenize (more text than --max-record-chars, or more messages than
    --max-length tokens: each renders at least one), or None."""
    size = formats.text_size(conv)
    if size > plan.max_record_chars:
        return f"{size} characters of text, over --max-record-chars {plan.max_record_chars}"
    if len(conv.messages) > plan.max_length:
        return f"{len(conv.messages)} messages, over --max-length {plan.max_length}"
    return None


def _chunks(plan: Plan, skip_bad_lines: bool, tally: Tally):
    """Stream all records into Chunks (normalised conversations and the skipped records among them)."""
    chunk = Chunk()
    for file_index, (spec, source) in enumerate(zip(plan.inputs, plan.opened)):
        for position, rec in source:
            tally.records_read += 1
            tally.per_file[file_index] += 1
            if isinstance(rec, sources.BadLine):
                if not skip_bad_lines:
                    raise InputError(f"{rec.message} (--skip-bad-lines skips such lines)")
                entry = tally.bad_lines.setdefault(str(spec.path), {}).setdefault(rec.reason, {"count": 0, "lines": []})
                entry["count"] += 1
                if len(entry["lines"]) < LINES_PER_REASON:
                    entry["lines"].append(position)
                chunk.skips.append((file_index, position, rec.reason, rec.message))
            else:
                conv = formats.normalize(rec, plan.mt, plan.weights, plan.default_condition, spec.condition)
                if isinstance(conv, str):
                    chunk.skips.append((file_index, position, conv, None))
                elif too_long := _too_long(conv, plan):
                    chunk.skips.append((file_index, position, formats.TOO_LONG, too_long))
                else:
                    tally.changes.update(conv.changes)
                    chunk.convs.append(conv)
                    chunk.where.append((file_index, position))
                    chunk.ordinals.append(tally.records_read - 1)
                    chunk.chars += formats.text_size(conv)
            if len(chunk.convs) >= CHUNK or chunk.chars >= CHUNK_CHARS or len(chunk.skips) >= CHUNK_SKIPS:
                yield chunk
                chunk = Chunk()
    if chunk.convs or chunk.skips:
        yield chunk


def eval_mask(ordinals, seed: int, ratio: float) -> np.ndarray:
    """Which records go to eval: splitmix64(position among all records read, seeded) / 2**64 < ratio.
    Depends on nothing else, so it is the same for any --workers and any chunking."""
    x = np.asarray(ordinals, np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53 < ratio


def _tokenized(chunks, workers: int, init):
    """(chunk, Tokenized) in input order; at most IN_FLIGHT_PER_WORKER chunks per worker queued.
    One chunk in all is tokenized here (no processes to start for a small input)."""
    chunks = iter(chunks)
    head = [c for c in (next(chunks, None), next(chunks, None)) if c is not None]
    chunks = itertools.chain(head, chunks)
    if workers == 1 or len(head) < 2:
        _init_worker(*init)
        for chunk in chunks:
            yield chunk, _tokenize_chunk(chunk.convs)
        return
    ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
    procs, conns = [], []
    try:
        with _stop_signals_held():
            for _ in range(workers):
                conn, worker_conn = ctx.Pipe()
                procs.append(ctx.Process(target=_worker, args=(worker_conn, init), daemon=True))
                procs[-1].start()
                worker_conn.close()  # the worker's end lives in the worker alone: its exit reads as EOF here
                conns.append(conn)
        in_flight = deque()  # (chunk, the connection of the worker tokenizing it)
        for conn, chunk in zip(itertools.cycle(conns), chunks):
            conn.send(chunk.convs)
            in_flight.append((chunk, conn))
            if len(in_flight) >= IN_FLIGHT_PER_WORKER * workers:
                done, conn = in_flight.popleft()
                yield done, conn.recv()
        for done, conn in in_flight:
            yield done, conn.recv()
    except (EOFError, ConnectionError):  # on a worker's connection (reading errors are InputErrors)
        raise RuntimeError("a tokenizer worker stopped unexpectedly (its error, if any, is above)") from None
    finally:
        # no thread of this process can be blocked: killing and reaping the workers always returns at once
        with _stop_signals_held():
            for proc in procs:
                proc.kill()
            for proc in procs:
                proc.join()


# ----------------------------------------------------------------------------- main

def _check_out_dir(out_dir: Path, paths) -> None:
    """Refuse an --out-dir that is, or holds, an input (replacing it would delete the input)."""
    out = out_dir.resolve()
    for p in paths:
        rp = Path(p).resolve()
        if rp == out or out in rp.parents:
            raise InputError(f"--out-dir {out_dir} holds the input {p}: writing there would delete it; "
                             "choose another --out-dir")


def _notify(msg: str) -> None:
    print(f"{PROG}: note: {msg}", file=sys.stderr)


def _plan(args) -> Plan:
    """Check the run's flags and open its inputs; no --in-files becomes the bundled sample (`args.in_files`
    is set to it, so meta.json records it), noted once all else is checked."""
    from ochat.assets import SHAREGPT_SAMPLE
    from ochat.data.tokenizer import load_tokenizer

    bundled_sample = args.in_files is None
    if bundled_sample:
        args.in_files = [str(SHAREGPT_SAMPLE)]

    try:
        base_mt = with_special_tokens_in_content(get_chat_format(args.model_type, args.chat_template),
                                                 args.special_tokens_in_content)
    except ValueError as e:
        raise InputError(str(e)) from None
    weights = args.condition_weights or dict(base_mt.condition_weights)
    default_condition = args.default_condition or base_mt.default_condition
    if default_condition not in weights:
        raise InputError(f"--default-condition {default_condition!r} has no weight in --condition-weights "
                         f"(known: {', '.join(weights)})")
    mt = with_condition_weights(base_mt, weights, default_condition)
    inputs = [sources.parse_input_spec(a) for a in args.in_files]
    for spec in inputs:
        if spec.condition is not None and spec.condition not in weights:
            raise InputError(f"--in-files {spec}: condition {spec.condition!r} has no weight in --condition-weights "
                             f"(known: {', '.join(weights)})")
    try:
        tok = load_tokenizer(args.tokenizer, mt)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    except Exception as e:  # a corrupt tokenizer file: one line, not a traceback
        raise InputError(f"cannot load tokenizer {args.tokenizer}: {type(e).__name__}: {one_line(e)}") from None
    opened = [sources.open_source(spec.path) for spec in inputs]  # file-level problems stop the run here
    out_dir = Path(args.out_dir)
    _check_out_dir(out_dir, [spec.path for spec in inputs] + [args.tokenizer])
    if bundled_sample:
        _notify(f"no --in-files: tokenizing the bundled 500-conversation ShareGPT sample ({SHAREGPT_SAMPLE})")
    max_length = args.max_length or mt.context_length
    return Plan(mt, weights, default_condition, max_length, args.max_record_chars or CHARS_PER_TOKEN_BOUND * max_length,
                args.workers or os.cpu_count() or 1, inputs, opened, tok, out_dir)


def run(args) -> dict:
    """Tokenize the inputs into --out-dir; -> the meta.json written. InputError for anything the user must fix."""
    t0 = time.time()
    plan = _plan(args)
    tally = Tally(per_file=[0] * len(plan.inputs))
    try:
        with atomic_directory(plan.out_dir, DATASET_KIND, overwrite=args.overwrite, notify=_notify) as tmp:
            stats = _write_splits(plan, args, tmp, tally)
            if tally.records_read == 0:
                raise InputError(", ".join(str(spec.path) for spec in plan.inputs) + ": no records")
            if sum(tally.written.values()) == 0:
                raise InputError("no conversation was written (every record was skipped: "
                                 + ", ".join(f"{k}={v}" for k, v in sorted(tally.skipped.items())) + ")")
            return write_meta(tmp, _meta(plan, args, tally, stats, time.time() - t0))
    except RefusedOverwrite as e:
        raise InputError(f"--out-dir {e}") from None
    except OSError as e:  # reading errors are InputErrors already: this is writing (disk full, permissions)
        raise InputError(f"--out-dir {plan.out_dir}: cannot write: {e.strerror or one_line(e)}") from None


def _write_splits(plan: Plan, args, tmp: Path, tally: Tally) -> dict:
    """Stream every input through the tokenizer workers into tmp/{train,eval}.arrow and tmp/skipped.jsonl;
    -> length statistics per split."""
    writers = {s: SplitWriter(tmp / f"{s}.arrow") for s in SPLITS}
    progress = Progress(PROG, args.quiet, args.progress_interval)
    try:
        with open(tmp / "skipped.jsonl", "w") as skip_log:
            chunks = _chunks(plan, args.skip_bad_lines, tally)
            init = (plan.mt.name, plan.weights, plan.default_condition, args.tokenizer, plan.max_length,
                    args.chat_template, args.special_tokens_in_content)
            tokens_written = 0
            with contextlib.closing(_tokenized(chunks, plan.workers, init)) as results:  # stops the workers
                for chunk, result in results:
                    tokens_written += _write_chunk(chunk, result, writers, skip_log, plan, tally, args)
                    progress.update(len(chunk.convs) + len(chunk.skips), tally.records_read,
                                    sum(tally.written.values()), tokens_written)
    finally:
        progress.close()
        stats = {s: w.close() for s, w in writers.items()}
    return stats


def _meta(plan: Plan, args, tally: Tally, stats: dict, seconds: float) -> dict:
    written = sum(tally.written.values())
    tokens = sum(st.get("tokens", 0) for st in stats.values())
    report = {"records_read": tally.records_read, "written": written,
              "written_train": tally.written["train"], "written_eval": tally.written["eval"],
              "truncated": tally.truncated, "truncated_tokens_dropped": tally.truncated_tokens_dropped,
              "longest_before_truncation": tally.longest_before_truncation,
              "skipped": dict(sorted(tally.skipped.items())), "skipped_total": int(sum(tally.skipped.values())),
              "bad_lines": tally.bad_lines, "normalised": dict(sorted(tally.changes.items())),
              "rewritten_turns": tally.rewritten_turns, "tokens": tokens, "seconds": round(seconds, 3),
              "tokens_per_second": round(tokens / max(seconds, 1e-9), 1)}
    assert report["written"] + report["skipped_total"] == tally.records_read
    tok = plan.tokenizer
    return {"model_type": plan.mt.name, "template": plan.mt.template.kind,
            "tokenizer": str(args.tokenizer), "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
            "eot_token": tok.eot_token, "eot_token_id": tok.eot_id, "bos_token_id": tok.bos_id,
            "chat_template": tok.chat_template,
            "eos_token_id": tok.eos_id, "max_length": plan.max_length, "condition_weights": plan.weights,
            "default_condition": plan.default_condition,
            "special_tokens_in_content": plan.mt.template.special_tokens_in_content,
            "inputs": [{"file": str(spec.path), "format": src.format, "condition": spec.condition, "records": n}
                       for spec, src, n in zip(plan.inputs, plan.opened, tally.per_file)],
            "report": report,
            "condition_counts": {s: dict(sorted(c.items())) for s, c in tally.conditions.items()},
            "length_stats": stats, "args": vars(args)}


def _write_chunk(chunk: Chunk, result: Tokenized, writers, skip_log, plan: Plan, tally: Tally, args) -> int:
    """Append a tokenized chunk to the splits, log its skipped records in order; -> tokens written."""
    status = result.status
    skips = list(chunk.skips)
    reasons = iter(result.reasons)
    for i in np.nonzero(status >= NO_TARGET)[0]:
        reason = formats.NO_TARGET_AFTER_TRUNCATION if status[i] == NO_TARGET else next(reasons)
        skips.append((*chunk.where[i], reason, None))
    for file_index, position, reason, detail in sorted(skips, key=lambda s: s[:2]):
        tally.skipped[reason] += 1
        entry = {"file": str(plan.inputs[file_index].path), plan.opened[file_index].unit: position, "reason": reason}
        skip_log.write(json.dumps(entry | ({"detail": detail} if detail else {}), ensure_ascii=False) + "\n")

    truncated = status == TRUNCATED
    tally.truncated += int(truncated.sum())
    tally.truncated_tokens_dropped += int((result.full_lengths[truncated] - result.lengths[truncated]).sum())
    tally.rewritten_turns += result.rewritten_turns
    kept = (status == KEPT) | truncated
    if kept.any():
        tally.longest_before_truncation = max(tally.longest_before_truncation, int(result.full_lengths[kept].max()))
    is_eval = eval_mask(chunk.ordinals, args.seed, args.eval_ratio) if chunk.ordinals else np.zeros(0, bool)
    kept_lengths = result.lengths[kept]
    in_eval = is_eval[kept]
    for split, mask in (("train", ~in_eval), ("eval", in_eval)):
        if not mask.any():
            continue
        token_mask = np.repeat(mask, kept_lengths)
        writers[split].add(kept_lengths[mask], result.tokens[token_mask], result.weights[token_mask])
        tally.written[split] += int(mask.sum())
        for conv_index in np.nonzero(kept)[0][mask]:
            tally.conditions[split][chunk.convs[conv_index].condition] += 1
    return len(result.tokens)


def format_report(meta: dict, out_dir) -> str:
    """The report printed at the end of a run."""
    r = meta["report"]
    lines = [f"records read      {r['records_read']}",
             f"written           {r['written']} (train {r['written_train']}, eval {r['written_eval']})",
             f"truncated         {r['truncated']} at {meta['max_length']} tokens (kept; {r['truncated_tokens_dropped']} "
             f"tokens cut, longest was {r['longest_before_truncation']})",
             f"skipped           {r['skipped_total']} (each in skipped.jsonl)"]
    lines += [f"  {k:<24}{v}" for k, v in r["skipped"].items() if v]
    for file, reasons in r["bad_lines"].items():
        for reason, entry in reasons.items():
            more = ", ..." if entry["count"] > len(entry["lines"]) else ""
            lines.append(f"  {file}: {entry['count']} {reason} lines ({', '.join(map(str, entry['lines']))}{more})")
    if r["normalised"]:
        lines.append("normalised        " + ", ".join(f"{k}={v}" for k, v in r["normalised"].items()))
    if r["rewritten_turns"]:
        lines.append(f"rewritten turns   {r['rewritten_turns']} (by the template)")
    st = meta["length_stats"]["train"]
    if st.get("count"):
        lines.append(f"train tokens      {st['tokens']} (targets {st['target_tokens']}), length mean "
                     f"{st['mean']:.0f}, p50 {st['p50']:.0f}, p99 {st['p99']:.0f}, max {st['max']}")
    conds = Counter()
    for c in meta["condition_counts"].values():
        conds.update(c)
    lines.append("conditions        " + ", ".join(f"{k}={v}" for k, v in sorted(conds.items())))
    lines.append(f"speed             {r['tokens_per_second']:.0f} tokens/s ({r['seconds']:.1f} s)")
    lines.append(f"output            {out_dir}/{{train,eval}}.arrow, meta.json, skipped.jsonl")
    return "\n".join(lines)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwinds like KeyboardInterrupt, so the temporary folder is removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        meta = run(args)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"{PROG}: interrupted by {signal.Signals(e.signum).name}: {args.out_dir} left as it was, "
              "temporary folder removed", file=sys.stderr)
        return 128 + e.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(format_report(meta, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
