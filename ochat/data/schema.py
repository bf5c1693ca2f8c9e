"""The on-disk dataset format: its Arrow schema, its version, and the writer both producers use.

A dataset is a folder with `train.arrow` and `eval.arrow` (Arrow IPC file format, uncompressed, one row per
conversation: `tokens` list<int32>, `weights` list<float32> = the weight of token i as a target, `length`
int32) and `meta.json` (`"ochat_dataset": FORMAT_VERSION` and what produced it). The data CLI writes it with
`SplitWriter`; anything else (benchmarks, tests, other tokenizers) with `write_dataset`:

    from ochat.data import write_dataset
    write_dataset("data/synthetic", train=[(tokens, weights), ...], meta={"model_type": "openchat_v3.2"})
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from ochat.utils.atomic import atomic_directory

FORMAT_VERSION = 1
ARROW_SCHEMA = pa.schema([("tokens", pa.list_(pa.int32())), ("weights", pa.list_(pa.float32())),
                          ("length", pa.int32())])
COLUMNS = {"tokens": "list<int32>", "weights": "list<float32> (weight of token i as a target)", "length": "int32"}
SPLITS = ("train", "eval")
DATASET_KIND = "dataset"  # the kind in the folder's ochat marker (ochat.utils.atomic)
BATCH_TOKENS = 1 << 20  # tokens per Arrow record batch (the reader keeps a few bytes per batch in memory)


class DatasetFormatError(ValueError):
    """A folder that is not a dataset this version of ochat reads (one line, with the fix)."""


def check_format_version(meta: dict, folder) -> None:
    """Raise DatasetFormatError unless `meta` (the folder's meta.json) is of FORMAT_VERSION."""
    version = meta.get("ochat_dataset")
    if version is None:
        raise DatasetFormatError(f"{folder}/meta.json has no format version (\"ochat_dataset\"): not a dataset "
                                 "written by ochat; write it with `python -m ochat.data.generate_dataset` or "
                                 "ochat.data.write_dataset")
    if version != FORMAT_VERSION:
        raise DatasetFormatError(f"{folder} is an ochat dataset of format version {version}, this ochat reads "
                                 f"version {FORMAT_VERSION}: re-run `python -m ochat.data.generate_dataset`")


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def load_meta(path) -> dict:
    """A meta.json's JSON object; DatasetFormatError (one line naming the file) when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                                 "re-run `python -m ochat.data.generate_dataset`") from None
    except UnicodeDecodeError as e:
        raise DatasetFormatError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    if not isinstance(meta, dict):
        raise DatasetFormatError(f"{path}: a JSON {_JSON_TYPES.get(type(meta), type(meta).__name__)}, not an object")
    return meta


def check_meta(meta: dict, path) -> None:
    """Raise DatasetFormatError unless `meta` names a known chat format as its "model_type" and its
    "vocab_size", when present, is a positive integer."""
    from ochat.data.chat_formats import CHAT_FORMATS

    model_type = meta.get("model_type")
    if model_type is None:
        raise DatasetFormatError(f"{path} has no \"model_type\" (the chat format the dataset was tokenized with: "
                                 f"one of {', '.join(CHAT_FORMATS)})")
    if not isinstance(model_type, str) or model_type not in CHAT_FORMATS:
        raise DatasetFormatError(f"{path}: unknown model_type {model_type!r} (known: {', '.join(CHAT_FORMATS)})")
    vocab_size = meta.get("vocab_size")
    if vocab_size is not None and (type(vocab_size) is not int or vocab_size < 1):
        raise DatasetFormatError(f"{path}: vocab_size {vocab_size!r} is not a positive integer")


def _first(bad: np.ndarray) -> int:
    return int(np.argmax(bad))


def check_rows(batches: Iterable[pa.RecordBatch], path, vocab_size: int | None = None) -> None:
    """Raise DatasetFormatError, naming the first bad row, unless every row has no nulls, a `length` equal to
    its numbers of tokens and of weights, token ids in [0, vocab_size) (>= 0 when vocab_size is None) and
    finite weights >= 0. Vectorised per record batch: min / max first, the bad row only on failure."""
    start = 0
    for rb in batches:
        tok, w, length = rb.column("tokens"), rb.column("weights"), rb.column("length")
        for name, col in (("tokens", tok), ("weights", w), ("length", length)):
            if col.null_count:
                raise DatasetFormatError(f"{path}: row {start + _first(col.is_null().to_numpy(zero_copy_only=False))}: "
                                         f"`{name}` is null")
        to, wo = tok.offsets.to_numpy(), w.offsets.to_numpy()
        lengths = length.to_numpy()
        bad = (np.diff(to) != lengths) | (np.diff(wo) != lengths)
        if bad.any():
            i = _first(bad)
            raise DatasetFormatError(f"{path}: row {start + i}: `length` is {lengths[i]} but the row has "
                                     f"{to[i + 1] - to[i]} tokens and {wo[i + 1] - wo[i]} weights")
        for name, col, offsets in (("tokens", tok, to), ("weights", w, wo)):
            if col.values.null_count:
                raise DatasetFormatError(f"{path}: a null in `{name}` (rows {start} to {start + len(rb) - 1})")
        ids = tok.values.to_numpy()[to[0]:to[-1]]
        if len(ids) and (ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size)):
            k = _first((ids < 0) | (ids >= vocab_size if vocab_size is not None else False))
            row = int(np.searchsorted(to, to[0] + k, side="right")) - 1
            wrong = f"is outside [0, {vocab_size}) (meta.json's vocab_size)" if vocab_size is not None else "is negative"
            raise DatasetFormatError(f"{path}: row {start + row}: token id {ids[k]} at position {to[0] + k - to[row]} "
                                     f"{wrong}")
        weights = w.values.to_numpy()[wo[0]:wo[-1]]
        if len(weights) and not (weights.min() >= 0 and weights.max() < np.inf):  # NaN fails both
            k = _first(~((weights >= 0) & (weights < np.inf)))
            row = int(np.searchsorted(wo, wo[0] + k, side="right")) - 1
            raise DatasetFormatError(f"{path}: row {start + row}: weight {weights[k]} at position "
                                     f"{wo[0] + k - wo[row]} (weights must be finite and >= 0)")
        start += len(rb)


def check_schema(schema: pa.Schema, path) -> None:
    """Raise DatasetFormatError unless an Arrow file's schema is ARROW_SCHEMA."""
    if not schema.remove_metadata().equals(ARROW_SCHEMA):
        got = ", ".join(f"{f.name} {f.type}" for f in schema)
        want = ", ".join(f"{f.name} {f.type}" for f in ARROW_SCHEMA)
        raise DatasetFormatError(f"{path}: columns ({got}) are not ochat's ({want})")


def _quantile(histogram: np.ndarray, q: float) -> float:
    """np.percentile(values, 100 * q) (linear interpolation) of the values a histogram counts."""
    cumulative = np.cumsum(histogram)
    rank = (cumulative[-1] - 1) * q
    lo, hi = int(np.floor(rank)), int(np.ceil(rank))
    value_lo = int(np.searchsorted(cumulative, lo, side="right"))
    value_hi = int(np.searchsorted(cumulative, hi, side="right"))
    return float(value_lo + (rank - lo) * (value_hi - value_lo))


def length_stats(histogram: np.ndarray, target_tokens: int, weight_sum: float) -> dict:
    """Statistics of conversation lengths from their histogram (count per length)."""
    count = int(histogram.sum())
    if count == 0:
        return {"count": 0}
    lengths = np.nonzero(histogram)[0]
    tokens = int((np.arange(len(histogram)) * histogram).sum())
    return {"count": count, "tokens": tokens, "target_tokens": int(target_tokens), "weight_sum": float(weight_sum),
            "min": int(lengths[0]), "max": int(lengths[-1]), "mean": tokens / count,
            "p50": _quantile(histogram, 0.5), "p90": _quantile(histogram, 0.9), "p99": _quantile(histogram, 0.99)}


class SplitWriter:
    """Appends conversations to one Arrow file in record batches of about BATCH_TOKENS tokens; keeps
    a histogram of their lengths (not the lengths), so memory does not grow with the dataset."""

    def __init__(self, path):
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, ARROW_SCHEMA)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_tokens = 0
        self.histogram = np.zeros(0, np.int64)
        self.target_tokens = 0
        self.weight_sum = 0.0

    def add(self, lengths: np.ndarray, tokens: np.ndarray, weights: np.ndarray) -> None:
        """Append conversations: their lengths and their tokens / weights concatenated."""
        lengths = np.asarray(lengths, np.int32)
        tokens, weights = np.asarray(tokens, np.int32), np.asarray(weights, np.float32)
        if len(lengths) == 0:
            return
        if tokens.shape != weights.shape or int(lengths.sum()) != len(tokens) or lengths.min() < 1:
            raise ValueError(f"{len(tokens)} tokens, {len(weights)} weights and lengths summing to "
                             f"{int(lengths.sum())} (each >= 1) do not match")
        counts = np.bincount(lengths)
        if len(counts) > len(self.histogram):
            self.histogram = np.pad(self.histogram, (0, len(counts) - len(self.histogram)))
        self.histogram[:len(counts)] += counts
        self.target_tokens += int((weights > 0).sum())
        self.weight_sum += float(weights.sum(dtype=np.float64))
        self._pending.append((lengths, tokens, weights))
        self._pending_tokens += len(tokens)
        if self._pending_tokens >= BATCH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        lengths, tokens, weights = (np.concatenate(parts) for parts in zip(*self._pending))
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))
        self._writer.write_batch(pa.record_batch([pa.ListArray.from_arrays(offsets, pa.array(tokens)),
                                                  pa.ListArray.from_arrays(offsets, pa.array(weights)),
                                                  pa.array(lengths)], schema=ARROW_SCHEMA))
        self._pending, self._pending_tokens = [], 0

    def close(self) -> dict:
        """Write what is pending, close the file; -> length statistics of everything written."""
        try:
            self._flush()
        finally:
            self._writer.close()
            self._sink.close()
        return length_stats(self.histogram, self.target_tokens, self.weight_sum)


