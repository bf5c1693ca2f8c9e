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
    and replaces an earlier ochat dataset (anything else only with `overwrite`). Returns the meta written."""
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