def write_meta(folder, meta: dict) -> dict:
    """Write `folder/meta.json`: `meta` with the format version and the column description added."""
    meta = {"ochat_dataset": FORMAT_VERSION, **meta, "columns": COLUMNS}
    with open(Path(folder) / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def write_dataset(out_dir, train: Iterable, eval: Iterable = (), *, meta: dict | None = None,
                  overwrite: bool = False) -> dict:
    """Write a dataset folder that `open_dataset` reads, from (tokens, weights) pairs of 1-D arrays.

    `meta`: what the trainer checks (e.g. "model_type", "vocab_size", "eot_token_id", "bos_token_id",
    "max_length"); the format version and length statistics are added. The folder is written atomically
    and replaces an earlier ochat dataset (anything else only with `overwrite`). Returns the meta written.
    DatasetFormatError when `meta` lacks a known "model_type" (open_dataset would refuse the folder)."""
    check_meta(meta or {}, "write_dataset's meta")
    with atomic_directory(out_dir, DATASET_KIND, overwrite=overwrite) as tmp:
        stats = {}
        for split, items in (("train", train), ("eval", eval)):
            writer = SplitWriter(tmp / f"{split}.arrow")
            try:
                for tokens, weights in items:
                    writer.add([len(tokens)], tokens, weights)
            finally:
                stats[split] = writer.close()
        return write_meta(tmp, {**(meta or {}), "length_stats": stats})
